"""Job functions for DDP tests of the student (module level, so spawned ranks can import them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def train_and_dump(job: dict[str, Any]) -> dict[str, Any]:
    """`train_student(job["args"])` on this rank, then save this rank's model state and optimizer step count.

    Writes `job["out"]/rank{R}.pt` holding {"params", "buffers", "steps", "metrics"}: the parameters and
    buffers of this rank's model after training and the number of `optimizer.step()` calls it made.
    The model and optimizer are caught by wrapping `wrap_ddp` / `make_optimizer` in `pipeline.train.student`.
    """
    import pipeline.train.student as student
    from pipeline.train.ddp import dist_info

    caught: dict[str, Any] = {"steps": 0}
    orig_wrap, orig_opt = student.wrap_ddp, student.make_optimizer

    def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        caught["model"] = model
        return orig_wrap(model, device)

    def make_opt(model: torch.nn.Module, **kw: Any) -> torch.optim.Optimizer:
        opt = orig_opt(model, **kw)

        def count(*_: Any) -> None:
            caught["steps"] += 1

        opt.register_step_post_hook(count)
        return opt

    student.wrap_ddp, student.make_optimizer = wrap, make_opt
    try:
        metrics = student.train_student(job["args"])
    finally:
        student.wrap_ddp, student.make_optimizer = orig_wrap, orig_opt
    model = caught["model"]
    rank = dist_info()[0]
    torch.save({"params": {k: v.detach().clone() for k, v in model.named_parameters()},
                "buffers": {k: v.detach().clone() for k, v in model.named_buffers()},
                "steps": caught["steps"], "metrics": metrics}, Path(job["out"]) / f"rank{rank}.pt")
    return metrics
