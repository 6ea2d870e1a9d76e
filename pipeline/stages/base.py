"""The Stage protocol, units of work and the run context shared by driver and workers."""

from __future__ import annotations

import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from manifests.schema import FileRef
from manifests.store import ManifestStore
from pipeline.config import Config
from pipeline.seeding import derive_seed


@dataclass(frozen=True)
class Unit:
    """One idempotent piece of a stage: a deterministic key and a JSON-able payload."""

    key: str
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass
class UnitResult:
    """What a worker returns for a unit: hashed output (and input) files and metrics."""

    outputs: list[FileRef] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    inputs: list[FileRef] = field(default_factory=list)


@dataclass
class Outcome:
    """A unit's result or its error, with timing and where it ran."""

    unit: Unit
    result: UnitResult | None
    error: str = ""
    attempt: int = 1
    started: float = 0.0
    ended: float = 0.0
    host: str = ""
    usage_error: str = ""  # a ConfigError's message: bad input, not worth retrying

    @property
    def ok(self) -> bool:
        return self.result is not None


@dataclass
class RunContext:
    """Everything a stage needs; picklable so it can travel to Ray actors."""

    run_dir: Path
    config: Config
    run_id: str
    hashes: dict[str, str] = field(default_factory=dict)
    code_version: str = ""

    @property
    def store(self) -> ManifestStore:
        return ManifestStore(self.run_dir)

    def path(self, *parts: str) -> Path:
        return Path(self.run_dir).joinpath(*parts)

    def unit_seed(self, stage: str, key: str) -> int:
        return derive_seed(self.config.seed, stage, key)

    def ref(self, path: Path) -> FileRef:
        return FileRef.of(Path(path), Path(self.run_dir))


class UnitWorker(Protocol):
    def run(self, unit: Unit) -> UnitResult: ...

    def close(self) -> None: ...


class Stage:
    """Base class of the stages. Subclasses set the class attributes and override methods.

    - `sections`: config sections in this stage's hash (with the upstream hashes).
    - `distributed`: units go through the executor (local or Ray actors); otherwise the
      driver runs them itself (DDP jobs launch their own workers).
    - `needs_gpu`: a Ray actor for this stage asks for one GPU when the cluster has GPUs.
    """

    name: str = ""
    depends_on: tuple[str, ...] = ()
    sections: tuple[str, ...] = ()
    distributed: bool = False
    needs_gpu: bool = False
    output_dirs: tuple[str, ...] = ()  # folders under the run dir that --fresh clears with the stage's records

    def validate(self, ctx: RunContext) -> None:
        """Check inputs before any work starts; raise ConfigError with a clear message."""

    def plan(self, ctx: RunContext) -> list[Unit]:
        raise NotImplementedError

    def open_worker(self, ctx: RunContext) -> UnitWorker:
        """A worker that runs units; created once per process or actor."""
        raise NotImplementedError

    def finalize(self, ctx: RunContext) -> dict[str, Any]:
        """Runs in the driver when every unit is done; returns stage-level metrics."""
        return {}


def execute(worker: UnitWorker, unit: Unit, attempt: int = 1) -> Outcome:
    """Run one unit and capture its result or its traceback."""
    started = time.time()
    host = socket.gethostname()
    try:
        result = worker.run(unit)
        return Outcome(unit, result, attempt=attempt, started=started, ended=time.time(), host=host)
    except Exception as exc:  # noqa: BLE001 - the traceback goes into the failure record
        from pipeline.config import ConfigError

        usage = str(exc) if isinstance(exc, ConfigError) else ""
        error = "".join(traceback.format_exception(exc))
        if _is_oom(exc):
            error = "out of memory while running this unit (it will be retried)\n" + error
        return Outcome(unit, None, error=error, attempt=attempt, started=started, ended=time.time(), host=host,
                       usage_error=usage)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()
