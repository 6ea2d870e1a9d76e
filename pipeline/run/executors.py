"""How units of work and DDP jobs run: the in-process executor (the protocol is `pipeline.run.base.Executor`).

An executor is handed to the runner by its caller (the CLI composes `workers.make_executor`, which picks
Ray or this module's `LocalExecutor`); `pipeline` itself never imports `workers`, so everything here works
where Ray is not installed. An executor does two things:

- `run_units`: run a distributed stage's units (ingest, recover, relabel), calling back once per unit with
  its success or its last failure;
- `launch_ddp`: run a DDP job function (the squeeze and train jobs) on several ranks and return rank 0's
  value. Stages reach it through `RunContext.executor`, which the runner sets in the driver.
"""

from __future__ import annotations

import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

from pipeline.run.base import Executor, JobSpec, Outcome, RunContext, Stage, Unit, UnitWorker

__all__ = ["Executor", "LocalExecutor", "execute"]


def execute(worker: UnitWorker, unit: Unit, attempt: int = 1) -> Outcome:
    """Run one unit and capture its result or its traceback."""
    from pipeline.run.cost import start_unit, unit_usage

    started = time.time()
    host = socket.gethostname()
    try:
        start_unit()
        result = worker.run(unit)
        ended = time.time()
        if result is not None:  # the cost keys of every record (pipeline.run.cost)
            result.metrics = {**result.metrics, **unit_usage(ended - started, result.metrics)}
        return Outcome(unit, result, attempt=attempt, started=started, ended=ended, host=host)
    except Exception as exc:  # noqa: BLE001 - the traceback goes into the failure record
        from pipeline.core.errors import ConfigError

        usage = str(exc) if isinstance(exc, ConfigError) else ""
        error = "".join(traceback.format_exception(exc))
        if _is_oom(exc):
            error = "out of memory while running this unit (it will be retried)\n" + error
        return Outcome(unit, None, error=error, attempt=attempt, started=started, ended=time.time(), host=host,
                       usage_error=usage)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()


class LocalExecutor:
    """Runs units in this process, one after another, retrying a failed unit up to `max_attempts` times;
    DDP jobs run on local processes (gloo on CPU, nccl with one GPU per rank)."""

    def __init__(self, max_attempts: int = 1) -> None:
        self.max_attempts = max(1, max_attempts)

    def run_units(
        self, stage: Stage, ctx: RunContext, units: list[Unit], on_outcome: Callable[[Outcome], None]
    ) -> None:
        try:
            worker = stage.open_worker(ctx)
        except Exception as exc:  # noqa: BLE001 - a worker that cannot start fails its units, with the reason
            outcome = execute(_Broken(exc), units[0]) if units else None
            for unit in units:
                on_outcome(Outcome(unit, None, error=outcome.error, usage_error=outcome.usage_error,
                                   started=outcome.started, ended=outcome.ended, host=outcome.host))
            return
        try:
            for unit in units:
                for attempt in range(1, self.max_attempts + 1):
                    outcome = execute(worker, unit, attempt)
                    # a ConfigError is bad input: the same unit would fail the same way again
                    if outcome.ok or outcome.usage_error or attempt == self.max_attempts:
                        on_outcome(outcome)
                        break
        finally:
            worker.close()

    def launch_ddp(self, fn: Callable[[JobSpec], dict[str, Any]], spec: JobSpec, workers: int) -> dict[str, Any]:
        import torch

        from pipeline.train.ddp import launch_local

        workers = workers or max(1, torch.cuda.device_count())  # 0 = one process per local GPU
        return launch_local(fn, spec, workers)

    def close(self) -> None:
        pass


class _Broken:
    """Stands in for a worker whose start-up failed, so the failure is recorded like a unit's."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def run(self, unit: Unit) -> None:
        raise self.exc

    def close(self) -> None:
        pass
