"""Student optimizer and schedule: AdamW without decay on 1-D parameters, cosine per epoch (SRe2L / DWA)."""

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


def make_optimizer(model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW(lr, weight_decay) over ``param_groups(model, weight_decay)``."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr)


def cosine_schedule(optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay stepped once per epoch: lr factor ``0.5 * (1 + cos(pi * epoch / epochs))``.

    Epoch 0 runs at the base lr; after the ``epochs``-th ``step()`` the factor is 0 (and stays 0 beyond).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")

    def factor(epoch: int) -> float:
        if epoch >= epochs:
            return 0.0
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
