"""Optimizers and the per-epoch schedule of the teacher and student jobs.

SRe2L / DWA on ImageNet and CIFAR train the student with AdamW (ImageNet: no decay on 1-D parameters) and a
cosine per epoch; their Tiny-ImageNet code uses SGD (momentum 0.9, decay on every parameter) with 5 linear
warm-up epochs from 0.01x before the cosine. Both shapes are expressed here.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two parameter groups: weight decay on tensors with ndim >= 2, none on ndim <= 1 (biases, norm weights).

    Parameters with ``requires_grad=False`` are left out; empty groups are dropped.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": float(weight_decay)},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


OPTIMIZERS = ("adamw", "sgd", "sgd-nesterov")


def make_optimizer(model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.01, *, name: str = "adamw",
                   momentum: float = 0.9, decay_1d: bool = False) -> torch.optim.Optimizer:
    """An optimizer over ``model``'s trainable parameters.

    name: "adamw", "sgd" (momentum, as the official SRe2L / DWA SGD recipes) or "sgd-nesterov".
    decay_1d: False = no weight decay on 1-D tensors (``param_groups``; SRe2L's ImageNet student), True = decay on
    every parameter (the official Tiny-ImageNet and CIFAR code).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if decay_1d:
        params: list[dict] = [{"params": [p for p in model.parameters() if p.requires_grad],
                               "weight_decay": float(weight_decay)}]
    else:
        params = param_groups(model, weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=name == "sgd-nesterov")


def cosine_schedule(optimizer: torch.optim.Optimizer, epochs: int, warmup_epochs: int = 0,
                    warmup_start: float = 0.01) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay stepped once per epoch, after an optional linear warm-up.

    Without warm-up the lr factor of epoch e is ``0.5 * (1 + cos(pi * e / epochs))``: epoch 0 runs at the base
    lr; after the ``epochs``-th ``step()`` the factor is 0 (and stays 0 beyond). With ``warmup_epochs`` = w > 0
    (the official Tiny-ImageNet recipes: w = 5, start 0.01), epoch e < w runs at
    ``warmup_start + (1 - warmup_start) * e / w`` and the cosine then spans the remaining ``epochs - w`` epochs.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not 0 <= warmup_epochs < epochs:
        raise ValueError(f"warmup_epochs must be in [0, epochs) = [0, {epochs}), got {warmup_epochs}")

    def factor(epoch: int) -> float:
        if epoch >= epochs:
            return 0.0
        if epoch < warmup_epochs:
            return warmup_start + (1.0 - warmup_start) * epoch / warmup_epochs
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
