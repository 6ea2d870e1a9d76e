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
        worker = stage.open_worker(ctx)
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
