"""Starting or joining a Ray cluster (shared by the Ray executor and the Ray Train launcher)."""

from __future__ import annotations

import logging
import os

import ray

from pipeline.config import ExecutorConfig
from workers import in_ray_job

log = logging.getLogger(__name__)


def connect_ray(ray_cfg: ExecutorConfig) -> bool:
    """Make sure this process is connected to Ray; return True when it started a local cluster itself.

    Order: an already initialised Ray (e.g. inside a task or a previous call) is used as it is; then
    `ray_cfg.address`, then RAY_ADDRESS / a Ray job environment (address "auto"); otherwise a new private
    local cluster with `ray_cfg.num_cpus` / `num_gpus` and no dashboard (`address="local"`, so a cluster
    started elsewhere on this machine with `ray start` is never joined by accident). `_node_ip_address=
    "127.0.0.1"` is not passed: Ray 2.60 resolves loopback to the node's own address anyway.

    No runtime_env is passed: a local cluster's workers inherit this process's environment (venv,
    PYTHONPATH, cwd on sys.path), and a job's driver already carries the job's runtime_env (working_dir
    from `ray job submit --working-dir`), which a new one would replace. Worker logs go to the driver.
    """
    if ray.is_initialized():
        return False
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS", "") or ("auto" if in_ray_job() else "")
    if address:
        # Joining: the job's runtime_env (working_dir, env vars) is inherited; never start a nested cluster.
        log.info("ray: joining the cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return False
    ray.init(
        address="local",  # never attach silently to a cluster started elsewhere with `ray start`
        num_cpus=ray_cfg.num_cpus or None,
        num_gpus=None if ray_cfg.num_gpus < 0 else ray_cfg.num_gpus,
        include_dashboard=False,
        log_to_driver=True,
    )
    log.info("ray: started a local cluster (%s)", describe_cluster())
    return True


def describe_cluster() -> str:
    """Address, CPUs and GPUs of the connected cluster (for log lines)."""
    res = ray.cluster_resources()
    try:
        address = ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - only for the log line
        address = "?"
    return f"address {address}, {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs"
