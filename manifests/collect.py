"""Collect: verify the manifests of one or many runs and reduce them into a paper-style table.

`distill collect RUN_DIR_OR_GLOB... [--out table.md|table.csv|table.parquet]`

For every run directory the collector

1. reads every record of every stage under `manifests/` (unit records and `_stage` records) and checks
   the size and sha256 of each output file a record names (streamed hashing). A missing or changed file
   is reported with the run, stage, unit and file, and the run is left out of the table;
2. treats a run without an `evaluate` record as incomplete: it is listed, never counted; a run whose evaluate
   record's metrics differ from the `results/summary.json` it names (a record edited by hand) is reported and not
   counted; a second directory holding a run id already seen (a copied run) is reported and counted once;
3. takes the result of a verified run from the evaluate record's metrics (falling back to the
   resolved `config.json` for the keys that describe the experiment).

A verified run contributes one entry per cell of its evaluation matrix (protocol, student, student seed) and
its random-real baseline's cells (a baseline folder shared by several runs counts once). Entries are grouped by
(dataset, teacher, student, protocol, method, ipc); a group's top-1 is reported as mean ± sample std (ddof=1)
over its entries. The markdown has the table (one row per (dataset, teacher, student, protocol, method), one
column per IPC), the fairness table (IOR / HLR / LRS, device hours, top-1 per device-hour), the table across
student architectures and the recover cost; csv and parquet hold the long form; two PNG plots (top-1 against
IPC, and against soft-label bytes) go beside `--out`.

Modules: `manifests.verify` (re-hashing the outputs records name), `manifests.results` (a run's
entry, grouping, mean ± std), `manifests.reports` (markdown / csv / parquet / PNG writers); this
module finds the run directories and runs the command.

Exit codes of `collect_main`: 0 every run verified, 1 some problem was reported (the table still holds
the good runs), 2 no run directory matched (or an unsupported --out suffix).
"""

from __future__ import annotations

import glob
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from manifests.reports import (
    OUT_SUFFIXES,
    format_cell,  # noqa: F401 - re-export (tests import it from here)
    format_markdown,
    write_outputs,
)
from manifests.results import (
    RunResult,
    cell_results,
    duplicate_seeds,
    results_table,
    run_result,
    summary_mismatch,
)
from manifests.verify import load_records, verify_outputs


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
    first_of: dict[str, Path] = {}  # run id -> the first run directory that holds it
    for run_dir in run_dirs:
        records, unreadable = load_records(run_dir)
        result, issues = run_result(run_dir, records)
        if result is None:
            problems.extend(unreadable + issues)
            continue
        bad = unreadable + verify_outputs(run_dir, records, jobs=jobs)
        edited = None if bad else summary_mismatch(run_dir, records)
        if edited:
            problems.append(edited)
            continue
        if bad:
            problems.extend(bad)
            problems.append(f"run {run_dir}: {len(bad)} output problem(s); not counted")
            continue
        if result.run_id in first_of:  # a copied run directory: the same run, so counted once
            problems.append(f"run {run_dir}: the same run (run id {result.run_id}) as {first_of[result.run_id]}, "
                            "a copy of it; counted once")
            continue
        first_of[result.run_id] = run_dir
        runs.append(result)
    return runs, problems


def cell_entries(runs: Sequence[RunResult]) -> list[RunResult]:
    """Every run's cells and baseline cells (`manifests.results.cell_results`), a shared baseline counted once."""
    seen: set[tuple[Any, ...]] = set()
    out = []
    for run in runs:
        for entry in cell_results(run):
            if entry.identity not in seen:
                seen.add(entry.identity)
                out.append(entry)
    return out


# --------------------------------------------------------------------------------------------- reduction


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
    entries = cell_entries(results)
    for warning in duplicate_seeds(entries):
        print(f"distill collect: warning: {warning}", file=sys.stderr)
    rows = results_table(entries)
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
