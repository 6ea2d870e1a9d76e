"""Collect: verify the manifests of one or many runs and reduce them into a paper-style table.

`distill collect RUN_DIR_OR_GLOB... [--out table.md|table.csv|table.parquet]`

For every run directory the collector

1. reads every record of every stage under `manifests/` (unit records and `_stage` records) and checks
   the size and sha256 of each output file a record names (streamed hashing). A missing or changed file
   is reported with the run, stage, unit and file, and the run is left out of the table;
2. treats a run without an `evaluate` record as incomplete: it is listed, never counted;
3. takes the result of a verified run from the evaluate record's metrics (falling back to the
   resolved `config.json` for the keys that describe the experiment).

Verified runs are grouped by (dataset, teacher, student, method, ipc); a group's top-1 is reported as
mean ± sample std (ddof=1) over its runs (seeds). The markdown table has one row per
(dataset, teacher, student, method) and one column per IPC; csv and parquet hold the long form.

Exit codes of `collect_main`: 0 every run verified, 1 some problem was reported (the table still holds
the good runs), 2 no run directory matched (or an unsupported --out suffix).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import math
import os
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from manifests.schema import FileRef, Record
from manifests.store import STAGE_RECORD, atomic_write_bytes, atomic_write_text

KNOWN_STAGES = ("ingest", "squeeze", "recover", "relabel", "train", "evaluate")  # for messages only
EVALUATE = "evaluate"
RECOVER = "recover"
GROUP_KEYS = ("dataset", "teacher", "student", "method", "ipc")
ROW_KEYS = ("dataset", "teacher", "student", "method")
LONG_COLUMNS = (
    "dataset", "teacher", "student", "method", "ipc", "n_seeds", "top1_mean", "top1_std", "top5_mean",
    "teacher_top1_mean", "runs",
)
OUT_SUFFIXES = (".md", ".csv", ".parquet")
_CHUNK = 1 << 20


@dataclass
class RunResult:
    """One verified, complete run: where it lives and what its evaluation recorded."""

    run_dir: Path
    dataset: str
    teacher: str
    student: str
    method: str
    ipc: int
    seed: int
    top1: float
    top5: float | None = None
    teacher_top1: float | None = None
    run_id: str = ""
    grids: list[Path] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def group(self) -> tuple[str, str, str, str, int]:
        return (self.dataset, self.teacher, self.student, self.method, self.ipc)


# --------------------------------------------------------------------------------------------- discovery


def is_run_dir(path: Path) -> bool:
    """A run directory holds a `config.json` or a `manifests/` folder."""
    return path.is_dir() and ((path / "config.json").is_file() or (path / "manifests").is_dir())


def expand_patterns(patterns: Iterable[str]) -> tuple[list[Path], list[str]]:
    """Run directories named by `patterns` (paths or glob patterns), in order, without duplicates.

    A directory that is not itself a run directory but holds run directories (such as `runs/`)
    stands for those. Returns the directories and a message for each pattern that matched none.
    """
    found: list[Path] = []
    seen: set[Path] = set()
    unmatched: list[str] = []
    for pattern in patterns:
        candidates = [Path(p) for p in sorted(glob.glob(pattern))] if glob.has_magic(pattern) else [Path(pattern)]
        hits: list[Path] = []
        for cand in candidates:
            if is_run_dir(cand):
                hits.append(cand)
            elif cand.is_dir():
                hits.extend(sorted(c for c in cand.iterdir() if is_run_dir(c)))
        if not hits:
            unmatched.append(f"no run directory matches '{pattern}'")
        for hit in hits:
            key = hit.resolve()
            if key not in seen:
                seen.add(key)
                found.append(hit)
    return found, unmatched


# --------------------------------------------------------------------------------------------- verification


def _record_files(run_dir: Path) -> Iterable[tuple[str, Path]]:
    """(stage, record file) for every done record (unit and stage records) of the run."""
    root = run_dir / "manifests"
    if not root.is_dir():
        return
    for stage_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(stage_dir.glob("*.json")):
            if not path.name.endswith(".failed.json"):
                yield stage_dir.name, path


def load_records(run_dir: Path) -> tuple[dict[str, list[Record]], list[str]]:
    """Every done record of the run by stage (the `_stage` record included), plus unreadable ones."""
    records: dict[str, list[Record]] = defaultdict(list)
    problems: list[str] = []
    for stage, path in _record_files(Path(run_dir)):
        try:
            records[stage].append(Record.from_json(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            problems.append(f"run {run_dir}: stage {stage}: record {path.name} cannot be read: {exc}")
    return dict(records), problems


def file_digest(path: Path) -> tuple[str, int]:
    """sha256 hex digest and size of `path`, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _resolve(run_dir: Path, ref: FileRef) -> Path:
    path = Path(ref.uri)
    return path if path.is_absolute() else Path(run_dir) / path


def _check_file(path: Path, sha256: str, size_recorded: int) -> str | None:
    """None when `path` has the recorded size and sha256, else what is wrong with it."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "is missing"
    except OSError as exc:
        return f"cannot be read ({exc})"
    if size != size_recorded:
        return f"has changed (size {size} bytes, recorded {size_recorded})"
    try:
        digest, _ = file_digest(path)
    except OSError as exc:
        return f"cannot be read ({exc})"
    if digest != sha256:
        return f"has changed (sha256 {digest[:12]}..., recorded {sha256[:12]}...)"
    return None


def verify_outputs(run_dir: Path, records: dict[str, list[Record]] | None = None, jobs: int = 4) -> list[str]:
    """Check size and sha256 of every output file named by every record of the run.

    Returns one message per problem, naming the run, stage, unit and file; an empty list means every
    output is as recorded. Files named by several records are hashed once; `jobs` threads hash in
    parallel (hashlib releases the GIL on large reads).
    """
    run_dir = Path(run_dir)
    problems: list[str] = []
    if records is None:
        records, problems = load_records(run_dir)
    wanted: dict[tuple[Path, str, int], list[tuple[str, str, str]]] = defaultdict(list)
    for stage, recs in records.items():
        for rec in recs:
            for ref in rec.outputs:
                wanted[(_resolve(run_dir, ref), ref.sha256, ref.bytes)].append((stage, rec.unit, ref.uri))
    keys = list(wanted)
    with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(keys) or 1))) as pool:
        results = list(pool.map(lambda k: _check_file(*k), keys))
    for key, wrong in zip(keys, results, strict=True):
        if wrong is None:
            continue
        for stage, unit, uri in wanted[key]:
            problems.append(f"run {run_dir}: stage {stage}: unit {unit}: output file {uri} {wrong}")
    return problems


# --------------------------------------------------------------------------------------------- loading


def _read_config(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _incomplete_message(run_dir: Path, records: dict[str, list[Record]]) -> str:
    done = [s for s, recs in records.items() if any(r.unit == STAGE_RECORD for r in recs)]
    done.sort(key=lambda s: (KNOWN_STAGES.index(s) if s in KNOWN_STAGES else len(KNOWN_STAGES), s))
    failed = sorted(p.parent.name for p in (run_dir / "manifests").glob("*/*.failed.json"))
    msg = f"run {run_dir}: incomplete (no evaluate record; stages complete: {', '.join(done) or 'none'}"
    if failed:
        msg += f"; failed units in: {', '.join(sorted(set(failed)))}"
    return msg + "); not counted"


def _as_float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def run_result(run_dir: Path, records: dict[str, list[Record]]) -> tuple[RunResult | None, list[str]]:
    """The table entry of a complete run from its evaluate record (config.json fills gaps)."""
    run_dir = Path(run_dir)
    evals = [r for r in records.get(EVALUATE, []) if r.unit != STAGE_RECORD and r.status == "done"]
    if not evals:
        return None, [_incomplete_message(run_dir, records)]
    summary = dict(max(evals, key=lambda r: r.ended).metrics)
    cfg = _read_config(run_dir)

    def pick(key: str, *path: str) -> Any:
        if summary.get(key) not in (None, ""):
            return summary[key]
        node: Any = cfg
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        return node

    top1 = _as_float(summary.get("top1"))
    if top1 is None:
        return None, [f"run {run_dir}: stage evaluate: record has no numeric top1; not counted"]
    values = {
        "dataset": pick("dataset", "data", "dataset"), "teacher": pick("teacher", "squeeze", "arch"),
        "student": pick("student", "train", "arch"), "method": pick("method", "recover", "method"),
        "ipc": pick("ipc", "recover", "ipc"), "seed": pick("seed", "seed"),
    }
    missing = [k for k, v in values.items() if v in (None, "")]
    if missing:
        return None, [f"run {run_dir}: cannot tell its {', '.join(missing)} (neither in the evaluate record nor "
                      "in config.json); not counted"]
    try:
        ipc, seed = int(values["ipc"]), int(values["seed"])
    except (TypeError, ValueError):
        return None, [f"run {run_dir}: ipc {values['ipc']!r} / seed {values['seed']!r} are not integers; not counted"]
    grid_names = []
    for rec in records.get(RECOVER, []):
        if rec.unit == STAGE_RECORD:
            grid_names.extend(rec.metrics.get("grids", []) or [])
    return RunResult(
        run_dir=run_dir, dataset=str(values["dataset"]), teacher=str(values["teacher"]),
        student=str(values["student"]), method=str(values["method"]), ipc=ipc,
        seed=seed, top1=top1, top5=_as_float(summary.get("top5")),
        teacher_top1=_as_float(summary.get("teacher_top1")), run_id=str(cfg.get("run_id", evals[0].run_id)),
        grids=[run_dir / g for g in grid_names], summary=summary,
    ), []


def load_runs(patterns: Sequence[str], jobs: int = 4) -> tuple[list[RunResult], list[str]]:
    """Expand `patterns`, verify each run and return the verified complete runs and every problem.

    A run with a missing or changed output file, an unreadable record or no evaluate record is left
    out of the returned runs and described in the problems, as is a pattern that matched nothing.
    """
    run_dirs, unmatched = expand_patterns(patterns)
    runs, problems = verify_runs(run_dirs, jobs=jobs)
    return runs, unmatched + problems


def verify_runs(run_dirs: Sequence[Path], jobs: int = 4) -> tuple[list[RunResult], list[str]]:
    """The verified complete runs among `run_dirs`, and a message for each problem found."""
    problems: list[str] = []
    runs: list[RunResult] = []
    for run_dir in run_dirs:
        records, unreadable = load_records(run_dir)
        result, issues = run_result(run_dir, records)
        if result is None:
            problems.extend(unreadable + issues)
            continue
        bad = unreadable + verify_outputs(run_dir, records, jobs=jobs)
        if bad:
            problems.extend(bad)
            problems.append(f"run {run_dir}: {len(bad)} output problem(s); not counted")
            continue
        runs.append(result)
    return runs, problems


# --------------------------------------------------------------------------------------------- reduction


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def results_table(runs: Sequence[RunResult]) -> list[dict[str, Any]]:
    """Long-form rows, one per (dataset, teacher, student, method, ipc), sorted.

    Keys: LONG_COLUMNS. `top1_std` is the sample std (ddof=1) or None for a single run;
    `runs` lists the run directories.
    """
    groups: dict[tuple[str, str, str, str, int], list[RunResult]] = defaultdict(list)
    for run in runs:
        groups[run.group].append(run)
    rows = []
    for key in sorted(groups):
        members = sorted(groups[key], key=lambda r: (r.seed, str(r.run_dir)))
        top1_mean, top1_std = _mean_std([r.top1 for r in members])
        top5 = [r.top5 for r in members if r.top5 is not None]
        teacher = [r.teacher_top1 for r in members if r.teacher_top1 is not None]
        rows.append({
            **dict(zip(GROUP_KEYS, key, strict=True)),
            "n_seeds": len(members),
            "top1_mean": top1_mean,
            "top1_std": top1_std,
            "top5_mean": statistics.fmean(top5) if len(top5) == len(members) else None,
            "teacher_top1_mean": statistics.fmean(teacher) if teacher else None,
            "runs": [str(r.run_dir) for r in members],
        })
    return rows


def duplicate_seeds(runs: Sequence[RunResult]) -> list[str]:
    """Warnings for groups that hold the same seed twice (counted, but not independent)."""
    seen: dict[tuple[Any, ...], list[str]] = defaultdict(list)
    for run in runs:
        seen[(*run.group, run.seed)].append(str(run.run_dir))
    return [f"seed {k[-1]} of {'/'.join(map(str, k[:-1]))} appears in {len(v)} runs: {', '.join(v)}"
            for k, v in seen.items() if len(v) > 1]


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
        head = ["dataset", "teacher", "student", "method", "teacher top-1"] + [f"IPC {i}" for i in ipcs]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join(["---"] * 4 + ["---:"] * (1 + len(ipcs))) + "|")
        for key in sorted(table):
            cells = table[key]
            teacher = [c["teacher_top1_mean"] for c in cells.values() if c["teacher_top1_mean"] is not None]
            teacher_cell = f"{statistics.fmean(teacher):.2f}" if teacher else "-"
            values = [format_cell(cells[i]["top1_mean"], cells[i]["top1_std"], cells[i]["n_seeds"])
                      if i in cells else "-" for i in ipcs]
            lines.append("| " + " | ".join(_md_escape(v) for v in [*key, teacher_cell, *values]) + " |")
        lines += ["", "Cells: student top-1 on the real validation set, mean ± sample std (ddof=1) over seeds, "
                  "n = number of runs.", ""]
    if runs:
        lines += ["## Runs", "", "| run | dataset | method | IPC | seed | top-1 | top-5 | image grids |",
                  "|---|---|---|---:|---:|---:|---:|---|"]
        for run in sorted(runs, key=lambda r: (r.group, r.seed, str(r.run_dir))):
            grids = " ".join(f"[{g.stem}]({_link(g, link_base)})" for g in run.grids if g.exists()) or "-"
            top5 = "-" if run.top5 is None else f"{run.top5:.2f}"
            lines.append(f"| [{_md_escape(run.run_dir.name)}]({_link(run.run_dir, link_base)}) | "
                         f"{_md_escape(run.dataset)} | {_md_escape(run.method)} | {run.ipc} | {run.seed} | "
                         f"{run.top1:.2f} | {top5} | {grids} |")
        lines.append("")
    if problems:
        lines += ["## Not counted", ""] + [f"- {_md_escape(p)}" for p in problems] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- writers


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
        ("dataset", pa.string()), ("teacher", pa.string()), ("student", pa.string()), ("method", pa.string()),
        ("ipc", pa.int64()), ("n_seeds", pa.int64()), ("top1_mean", pa.float64()), ("top1_std", pa.float64()),
        ("top5_mean", pa.float64()), ("teacher_top1_mean", pa.float64()), ("runs", pa.list_(pa.string())),
    ])
    table = pa.Table.from_pylist([{k: row.get(k) for k in LONG_COLUMNS} for row in rows], schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(Path(path), sink.getvalue().to_pybytes())
    return Path(path)


def write_markdown(path: Path, text: str) -> Path:
    atomic_write_text(Path(path), text)
    return Path(path)


def write_plot(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Top-1 against IPC, one line per method with std error bars; one panel per (dataset, teacher, student)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple[str, str, str], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        panels[(r["dataset"], r["teacher"], r["student"])][r["method"]].append(r)
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
        ax.set_title(f"{key[0]}: {key[1]} -> {key[2]}", fontsize=9)
        ax.set_xlabel("images per class")
        ax.set_ylabel("student top-1")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no verified run", ha="center", va="center")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


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
    return written


# --------------------------------------------------------------------------------------------- entry point


def collect_main(runs: Sequence[str], out: str | None = None) -> int:
    """`distill collect`: verify, reduce, print or write. Returns the exit code (see module doc)."""
    out_path = Path(out) if out else None
    if out_path is not None and out_path.suffix.lower() not in OUT_SUFFIXES:
        print(f"distill collect: error: --out must end in {', '.join(OUT_SUFFIXES)} (got '{out_path.name}')",
              file=sys.stderr)
        return 2
    run_dirs, unmatched = expand_patterns(runs)
    if not run_dirs:
        print(f"distill collect: error: no run directory matches {' '.join(runs)}", file=sys.stderr)
        return 2
    results, problems = verify_runs(run_dirs)
    problems = unmatched + problems
    for problem in problems:
        print(f"distill collect: {problem}", file=sys.stderr)
    for warning in duplicate_seeds(results):
        print(f"distill collect: warning: {warning}", file=sys.stderr)
    rows = results_table(results)
    link_base = out_path.parent if out_path is not None and out_path.suffix.lower() == ".md" else None
    markdown = format_markdown(rows, results, problems, link_base=link_base)
    if out_path is None:
        print(markdown)
    else:
        for path in write_outputs(out_path, rows, markdown):
            print(f"wrote {path}", file=sys.stderr)
        print(format_markdown(rows))
    print(f"distill collect: {len(results)} run(s) counted in {len(rows)} cell(s), "
          f"{len(run_dirs) - len(results)} run(s) left out", file=sys.stderr)
    return 1 if problems else 0
