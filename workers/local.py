"""In-process executor: one worker, units one after another (tests, laptops)."""

from __future__ import annotations

from collections.abc import Callable

from pipeline.stages.base import Outcome, RunContext, Stage, Unit, execute


class LocalExecutor:
    """Runs units in this process, retrying a failed unit up to `max_attempts` times."""

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
                    if outcome.ok or outcome.usage_error or attempt == self.max_attempts:
                        on_outcome(outcome)
                        break
        finally:
            worker.close()

    def close(self) -> None:
        pass


class _Broken:
    """Stands in for a worker whose start-up failed, so the failure is recorded like a unit's."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def run(self, unit: Unit) -> None:
        raise self.exc
