"""Ray-specific execution: the Ray executor (actors, work queue), Ray Train, cluster start / join.

Only this package imports `ray`; `pipeline` never imports it (nor this package). The executor protocol is
`pipeline.run.base.Executor`, the in-process executor `pipeline.run.executors`; `make_executor` is the factory a
caller (the CLI) uses to pick one from the config.
"""

from __future__ import annotations

from pipeline.config import Config
from pipeline.run.base import Executor
from workers.placement import in_ray_job, use_ray

__all__ = ["in_ray_job", "make_executor", "use_ray"]


def make_executor(cfg: Config) -> Executor:
    """The executor the config asks for: Ray (actors + Ray Train) or the in-process `LocalExecutor`.

    Ray is imported only for the Ray executor, so a local run works where Ray is not installed.
    """
    if use_ray(cfg):
        from workers.ray_executor import RayExecutor

        return RayExecutor(cfg)
    from pipeline.run.executors import LocalExecutor

    return LocalExecutor(max_attempts=cfg.executor.max_attempts)
