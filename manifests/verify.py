"""Verification of a run's outputs: every record's output files checked against what the record names.

A missing or changed file is reported with the run, stage, unit and file. Files named by several
records are hashed once, by a few threads in parallel. `distill collect` re-hashes every file
(`verify_outputs`); the runner checks what a stage is about to read before each stage (`check_refs`,
the cheap rule of `must_hash`: sizes always, sha256 for files up to `HASH_LIMIT` and always for
checkpoints and parquet files).
"""

from __future__ import annotations

import hashlib
import json
import stat
from collections import defaultdict
from collections.abc import Iterable, Sequence
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


HASH_LIMIT = 64 << 20  # files up to this size are re-hashed before use; larger ones (image shards) size-checked
ALWAYS_HASHED = (".pt", ".pth", ".ckpt", ".bin", ".parquet")  # checkpoints and soft labels: hashed at any size

# (path, size, mtime_ns, inode) -> sha256 of files hashed by this process (one `distill run` hashes a file once)
DigestCache = dict[tuple[str, int, int, int], str]


def must_hash(uri: str, size: int, limit: int = HASH_LIMIT, always: Sequence[str] = ALWAYS_HASHED) -> bool:
    """The cheap rule: hash a file when it is small or a checkpoint / parquet file; size-check the rest."""
    return size <= limit or Path(uri).suffix.lower() in always


def _check_file(path: Path, sha256: str, size_recorded: int, hash_it: bool = True,
                cache: DigestCache | None = None) -> str | None:
    """None when `path` has the recorded size (and sha256, when `hash_it`), else what is wrong with it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "is missing"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    size = st.st_size
    if not stat.S_ISREG(st.st_mode):
        return "is not a file"
    if size != size_recorded:
        return f"has changed (size {size} bytes, recorded {size_recorded})"
    if not hash_it:
        return None
    key = (str(path), size, st.st_mtime_ns, st.st_ino)
    digest = cache.get(key) if cache is not None else None
    if digest is None:
        try:
            digest, _ = file_digest(path)
        except OSError as exc:
            return f"cannot be read ({exc.strerror or exc})"
        if cache is not None:
            cache[key] = digest
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


def check_refs(run_dir: Path, refs: Iterable[FileRef], cache: DigestCache | None = None, limit: int = HASH_LIMIT,
               always: Sequence[str] = ALWAYS_HASHED, jobs: int = 4) -> dict[FileRef, str]:
    """What is wrong with each of `refs` under the cheap rule (`must_hash`); files that are as recorded are
    left out. `cache` keeps the digests of this process, so a file is hashed once per run of the driver."""
    refs = list(dict.fromkeys(refs))
    if not refs:
        return {}

    def check(ref: FileRef) -> str | None:
        return _check_file(_resolve(run_dir, ref), ref.sha256, ref.bytes, must_hash(ref.uri, ref.bytes, limit, always),
                           cache)

    with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(refs)))) as pool:
        results = list(pool.map(check, refs))
    return {ref: wrong for ref, wrong in zip(refs, results, strict=True) if wrong is not None}


MAX_LISTED = 256  # an upstream stage with more output files is one input entry: a digest of its file list


def stage_inputs(stage: str, records: Sequence[Record], stage_record: str = "_stage") -> list[FileRef]:
    """A downstream unit's inputs from one upstream stage: the output files of its records, or, beyond
    MAX_LISTED files, one entry for them all (uri `manifests/<stage>/`, the sha256 of their sorted list, the sum
    of their bytes); the stage record's files (class map...) are always listed."""
    files = [o for r in records if r.unit != stage_record for o in r.outputs]
    if len(files) > MAX_LISTED:
        listing = json.dumps(sorted((f.uri, f.sha256, f.bytes) for f in files))
        files = [FileRef(f"manifests/{stage}/", hashlib.sha256(listing.encode()).hexdigest(), sum(f.bytes for f in files))]
    return files + [o for r in records if r.unit == stage_record for o in r.outputs]


def record_problems(run_dir: Path, records: Sequence[Record], inputs_now: Iterable[FileRef],
                    cache: DigestCache | None = None, always: Sequence[str] = ALWAYS_HASHED,
                    ) -> list[tuple[Record, list[str], bool]]:
    """The records whose output files are missing or changed (by the cheap rule of `must_hash`), or whose
    inputs inside the run directory differ from `inputs_now` (what the upstream stages hold now):
    (record, what is wrong, whether an input changed). Inputs from outside the run (an absolute path or a
    `scheme:` name, such as ingest's data folder) are checked by their stage, not here."""
    bad = check_refs(run_dir, [o for r in records for o in r.outputs], cache=cache, always=always)
    now = {ref.uri: ref for ref in inputs_now}
    out = []
    for rec in records:
        wrong = [f"output file {o.uri} {bad[o]}" for o in rec.outputs if o in bad]
        stale = [f"input {i.uri} {'is no longer made upstream' if now.get(i.uri) is None else 'has changed'} "
                 "since it ran" for i in rec.inputs
                 if not (Path(i.uri).is_absolute() or ":" in i.uri) and now.get(i.uri) != i]
        if wrong or stale:
            out.append((rec, wrong + stale, bool(stale)))
    return out
