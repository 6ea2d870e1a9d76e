"""Cost accounting: what each unit used (wall seconds, device seconds, peak memory) and the run's totals.

Every unit's record gets, beside its own metrics (`execute` adds them when the unit did not):

- `wall_s`: seconds the unit ran;
- `device`: `cuda` or `cpu`;
- `device_s`: wall seconds times the devices the unit held: its GPUs on CUDA (the DDP world size of a job, a
  fraction for a student sharing a GPU: `DISTILL_GPU_SHARE`, set by the Ray executor in its actors), 1 on CPU;
- `peak_memory_bytes`: `torch.cuda.max_memory_allocated` on CUDA (reset when the unit starts); on CPU the peak
  resident set of the process that ran it and of its finished children (a process's lifetime peak, so an
  upper bound for the unit when one process ran several units).

`run_cost` sums them per stage from the records: device hours, and GPU hours (the device seconds of CUDA units),
without the baseline stage, whose hours are given apart (baselines can be shared by many runs).
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Iterable, Mapping
from typing import Any

GPU_SHARE_ENV = "DISTILL_GPU_SHARE"


def _cuda_in_use() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized())


def start_unit() -> None:
    """Reset the CUDA peak-memory counter before a unit runs (nothing to do on CPU)."""
    if _cuda_in_use():
        import torch

        torch.cuda.reset_peak_memory_stats()


def peak_rss_bytes() -> int:
    """The peak resident set of this process and of its waited-for children, in bytes (Linux: ru_maxrss in KiB)."""
    scale = 1 if sys.platform == "darwin" else 1024
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return int(max(own, kids) * scale)


def unit_usage(wall_s: float, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The cost keys for a unit that ran `wall_s` seconds and reported `metrics` (its own values win)."""
    cuda = _cuda_in_use()
    if cuda:
        import torch

        peak = int(torch.cuda.max_memory_allocated())
        share = float(os.environ.get(GPU_SHARE_ENV) or 1.0)
        devices = float(metrics.get("world_size") or 1) * share
    else:
        peak, devices = peak_rss_bytes(), 1.0
    usage = {"wall_s": round(wall_s, 3), "device": "cuda" if cuda else "cpu",
             "device_s": round(wall_s * devices, 3), "peak_memory_bytes": peak}
    return {k: metrics.get(k, v) if metrics.get(k) is not None else v for k, v in usage.items()}


def stage_cost(metrics: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """A stage's totals from its units' metrics: wall and device seconds summed, the largest peak memory, and
    the GPU seconds (device seconds of CUDA units)."""
    wall = device = gpu = 0.0
    peak = 0
    units = 0
    for m in metrics:
        units += 1
        wall += float(m.get("wall_s") or 0.0)
        device += float(m.get("device_s") or m.get("wall_s") or 0.0)
        if m.get("device") == "cuda":
            gpu += float(m.get("device_s") or 0.0)
        peak = max(peak, int(m.get("peak_memory_bytes") or 0))
    return {"units": units, "wall_s": round(wall, 3), "device_s": round(device, 3), "gpu_s": round(gpu, 3),
            "peak_memory_bytes": peak or None}


def run_cost(stages: Mapping[str, dict[str, Any]], apart: tuple[str, ...] = ("baseline",)) -> dict[str, Any]:
    """The run's totals from `stage_cost` per stage: device hours and GPU hours of making and scoring the
    distilled set; the stages in `apart` (the baselines, which other runs may share) are counted separately."""
    own = {k: c for k, c in stages.items() if k not in apart}
    device_s = sum(float(c.get("device_s") or 0.0) for c in own.values())
    gpu_s = sum(float(c.get("gpu_s") or 0.0) for c in own.values())
    other = sum(float(c.get("device_s") or 0.0) for k, c in stages.items() if k in apart)
    return {"stages": dict(stages), "device": "cuda" if gpu_s > 0 else "cpu",
            "device_hours": round(device_s / 3600.0, 6), "gpu_hours": round(gpu_s / 3600.0, 6),
            "baseline_device_hours": round(other / 3600.0, 6)}
