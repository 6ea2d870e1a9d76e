"""DDP jobs on Ray Train (TorchTrainer): the Ray executor's `launch_ddp`.

The job function is the same everywhere: `fn(spec)` written with `pipeline.train.ddp` helpers runs unchanged
under torchrun, under the local executor (`pipeline.train.ddp.launch_local`) and under Ray Train (which
initialises the process group itself, so `init_from_env()` is a no-op there). Which launcher runs a job
is the executor's choice (`workers.make_executor`), not this module's.

Rank 0's return value comes back through a tiny mailbox actor, not through `Result.metrics` (Train V2
may return None there) and not through a file (rank 0 may run on another node than the driver).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import ray

from pipeline.config import ExecutorConfig
from workers.cluster import connect_ray, disconnect_ray

log = logging.getLogger(__name__)
JobSpec = TypeVar("JobSpec")


class _Mailbox:
    """Holds rank 0's return value for the driver (0 CPUs; wrapped with ray.remote at use)."""

    def __init__(self) -> None:
        self._value: Any = None
        self._set = False

    def put(self, value: Any) -> None:
        self._value, self._set = value, True

    def get(self) -> tuple[bool, Any]:
        return self._set, self._value


def _train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: call the job function, hand rank 0's value to the mailbox."""
    from pipeline.train.ddp import dist_info, init_from_env

    init_from_env()  # no-op: Ray Train has set up the process group
    value = config["fn"](config["arg"])
    if dist_info()[0] == 0:
        ray.get(config["mailbox"].put.remote(value))


def launch_ray_train(
    fn: Callable[[JobSpec], Any], arg: JobSpec, num_workers: int, use_gpu: bool, cpus_per_worker: int = 1,
    storage_path: str | Path | None = None, name: str | None = None, max_failures: int = 0,
) -> Any:
    """Run `fn(arg)` on `num_workers` Ray Train workers (DDP) and return rank 0's return value.

    `use_gpu` is honoured only when the cluster has GPUs (workers capped to the GPU count); CPU workers
    use gloo. Workers are capped to what the cluster can hold so the job never waits forever.
    `storage_path` is Ray Train's run storage (a temporary folder, removed afterwards, when None; it must be
    shared storage on a multi-node cluster). Connects to Ray (or starts a local cluster, shut down after)
    when this process is not connected yet. Raises RuntimeError when the job fails.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    owns = connect_ray(ExecutorConfig())
    tmp = None
    try:
        cluster = ray.cluster_resources()
        gpus = int(cluster.get("GPU", 0))
        cpus = int(cluster.get("CPU", 0))
        if use_gpu and gpus == 0:
            log.warning("ray train: no GPU in the cluster; running %d CPU workers (gloo)", num_workers)
        use_gpu = use_gpu and gpus > 0
        if use_gpu and num_workers > gpus:
            log.warning("ray train: %d workers asked, the cluster has %d GPUs; using %d", num_workers, gpus, gpus)
            num_workers = gpus
        if not use_gpu and cpus and num_workers * cpus_per_worker > cpus:
            fit = max(1, cpus // cpus_per_worker)
            log.warning("ray train: %d workers x %d CPUs do not fit in %d CPUs; using %d", num_workers,
                        cpus_per_worker, cpus, fit)
            num_workers = fit
            cpus_per_worker = min(cpus_per_worker, cpus)
        if storage_path is None:
            tmp = tempfile.mkdtemp(prefix="distill-train-")
            storage_path = tmp
        name = name or f"ddp-{uuid.uuid4().hex[:8]}"
        mailbox = ray.remote(_Mailbox).options(num_cpus=0).remote()
        trainer = TorchTrainer(
            train_loop_per_worker=_train_loop,
            train_loop_config={"fn": fn, "arg": arg, "mailbox": mailbox},
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": cpus_per_worker}),
            run_config=RunConfig(storage_path=str(Path(storage_path).resolve()), name=name,
                                 failure_config=FailureConfig(max_failures=max_failures)),
        )
        log.info("ray train: %s on %d %s workers", name, num_workers, "GPU" if use_gpu else "CPU")
        try:
            result = trainer.fit()
        except Exception as exc:
            raise RuntimeError(f"Ray Train job {name} failed: {exc}") from exc
        error = getattr(result, "error", None)
        if error is not None:
            raise RuntimeError(f"Ray Train job {name} failed: {error}") from error
        got, value = ray.get(mailbox.get.remote())
        ray.kill(mailbox)
        if not got:
            raise RuntimeError(f"Ray Train job {name} finished but rank 0 returned no value")
        return value
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        disconnect_ray(owns)


def launch_on_cluster(
    fn: Callable[[JobSpec], dict[str, Any]], spec: JobSpec, num_workers: int, cpus_per_worker: int = 1,
    storage_path: str | Path | None = None,
) -> dict[str, Any]:
    """The Ray executor's `launch_ddp`: `fn(spec)` on Ray Train in the connected cluster; rank 0's value.

    GPU workers when the cluster has GPUs, CPU workers with gloo otherwise; `num_workers` 0 means one
    worker per GPU of the cluster (1 without GPUs).
    """
    gpus = int(ray.cluster_resources().get("GPU", 0))
    num_workers = num_workers or max(1, gpus)
    log.info("DDP job on Ray Train: %d %s worker(s)", num_workers, "GPU" if gpus else "CPU")
    return launch_ray_train(fn, spec, num_workers, use_gpu=gpus > 0, cpus_per_worker=cpus_per_worker,
                            storage_path=storage_path)
