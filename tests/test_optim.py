"""Optimizers and the per-epoch schedule of the teacher and student jobs (pipeline.train.optim)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from pipeline.train.optim import cosine_schedule, make_optimizer


def test_cosine_schedule_with_linear_warmup_as_the_official_tiny_recipes() -> None:
    model = nn.Linear(3, 2)
    opt = make_optimizer(model, lr=0.2, weight_decay=1e-4, name="sgd", decay_1d=True)
    assert isinstance(opt, torch.optim.SGD) and not opt.param_groups[0]["nesterov"]
    assert all(g["weight_decay"] == 1e-4 for g in opt.param_groups)  # decay on the bias too
    sched = cosine_schedule(opt, 20, warmup_epochs=5)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs[0] == pytest.approx(0.2 * 0.01) and lrs[5] == pytest.approx(0.2)
    assert all(a < b for a, b in itertools.pairwise(lrs[:6])) and all(a > b for a, b in itertools.pairwise(lrs[5:]))
    with pytest.raises(ValueError):
        cosine_schedule(opt, 5, warmup_epochs=5)
