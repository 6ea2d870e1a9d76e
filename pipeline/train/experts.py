"""Expert training for trajectory matching: a network from scratch on the real training images, its parameters
kept at every epoch boundary (MTT's `buffer.py`; DATM's and PAD's buffer scripts).

What the official buffers do and this module reproduces (MTT: Cazenavette et al., CVPR 2022,
github.com/GeorgeCazenavette/mtt-distillation): a ConvNet-3 with instance norm, SGD (lr 0.01, no momentum, no
weight decay), batch 256, the real training set shuffled every epoch, DSA augmentation on every batch, no lr
decay; the parameters before the first epoch and after each epoch are the trajectory.

PAD's data scheduler (Li et al., 2024, github.com/NUS-HPC-AI-Lab/PAD) trains on a per-class, easy-first slice
of the data that grows and then loses its easiest part (`scheduled_rows`); the difficulty scores come from the
caller (the experts stage). Deviations: every epoch's order and augmentation draws are keyed by (experts seed,
expert, epoch), so a resumed expert continues with the same draws and a file is the same bytes on CPU; the
experts use plain SGD where DATM and PAD use GSAM (docs/methods.md says what that changes).

Pure compute: tensors in, snapshots out; the stage owns files and checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.core.seeding import derive_seed, generator
from pipeline.models import build_model


@dataclass(frozen=True)
class PadSchedule:
    """PAD's easy-to-hard data scheduler (`experts.schedule = pad`), as fractions of each class ordered easy first.

    Epochs [0, add_end_epoch): the easiest `init_ratio` share, growing linearly to all of it at add_end_epoch;
    from remove_start_epoch the easiest `remove_ratio_1` share is left out, from remove_second_epoch the easiest
    `remove_ratio_2` share.
    """

    init_ratio: float = 0.75
    add_end_epoch: int = 20
    remove_start_epoch: int = 40
    remove_ratio_1: float = 0.1
    remove_second_epoch: int = 60
    remove_ratio_2: float = 0.2

    def window(self, epoch: int) -> tuple[float, float]:
        """(lo, hi): the share of each class's easy-first order trained in `epoch` is [lo, hi)."""
        if epoch < self.add_end_epoch:
            hi = self.init_ratio + (1.0 - self.init_ratio) * epoch / max(1, self.add_end_epoch)
        else:
            hi = 1.0
        lo = 0.0
        if epoch >= self.remove_second_epoch:
            lo = self.remove_ratio_2
        elif epoch >= self.remove_start_epoch:
            lo = self.remove_ratio_1
        return lo, hi


@dataclass(frozen=True)
class ExpertSpec:
    """How one expert is trained (every field is part of the experts' cache key)."""

    arch: str
    num_classes: int
    resolution: int
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    dsa_strategy: str  # "" = no augmentation
    seed: int  # `experts.seed`: init, order and augmentation of every expert
    pad: PadSchedule | None = None  # None = all of the data every epoch


def scheduled_rows(easy_first: Sequence[torch.Tensor], epoch: int, pad: PadSchedule | None) -> torch.Tensor:
    """The rows trained in `epoch`: every row without a schedule, else each class's slice [lo, hi) of its easy-first
    order (at least one row per class)."""
    if pad is None:
        return torch.cat(list(easy_first)).sort().values
    lo, hi = pad.window(epoch)
    parts = []
    for rows in easy_first:
        n = len(rows)
        a, b = math.floor(lo * n), max(math.floor(lo * n) + 1, math.ceil(hi * n))
        parts.append(rows[a:min(b, n)])
    return torch.cat(parts).sort().values


def new_expert(spec: ExpertSpec, index: int, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The expert's network (initialized from (experts seed, index)) and its SGD optimizer."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(spec.seed, "experts", index, "init"))
        model = build_model(spec.arch, spec.num_classes, spec.resolution)
    model = model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    return model, opt


def train_expert_epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, x_all: torch.Tensor,
                       labels: torch.Tensor, rows: torch.Tensor, spec: ExpertSpec, index: int, epoch: int,
                       device: torch.device) -> tuple[float, float]:
    """One epoch over `rows` of the normalized images `x_all` (CPU): a seeded order, DSA per image, CE, one SGD step
    per batch. Returns (mean loss, train accuracy) of the epoch."""
    from pipeline.augment.dsa import augment

    model.train()
    order = rows[torch.randperm(len(rows), generator=generator(spec.seed, "experts", index, epoch, "order"))]
    total = torch.zeros(3, dtype=torch.float64, device=device)
    for b in range(0, len(order), spec.batch_size):
        ids = order[b:b + spec.batch_size]
        x, y = x_all[ids].to(device), labels[ids].to(device)
        if spec.dsa_strategy:
            x = augment(x, generator(spec.seed, "experts", index, epoch, "dsa", b), spec.dsa_strategy,
                        per_sample=True)
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += torch.stack([loss.detach().double() * len(ids), (out.argmax(1) == y).sum().double(),
                              torch.tensor(float(len(ids)), dtype=torch.float64, device=device)])
    t = total.cpu()
    return float(t[0] / max(1.0, float(t[2]))), float(t[1] / max(1.0, float(t[2])))


def train_expert(spec: ExpertSpec, index: int, x_all: torch.Tensor, labels: torch.Tensor,
                 easy_first: Sequence[torch.Tensor], device: torch.device, state: dict[str, Any] | None = None,
                 on_epoch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train expert `index` for `spec.epochs` epochs, resuming from `state` (what `on_epoch` was last given);
    returns the final state: {"epoch", "snapshots" [epochs + 1, P], "model", "opt", "history"} and, under
    "network", the trained module itself (on `device`; not part of what `on_epoch` is given).

    `on_epoch(state)` is called after every epoch with the state to resume from (the stage saves it)."""
    from pipeline.data.trajectories import flat_parameters

    model, opt = new_expert(spec, index, device)
    if state is None:
        state = {"epoch": 0, "snapshots": [flat_parameters(model)], "history": []}
    else:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        state = {**state, "snapshots": list(state["snapshots"])}
    for epoch in range(int(state["epoch"]), spec.epochs):
        rows = scheduled_rows(easy_first, epoch, spec.pad)
        loss, acc = train_expert_epoch(model, opt, x_all, labels, rows, spec, index, epoch, device)
        state = {"epoch": epoch + 1, "snapshots": [*state["snapshots"], flat_parameters(model)],
                 "history": [*state["history"], {"epoch": epoch + 1, "loss": round(loss, 5), "train_acc": round(acc, 5),
                                                 "images": len(rows)}],
                 "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                 "opt": opt.state_dict()}
        if on_epoch is not None:
            on_epoch(state)
    return {**state, "network": model}
