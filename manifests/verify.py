"""Verification of a run's outputs: every record's output files re-hashed against what the record names.

A missing or changed file is reported with the run, stage, unit and file. Files named by several
records are hashed once, by a few threads in parallel.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from manifests.digest import file_digest
from manifests.schema import FileRef, Record


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
