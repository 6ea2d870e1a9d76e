"""The manifest store: one JSON file per unit under RUN_DIR/manifests/<stage>/.

A record is written to a temporary name, fsynced and renamed into place, so a reader
never sees half a record and a crash before the rename leaves the unit not done.
Failures go to `<unit>.failed.json` beside it (with the traceback) and never count
as done.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from manifests.schema import Record

STAGE_RECORD = "_stage"  # written by the runner once every unit of a stage is done
_SAFE = re.compile(r"^[A-Za-z0-9_.-]+$")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write the whole file to; renamed onto `path` on success.

    The one way outputs are written: a reader (or a resumed run) sees the old file or the whole new
    one, never half of one. Give the temporary path to writers that open the file themselves
    (pyarrow, tarfile, torch.save); on a clean exit of the block it is fsynced and renamed onto
    `path`, on an error deleted. The name (`.<name>.<pid>.<random>.tmp`, same folder, so the rename
    stays on one file system) is unique across processes and threads writing the same path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data is on disk before the rename makes it visible
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through `atomic_path`."""
    with atomic_path(path) as tmp, open(tmp, "xb") as fh:
        fh.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


class ManifestStore:
    """Reads and writes the records of one run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.root = Path(run_dir) / "manifests"

    def _path(self, stage: str, unit: str, failed: bool = False) -> Path:
        if not _SAFE.match(unit) or not _SAFE.match(stage):
            raise ValueError(f"unit key '{stage}/{unit}' may hold only letters, digits, '_', '-', '.'")
        return self.root / stage / (f"{unit}.failed.json" if failed else f"{unit}.json")

    def commit(self, record: Record) -> Path:
        """Atomically write a done record; remove any earlier failure record of the unit."""
        path = self._path(record.stage, record.unit)
        atomic_write_text(path, record.to_json())
        failed = self._path(record.stage, record.unit, failed=True)
        if failed.exists():
            failed.unlink()
        return path

    def fail(self, record: Record) -> Path:
        path = self._path(record.stage, record.unit, failed=True)
        atomic_write_text(path, record.to_json())
        return path

    def load(self, stage: str, unit: str) -> Record | None:
        path = self._path(stage, unit)
        if not path.exists():
            return None
        return Record.from_json(path.read_text())

    def records(self, stage: str) -> list[Record]:
        """Done records of a stage (unit records only, not the stage record)."""
        folder = self.root / stage
        if not folder.is_dir():
            return []
        out = []
        for path in sorted(folder.glob("*.json")):
            if path.name.endswith(".failed.json") or path.stem == STAGE_RECORD:
                continue
            out.append(Record.from_json(path.read_text()))
        return out

    def failures(self, stage: str) -> list[Record]:
        folder = self.root / stage
        if not folder.is_dir():
            return []
        return [Record.from_json(p.read_text()) for p in sorted(folder.glob("*.failed.json"))]

    def done_keys(self, stage: str, config_hash: str) -> set[str]:
        """Units whose done record matches `config_hash`."""
        return {r.unit for r in self.records(stage) if r.config_hash == config_hash}

    def stale_hashes(self, stage: str, config_hash: str) -> set[str]:
        """Config hashes of this stage's records that differ from `config_hash`."""
        hashes = {r.config_hash for r in self.records(stage)}
        stage_rec = self.load(stage, STAGE_RECORD)
        if stage_rec is not None:
            hashes.add(stage_rec.config_hash)
        return {h for h in hashes if h != config_hash}

    def clear(self, stage: str) -> None:
        shutil.rmtree(self.root / stage, ignore_errors=True)

    def stage_done(self, stage: str, config_hash: str) -> bool:
        rec = self.load(stage, STAGE_RECORD)
        return rec is not None and rec.config_hash == config_hash


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
