"""Report writers of `distill collect`: the markdown tables, csv, parquet and the PNG plots.

The markdown table has one row per (dataset, teacher, student, protocol, method) and one column per IPC, then
the fairness table, the table across student architectures and the recover cost;
csv and parquet hold the long form (LONG_COLUMNS). Every file is written through the store's
atomic helpers.
"""

from __future__ import annotations

import csv
import io
import os
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from manifests.results import COST_KEYS, LONG_COLUMNS, RunResult, mean_of
from manifests.store import atomic_path, atomic_write_bytes, atomic_write_text

ROW_KEYS = ("dataset", "teacher", "student", "protocol", "method")
OUT_SUFFIXES = (".md", ".csv", ".parquet")


def format_cell(mean: float, std: float | None, n: int) -> str:
    """'mean ± std (n=N)' with two decimals; a single run shows its value and n=1."""
    if std is None or n < 2:
        return f"{mean:.2f} (n={n})"
    return f"{mean:.2f} ± {std:.2f} (n={n})"


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def _link(target: Path, base: Path | None) -> str:
    if base is None:
        return str(target)
    try:
        return os.path.relpath(target.resolve(), base.resolve())
    except ValueError:  # another drive (Windows)
        return str(target.resolve())


def grid_label(stem: str, names: Sequence[str]) -> str:
    """A grid's link text: `class-0007` -> `class-0007 (tench)` where the run's summary names its classes."""
    if stem.startswith("class-") and stem[6:].isdigit() and int(stem[6:]) < len(names):
        return f"{stem} ({names[int(stem[6:])]})"
    return stem


def format_markdown(
    rows: Sequence[dict[str, Any]], runs: Sequence[RunResult] = (), problems: Sequence[str] = (),
    link_base: Path | None = None,
) -> str:
    """The paper-style table: one row per (dataset, teacher, student, method), IPC as columns.

    With `runs`, a list of the runs and links to their image grids follows (links relative to
    `link_base`, the folder of the markdown file, when given). With `problems`, the runs left out.
    """
    lines = ["# Results", ""]
    if not rows:
        lines += ["No verified, complete run.", ""]
    else:
        ipcs = sorted({int(r["ipc"]) for r in rows})
        table: dict[tuple[str, ...], dict[int, dict[str, Any]]] = defaultdict(dict)
        for r in rows:
            table[tuple(r[k] for k in ROW_KEYS)][int(r["ipc"])] = r
        head = ["dataset", "teacher", "student", "protocol", "method", "teacher top-1"] + [f"IPC {i}" for i in ipcs]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join(["---"] * 5 + ["---:"] * (1 + len(ipcs))) + "|")
        for key in sorted(table):
            cells = table[key]
            teacher = [c["teacher_top1_mean"] for c in cells.values() if c["teacher_top1_mean"] is not None]
            teacher_cell = f"{statistics.fmean(teacher):.2f}" if teacher else "-"
            values = [format_cell(cells[i]["top1_mean"], cells[i]["top1_std"], cells[i]["n_seeds"])
                      if i in cells else "-" for i in ipcs]
            lines.append("| " + " | ".join(_md_escape(v) for v in [*key, teacher_cell, *values]) + " |")
        lines += ["", "Cells: student top-1 on the real validation set (final epoch), mean ± sample std (ddof=1) "
                  "over seeds, n = number of (run, student seed) entries.", ""]
        lines += fairness_lines(rows)
        lines += across_students_lines(rows)
        lines += cost_lines(rows)
    if runs:
        lines += ["## Runs", "", "| run | dataset | method | IPC | seed | top-1 | top-5 | image grids |",
                  "|---|---|---|---:|---:|---:|---:|---|"]
        for run in sorted(runs, key=lambda r: (r.group, r.seed, str(r.run_dir))):
            names = run.summary.get("class_names") or []
            grids = " ".join(f"[{_md_escape(grid_label(g.stem, names))}]({_link(g, link_base)})" for g in run.grids
                             if g.exists()) or "-"
            top5 = "-" if run.top5 is None else f"{run.top5:.2f}"
            lines.append(f"| [{_md_escape(run.run_dir.name)}]({_link(run.run_dir, link_base)}) | "
                         f"{_md_escape(run.dataset)} | {_md_escape(run.method)} | {run.ipc} | {run.seed} | "
                         f"{run.top1:.2f} | {top5} | {grids} |")
        lines.append("")
    if problems:
        lines += ["## Not counted", ""] + [f"- {_md_escape(p)}" for p in problems] + [""]
    return "\n".join(lines)


def _signed(v: float | None) -> str:
    return "-" if v is None else f"{v:+.3f}"


def fairness_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Per (dataset, protocol, student, method, IPC): top-1, IOR / HLR / LRS (fractions, means over the runs) and
    the runs' device hours and top-1 per device-hour; empty when no run recorded fairness metrics or cost."""
    if not any(r.get("ior_mean") is not None or r.get("device_hours_mean") is not None for r in rows):
        return []
    lines = ["## Fairness and cost", "",
             "| dataset | protocol | student | method | IPC | top-1 | IOR | HLR | LRS | device-h | top-1 / device-h |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["dataset"], r["protocol"], r["student"], int(r["ipc"]), r["method"])):
        hours = r.get("device_hours_mean")
        per = r.get("top1_per_device_hour")
        lines.append(f"| {_md_escape(r['dataset'])} | {r['protocol']} | {_md_escape(r['student'])} | "
                     f"{_md_escape(r['method'])} | {r['ipc']} | "
                     f"{format_cell(r['top1_mean'], r['top1_std'], r['n_seeds'])} | {_signed(r.get('ior_mean'))} | "
                     f"{_signed(r.get('hlr_mean'))} | {'-' if r.get('lrs_mean') is None else format(r['lrs_mean'], '.3f')} | "
                     f"{'-' if hours is None else f'{hours:.3f}'} | {'-' if per is None else f'{per:.1f}'} |")
    lines += ["", "IOR = top-1(method) - top-1(random-real), HLR = top-1(full real, hard) - top-1(method, hard), in "
              "fractions (see docs/evaluation.md, fairness metrics); device-h: the run's own device hours (GPU hours on "
              "GPU, CPU process-hours otherwise), baselines apart; random-real rows are the runs' baselines.", ""]
    return lines


def across_students_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One table per (dataset, protocol, IPC) with methods as rows and student architectures as columns; empty
    when no (dataset, protocol) has more than one student."""
    by: dict[tuple[str, str, int], dict[str, dict[str, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        by[(r["dataset"], r["protocol"], int(r["ipc"]))][r["method"]][r["student"]] = r
    lines: list[str] = []
    for key in sorted(by):
        students = sorted({s for m in by[key].values() for s in m})
        if len(students) < 2:
            continue
        if not lines:
            lines = ["## Across student architectures", ""]
        lines += [f"{_md_escape(key[0])}, {key[1]}, IPC {key[2]}:", "",
                  "| method | " + " | ".join(_md_escape(s) for s in students) + " |",
                  "|---|" + "---:|" * len(students)]
        for method in sorted(by[key]):
            cells = by[key][method]
            lines.append(f"| {_md_escape(method)} | " + " | ".join(
                format_cell(cells[s]["top1_mean"], cells[s]["top1_std"], cells[s]["n_seeds"]) if s in cells else "-"
                for s in students) + " |")
        lines.append("")
    return lines


def cost_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The recover cost table: per (dataset, method, IPC), mean seconds per unit, image-iterations/s, images/s,
    and the unit time against SRe2L's at the same (dataset, IPC) when SRe2L runs are among those collected."""
    cells: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        cells[(r["dataset"], r["method"], int(r["ipc"]))].append(r)

    def mean(key: str, group: list[dict[str, Any]]) -> float | None:
        return mean_of([g.get(key) for g in group])

    if not any(mean("recover_unit_s", g) is not None for g in cells.values()):
        return []
    lines = ["## Recover cost", "", "| dataset | method | IPC | s / unit | image-it/s | images/s | unit time / SRe2L's |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for (dataset, method, ipc), group in sorted(cells.items()):
        unit_s = mean("recover_unit_s", group)
        ref = mean("recover_unit_s", cells.get((dataset, "sre2l", ipc), []))
        ratio = f"{unit_s / ref:.2f}" if unit_s is not None and ref else "-"

        def fmt(v: float | None, digits: int = 1) -> str:
            return "-" if v is None else f"{v:.{digits}f}"

        lines.append(f"| {_md_escape(dataset)} | {_md_escape(method)} | {ipc} | {fmt(unit_s, 2)} | "
                     f"{fmt(mean('recover_image_it_per_s', group))} | {fmt(mean('recover_images_per_s', group))} | "
                     f"{ratio} |")
    lines += ["", "Measured by each run's recover units (wall seconds of the method's work, on the machine that ran "
              "them); image-iterations are 0 for selection methods, so only images/s applies to them.", ""]
    return lines


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list):
        return ";".join(map(str, value))
    return value


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Long-form rows as CSV (`runs` joined with ';', missing values empty)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(LONG_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in LONG_COLUMNS})
    atomic_write_text(Path(path), buf.getvalue())
    return Path(path)


def write_parquet(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Long-form rows as Parquet (`runs` a list of strings, missing values null)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("dataset", pa.string()), ("teacher", pa.string()), ("student", pa.string()), ("protocol", pa.string()),
        ("method", pa.string()), ("ipc", pa.int64()), ("n_seeds", pa.int64()), ("top1_mean", pa.float64()),
        ("top1_std", pa.float64()), ("top5_mean", pa.float64()), ("teacher_top1_mean", pa.float64()),
        *[(k, pa.float64()) for k in LONG_COLUMNS[LONG_COLUMNS.index(COST_KEYS[0]):-1]],
        ("runs", pa.list_(pa.string())),
    ])
    table = pa.Table.from_pylist([{k: row.get(k) for k in LONG_COLUMNS} for row in rows], schema=schema)
    with atomic_path(Path(path)) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def write_markdown(path: Path, text: str) -> Path:
    atomic_write_text(Path(path), text)
    return Path(path)


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig: Any, path: Path) -> Path:
    """Lay out, render to PNG and write `fig` atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def write_plot(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Top-1 against IPC, one line per method with std error bars; one panel per (dataset, teacher, student)."""
    plt = _pyplot()

    panels: dict[tuple[str, str, str, str], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        panels[(r["dataset"], r["teacher"], r["student"], r["protocol"])][r["method"]].append(r)
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.6), squeeze=False)
    for ax, key in zip(axes[0], sorted(panels), strict=False):
        for method, points in sorted(panels[key].items()):
            points = sorted(points, key=lambda p: p["ipc"])
            ax.errorbar([p["ipc"] for p in points], [p["top1_mean"] for p in points],
                        yerr=[p["top1_std"] or 0.0 for p in points], marker="o", capsize=3, label=method)
        ipcs = sorted({p["ipc"] for pts in panels[key].values() for p in pts})
        if len(ipcs) > 1 and ipcs[0] > 0 and ipcs[-1] / ipcs[0] >= 10:
            ax.set_xscale("log")
        ax.set_xticks(ipcs, [str(i) for i in ipcs])
        ax.set_title(f"{key[0]}: {key[1]} -> {key[2]} ({key[3]})", fontsize=9)
        ax.set_xlabel("images per class")
        ax.set_ylabel("student top-1")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no verified run", ha="center", va="center")
    return _save_figure(fig, Path(path))


def write_bytes_plot(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Top-1 against the soft labels' bytes (log scale), one point per (method, IPC) of the kd rows that stored
    soft labels; one panel per (dataset, teacher, student)."""
    plt = _pyplot()

    panels: dict[tuple[str, str, str], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("soft_label_bytes_mean"):
            panels[(r["dataset"], r["teacher"], r["student"])][r["method"]].append(r)
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.6), squeeze=False)
    for ax, key in zip(axes[0], sorted(panels), strict=False):
        for method, points in sorted(panels[key].items()):
            points = sorted(points, key=lambda p: p["soft_label_bytes_mean"])
            ax.plot([p["soft_label_bytes_mean"] for p in points], [p["top1_mean"] for p in points], marker="o",
                    label=method)
            for p in points:
                ax.annotate(f"IPC {p['ipc']}", (p["soft_label_bytes_mean"], p["top1_mean"]), fontsize=7)
        ax.set_xscale("log")
        ax.set_title(f"{key[0]}: {key[1]} -> {key[2]} (kd)", fontsize=9)
        ax.set_xlabel("stored soft-label bytes")
        ax.set_ylabel("student top-1")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no run stored soft labels", ha="center", va="center")
    return _save_figure(fig, Path(path))


def write_outputs(out: Path, rows: Sequence[dict[str, Any]], markdown: str) -> list[Path]:
    """The table in the format `out`'s suffix names, plus `<stem>.png` beside it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = out.suffix.lower()
    if suffix == ".md":
        written = [write_markdown(out, markdown)]
    elif suffix == ".csv":
        written = [write_csv(out, rows)]
    elif suffix == ".parquet":
        written = [write_parquet(out, rows)]
    else:
        raise ValueError(f"--out must end in {', '.join(OUT_SUFFIXES)} (got '{out.name}')")
    written.append(write_plot(out.with_suffix(".png"), rows))
    written.append(write_bytes_plot(out.with_name(f"{out.stem}-bytes.png"), rows))
    return written
