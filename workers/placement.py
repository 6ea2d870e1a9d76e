"""Whether a run goes to Ray: inside a Ray job, or as `executor.kind` / `executor.address` ask (no `ray` import)."""

from __future__ import annotations

import os

from pipeline.config import Config


def in_ray_job() -> bool:
    """True inside a `ray job submit` entrypoint (the job's driver has RAY_JOB_ID or RAY_ADDRESS)."""
    return bool(os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_ADDRESS"))


def use_ray(cfg: Config) -> bool:
    """`executor.kind` resolved: ray, or auto inside a Ray job or with `executor.address` set."""
    mode = cfg.executor.kind
    if mode == "auto":
        return in_ray_job() or bool(cfg.executor.address)
    return mode == "ray"
