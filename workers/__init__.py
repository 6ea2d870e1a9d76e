"""Ray-specific execution: the Ray executor (actors, work queue), Ray Train, cluster start / join.

Only this package imports `ray`; `pipeline` never imports it (nor this package). The executor protocol
and the in-process executor are `pipeline.executors`; `make_executor` is the factory a caller (the CLI)
uses to pick one from the config.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from pipeline.config import Config

if TYPE_CHECKING:
    from pipeline.executors import Executor


def in_ray_job() -> bool:
    """True inside a `ray job submit` entrypoint (the job's driver has RAY_JOB_ID or RAY_ADDRESS)."""
    return bool(os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_ADDRESS"))


def use_ray(cfg: Config) -> bool:
    """`executor.kind` resolved: ray, or auto inside a Ray job or with `executor.address` set."""
    mode = cfg.executor.kind
    if mode == "auto":
        return in_ray_job() or bool(cfg.executor.address)
    return mode == "ray"


def make_executor(cfg: Config) -> Executor:
    """The executor the config asks for: Ray (actors + Ray Train) or the in-process `LocalExecutor`.

    Ray is imported only for the Ray executor, so a local run works where Ray is not installed.
    """
    if use_ray(cfg):
        from workers.ray_executor import RayExecutor

        return RayExecutor(cfg)
    from pipeline.executors import LocalExecutor

    return LocalExecutor(max_attempts=cfg.executor.max_attempts)
