"""Human-readable run summary: the evaluation matrix against its baselines, the fairness metrics and the cost."""

from __future__ import annotations

import statistics
from typing import Any

CLASS_NAMES_SHOWN = 5
"""Class names the terminal summary prints (the first ones, in class-index order)."""


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


def _frac(v: Any) -> str:
    return "-" if v is None else f"{v:+.3f}"


def _mean_cell(cells: list[dict[str, Any]], protocol: str, student: str) -> str:
    """'mean ± std (n)' of the top-1 of the cells of (protocol, student); '-' when there are none."""
    vals = [c["top1"] for c in cells if c.get("protocol") == protocol and c.get("student") == student
            and c.get("top1") is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.fmean(vals):.2f} ± {statistics.stdev(vals):.2f} ({len(vals)})"


def _protocol_line(name: str, p: dict[str, Any]) -> str:
    if name in ("hard", "own"):
        return (f"  protocol {name}: {p.get('epochs')} epochs, batch {p.get('batch_size')}, {p.get('optimizer')} lr "
                f"{p.get('lr')} ({p.get('lr_schedule')}), {p.get('loss')}, augmentation {p.get('augmentation')}")
    return (f"  protocol kd: {p.get('epochs')} epochs, batch {p.get('batch_size')}, {p.get('optimizer')} lr "
            f"{p.get('lr')}, T {p.get('temperature')}, {p.get('augmentation')}, relabel {p.get('relabel_mode')}")


def format_summary(s: dict[str, Any]) -> str:
    """The run's summary for the terminal (`distill run` prints it at the end; `make demo` too)."""
    wall = ", ".join(f"{k} {v:.1f}s" for k, v in s.get("wall_s", {}).items() if v is not None)
    lines = [
        f"{s['dataset']}: {s['method']} IPC {s['ipc']} ({s['num_images']} images, {s['num_classes']} classes); "
        f"teacher {s['teacher']}: top-1 {_pct(s.get('teacher_top1'))}",
    ]
    names = s.get("class_names") or []
    if names:
        lines.append(f"  classes: {', '.join(names[:CLASS_NAMES_SHOWN])}"
                     + (f", ... ({len(names)})" if len(names) > CLASS_NAMES_SHOWN else ""))
    protocols = s.get("protocols") or {(s.get("protocol") or {}).get("name", "kd"): s.get("protocol") or {}}
    lines += [_protocol_line(name, p) for name, p in protocols.items()]
    cells = s.get("cells") or [{"protocol": (s.get("protocol") or {}).get("name", "kd"), "student": s["student"],
                                "seed": 0, "top1": s["top1"]}]
    base = s.get("baselines") or {}
    rand = (base.get("random-real") or {}).get("cells") or []
    full = (base.get("full-real") or {}).get("cells") or []
    fair = {(f["protocol"], f["student"]): f for f in s.get("fairness") or []}
    method = s["method"]
    header = ["protocol", "student", f"{method} top-1", "random-real", "full-real (hard)", "IOR", "HLR", "LRS"]
    rows = []
    for key in dict.fromkeys((c["protocol"], c["student"]) for c in cells):
        f = fair.get(key, {})
        rows.append([key[0], key[1], _mean_cell(cells, *key), _mean_cell(rand, *key) if rand else "-",
                     _mean_cell(full, "hard", key[1]) if full else "-", _frac(f.get("ior")), _frac(f.get("hlr")),
                     "-" if f.get("lrs") is None else f"{f['lrs']:.3f}"])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines.append(f"  val top-1 of the final epoch (mean ± std (seeds)); IOR, HLR in fractions "
                 f"(holdout top-1 of the first cell: {_pct(s.get('holdout_top1'))}):")
    for r in [header, *rows]:
        lines.append("    " + "  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    picked = [c for c in cells if c.get("best_holdout")]
    if picked:
        lines.append("  eval.select=best-holdout: " + "; ".join(
            f"{c['protocol']}/{c['student']}/s{c['seed']} epoch {c['best_holdout']['epoch']} val "
            f"{_pct(c['best_holdout']['top1'])}" for c in picked))
    if s.get("soft_label_bytes"):
        lines.append(f"  soft labels: {_bytes(s.get('soft_label_bytes'))} stored vs "
                     f"{_bytes(s.get('full_logit_bytes'))} in the full-logit format")
    cost = s.get("cost") or {}
    if cost:
        hours = cost.get("gpu_hours") if cost.get("device") == "cuda" else cost.get("device_hours")
        unit = "GPU-hours" if cost.get("device") == "cuda" else "CPU process-hours"
        per = (s["top1"] / hours) if hours else None
        stages = ", ".join(f"{k} {v.get('device_s', 0) / 3600:.3f}" for k, v in (cost.get("stages") or {}).items()
                           if k != "baseline")
        apart = cost.get("baseline_device_hours")
        lines.append(f"  cost: {hours:.3f} {unit} ({stages}); top-1 per {unit[:-1]}: "
                     f"{'-' if per is None else f'{per:.1f}'}"
                     + (f"; the baselines {apart:.3f} more (shareable)" if apart else ""))
    lines.append(f"  wall: {wall}")
    return "\n".join(lines)
