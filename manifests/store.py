"""The manifest store: one JSON file per unit under RUN_DIR/manifests/<stage>/.

A record is written to a temporary name, fsynced and renamed into place, so a reader
never sees half a record and a crash before the rename leaves the unit not done.
Failures go to `<unit>.failed.json` beside it (with the traceback) and never count
as done. `run_dir_lock` keeps a second driver off a run directory.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from manifests.schema import Record

STAGE_RECORD = "_stage"  # written by the runner once every unit of a stage is done
LOCK_FILE = ".lock"  # RUN_DIR/.lock: flock'ed by the driver of `distill run`, holds its host and pid
_SAFE = re.compile(r"^[A-Za-z0-9_.-]+$")
_TEMP = re.compile(r"^\.(.+)\.\d+\.[0-9a-f]+\.tmp$")  # atomic_path's temporary of the file named by group 1


class ManifestError(ValueError):
    """A record file that cannot be read (corrupt JSON, another schema): the message names the file."""


class RunDirBusy(RuntimeError):
    """Another process holds the run directory's lock: the message names its host and pid."""


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
    except OSError as exc:
        if exc.filename in (str(tmp), tmp) and exc.errno is not None:  # name the file, not its temporary
            raise type(exc)(exc.errno, exc.strerror, str(path)) from exc
        raise
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only or vanished folder: the error above (if any) is the one to report


def remove_stale_temps(paths: Iterable[Path]) -> int:
    """Delete the temporaries `atomic_path` left beside `paths` when a writer was killed; returns how many.

    Called once the paths are committed (their unit's record written), when no writer of them can be
    running. Each folder is listed once, however many of the paths it holds.
    """
    by_folder: dict[Path, set[str]] = {}
    for path in map(Path, paths):
        by_folder.setdefault(path.parent, set()).add(path.name)
    removed = 0
    for folder, names in by_folder.items():
        try:
            with os.scandir(folder) as it:
                stale = [e.path for e in it if (m := _TEMP.match(e.name)) and m.group(1) in names]
        except OSError:
            continue
        for tmp in stale:
            try:
                os.unlink(tmp)
                removed += 1
            except OSError:
                pass
    return removed


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
        """Atomically write a done record; remove any earlier failure record of the unit and the temporaries
        that killed writers left beside the record and beside the unit's outputs."""
        path = self._path(record.stage, record.unit)
        atomic_write_text(path, record.to_json())
        failed = self._path(record.stage, record.unit, failed=True)
        if failed.exists():
            failed.unlink()
        remove_stale_temps([path, failed, *(self.root.parent / o.uri for o in record.outputs)])
        return path

    def discard(self, stage: str, unit: str) -> None:
        """Forget a done record (its unit runs again) and the stage record (the stage is no longer complete)."""
        for name in {unit, STAGE_RECORD}:
            self._path(stage, name).unlink(missing_ok=True)

    def fail(self, record: Record) -> Path:
        path = self._path(record.stage, record.unit, failed=True)
        atomic_write_text(path, record.to_json())
        return path

    def load(self, stage: str, unit: str) -> Record | None:
        path = self._path(stage, unit)
        if not path.exists():
            return None
        return read_record(path)

    def records(self, stage: str) -> list[Record]:
        """Done records of a stage (unit records only, not the stage record)."""
        folder = self.root / stage
        if not folder.is_dir():
            return []
        out = []
        for path in sorted(folder.glob("*.json")):
            if path.name.endswith(".failed.json") or path.stem == STAGE_RECORD:
                continue
            out.append(read_record(path))
        return out

    def failures(self, stage: str) -> list[Record]:
        folder = self.root / stage
        if not folder.is_dir():
            return []
        return [read_record(p) for p in sorted(folder.glob("*.failed.json"))]

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


def read_record(path: Path) -> Record:
    """The record in `path`; ManifestError naming the file and the cause when it cannot be read."""
    try:
        return Record.from_json(Path(path).read_text())
    except OSError as exc:
        raise ManifestError(f"record {path} cannot be read: {exc.strerror or exc}") from None
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ManifestError(f"record {path} is corrupt ({type(exc).__name__}: {exc}); delete it and run again: "
                            "its unit runs again") from None


def _lock_holder(fd: int, wait_s: float = 1.0) -> dict[str, Any]:
    """The host and pid the lock's holder wrote into the file. A holder that has just taken the lock writes
    them a moment later (between its `flock` and its write the file is empty), so an empty or partly written
    file is read again for up to `wait_s` seconds; {} if it stays so."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            holder = {}
        if holder or time.monotonic() >= deadline:
            return holder if isinstance(holder, dict) else {}
        time.sleep(0.02)


@contextmanager
def run_dir_lock(run_dir: Path, on_busy: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold an exclusive `flock` on RUN_DIR/.lock for the block: one driver per run directory.

    The kernel releases the lock when the holder exits, however it dies, so a killed driver never leaves
    the directory locked. The holder writes its host and pid into the file; a second caller gets
    RunDirBusy naming them at once (no waiting), or, with `on_busy`, has it called once with the holder's
    description ("host H, pid P, since T") and then waits for the lock (callers that share a run directory on
    purpose). Readers (`distill status`, `distill collect`) take no lock.
    """
    path = Path(run_dir) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = _lock_holder(fd)
            who = (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since "
                   f"{holder.get('started', '?')}") if holder else "a driver that is starting and has not yet " \
                                                                      "written its host and pid"
            if on_busy is None:
                raise RunDirBusy(f"run directory {run_dir} is in use by another `distill run` ({who}); wait for it "
                                 "to end or stop it: its lock goes with the process") from None
            on_busy(who)
            fcntl.flock(fd, fcntl.LOCK_EX)  # blocks until the holder ends, however it ends
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode() + b"\n", 0)
        yield path
    finally:
        os.close(fd)  # releases the lock
