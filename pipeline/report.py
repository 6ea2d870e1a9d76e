"""Human-readable run summary."""

from __future__ import annotations

from typing import Any


def _pct(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}%"


def _bytes(n: Any) -> str:
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def format_summary(s: dict[str, Any]) -> str:
    p = s.get("protocol", {})
    wall = ", ".join(f"{k} {v:.1f}s" for k, v in s.get("wall_s", {}).items() if v is not None)
    lines = [
        f"{s['dataset']}: {s['method']} IPC {s['ipc']} ({s['num_images']} synthetic images, {s['num_classes']} classes)",
        f"  teacher {s['teacher']}: top-1 {_pct(s.get('teacher_top1'))}",
        f"  student {s['student']}: top-1 {_pct(s['top1'])}  top-5 {_pct(s['top5'])}  best top-1 "
        f"{_pct(s['best_top1'])}  (seed {s['seed']})",
        f"  protocol: {p.get('epochs')} epochs, batch {p.get('batch_size')}, AdamW lr {p.get('lr')}, "
        f"T {p.get('temperature')}, {p.get('augmentation')}, relabel {p.get('relabel_mode')}",
        f"  soft labels: {_bytes(s.get('soft_label_bytes'))} stored vs {_bytes(s.get('full_logit_bytes'))} "
        "in the full-logit format",
        f"  wall: {wall}",
    ]
    return "\n".join(lines)
