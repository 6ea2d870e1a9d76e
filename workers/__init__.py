"""How units run: in-process (local) or on Ray actors. Only this package imports `ray`."""

from __future__ import annotations

import os

from pipeline.config import Config


def in_ray_job() -> bool:
    """True inside a `ray job submit` entrypoint (the job's driver has RAY_JOB_ID or RAY_ADDRESS)."""
    return bool(os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_ADDRESS"))


def use_ray(cfg: Config) -> bool:
    mode = cfg.executor.kind
    if mode == "auto":
        return in_ray_job() or bool(cfg.executor.address)
    return mode == "ray"


def make_executor(cfg: Config):  # noqa: ANN201 - returns an Executor
    """The executor the config asks for: Ray actors or the in-process executor."""
    if use_ray(cfg):
        from workers.ray_executor import RayExecutor

        return RayExecutor(cfg)
    from workers.local import LocalExecutor

    return LocalExecutor(max_attempts=cfg.executor.max_attempts)
