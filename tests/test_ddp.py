"""DDP helpers: local multi-process launch (gloo) and the local executor's `launch_ddp`. (Ray Train with two
gloo ranks runs in tests/test_deploy.py: the demo job's squeeze.)"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.train.ddp import (
    all_reduce_sum,
    barrier,
    device_for_rank,
    dist_info,
    init_from_env,
    is_rank0,
    launch_local,
)

STEPS = 4


def _batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 2)


def train_job(arg: dict) -> dict:
    """A few DDP steps, each rank on its own data; returns every rank's flat parameters (gathered)."""
    init_from_env()
    rank, world, _ = dist_info()
    model = _model()  # CPU on purpose: this checks gloo DDP, also on a machine with GPUs
    net = DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(net.parameters(), lr=arg["lr"])
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(STEPS):
        x, y = _batch(gen)
        loss = F.mse_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    if world > 1:
        dist.all_gather(gathered, flat)
    else:
        gathered = [flat]
    barrier()
    return {"rank": rank, "world": world, "rank0": is_rank0(), "params": [t.tolist() for t in gathered]}


def failing_job(arg: None) -> str:
    rank = dist_info()[0]
    if rank == 1:
        raise ValueError("boom on rank 1")
    barrier()  # rank 0 would wait forever here: the launcher must stop it
    return "unreachable"


def reduce_job(arg: str) -> dict:
    init_from_env()  # no-op under Ray Train
    rank, world, _ = dist_info()
    total = all_reduce_sum(torch.tensor([float(rank + 1)]))
    return {"rank": rank, "world": world, "sum": float(total[0]), "arg": arg}


def _reference(world: int, lr: float) -> torch.Tensor:
    """Single-process replay: DDP's averaged gradient equals the mean of the per-rank losses' gradients."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gens = [torch.Generator().manual_seed(100 + r) for r in range(world)]
    for _ in range(STEPS):
        batches = [_batch(g) for g in gens]
        loss = sum(F.mse_loss(model(x), y) for x, y in batches) / world
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_helpers_are_no_ops_without_a_process_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert dist_info() == (0, 1, 0) and is_rank0() and not init_from_env()
    t = torch.ones(3)
    assert all_reduce_sum(t) is t and torch.equal(t, torch.ones(3))
    barrier()
    assert device_for_rank().type in ("cpu", "cuda")
    out = launch_local(train_job, {"lr": 0.1}, 1)  # in process
    assert out["world"] == 1 and torch.allclose(torch.tensor(out["params"][0]), _reference(1, 0.1), atol=1e-6)


def test_local_executor_launches_ddp_jobs_without_ray():
    from pipeline.run.executors import LocalExecutor

    assert LocalExecutor().launch_ddp(reduce_job, "x", 1) == {"rank": 0, "world": 1, "sum": 1.0, "arg": "x"}
    out = LocalExecutor().launch_ddp(reduce_job, "y", 2)  # two spawned gloo ranks
    assert out == {"rank": 0, "world": 2, "sum": 3.0, "arg": "y"}


def test_launch_local_ddp_keeps_ranks_in_sync():
    out = launch_local(train_job, {"lr": 0.1}, 2, backend="gloo")
    assert out["rank"] == 0 and out["world"] == 2 and out["rank0"]
    p0, p1 = (torch.tensor(p) for p in out["params"])
    assert torch.equal(p0, p1)  # identical parameters on both ranks
    assert torch.allclose(p0, _reference(2, 0.1), atol=1e-6)  # gradients were averaged over both ranks' data
    assert not torch.allclose(p0, _reference(1, 0.1), atol=1e-4)  # and the ranks did see different data


def test_launch_local_reports_the_failing_rank():
    with pytest.raises(RuntimeError, match="^DDP rank 1 of 2 failed") as info:
        launch_local(failing_job, None, 2, backend="gloo")
    assert "boom on rank 1" in str(info.value) and "Traceback" in str(info.value)
