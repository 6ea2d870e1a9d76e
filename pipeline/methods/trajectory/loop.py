"""The outer loop of trajectory matching (MTT, and DATM / PAD's additions): each iteration samples an expert and a
start epoch, runs the inner loop (`unroll`) and moves the images (and the learned labels and step size).

MTT (`distill.py` of github.com/GeorgeCazenavette/mtt-distillation): a random expert, a start epoch t uniform in
[0, max_start_epoch), target theta*_{t + expert_epochs}; SGD with momentum 0.5 on the images (lr_img) and on the
step size (lr_lr). DATM (Guo et al., ICLR 2024, github.com/NUS-HPC-AI-Lab/DATM) and PAD add: t uniform in
[min_start_epoch, upper) where upper grows from `start_upper` to max_start_epoch over the first
`start_growth_iterations` iterations; learned soft labels (logits, SGD with their own lr and momentum); and an
update applied only when the iteration's loss is at most `loss_threshold`.

Every random choice comes from the unit's generator; the loop's whole state can be saved at iteration boundaries
(`LoopCheckpoint`) and resumed to the same bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pipeline.methods.trajectory.unroll import FlatNet, InnerLoop, tesla, unrolled


@dataclass(frozen=True)
class TrajectoryMatching:
    """The outer loop's settings (every `auto` resolved by the method)."""

    iterations: int
    inner: InnerLoop
    expert_epochs: int  # M: the target is M epochs after the start
    max_start_epoch: int  # t < max_start_epoch
    min_start_epoch: int = 0
    start_upper: int = 0  # DATM: the first upper bound of t (0 = max_start_epoch from the start, as MTT)
    start_growth_iterations: int = 0  # DATM: iterations over which the upper bound grows to max_start_epoch
    lr_img: float = 1000.0
    lr_lr: float = 1e-5
    lr_label: float = 0.0  # 0 = labels are not learned
    momentum: float = 0.5  # images' and step size's SGD momentum
    label_momentum: float = 0.9
    loss_threshold: float = math.inf  # DATM: no update when the loss is above it


def start_window(s: TrajectoryMatching, it: int) -> tuple[int, int]:
    """[lo, hi) of the start epoch at iteration `it`."""
    hi = s.max_start_epoch
    if s.start_upper and s.start_growth_iterations:
        frac = min(1.0, it / s.start_growth_iterations)
        hi = int(s.start_upper + (s.max_start_epoch - s.start_upper) * frac)
    hi = max(hi, s.min_start_epoch + 1)
    return s.min_start_epoch, hi


def _randint(lo: int, hi: int, gen: torch.Generator) -> int:
    return int(torch.randint(lo, hi, (1,), generator=gen))


def trajectory_matching(images: Tensor, labels: Tensor, syn_lr: float, reader: Any, net: FlatNet,
                        gen: torch.Generator, s: TrajectoryMatching,
                        ckpt: Any = None) -> tuple[Tensor, Tensor, float, dict[str, Tensor]]:
    """Optimize `images` [n, 3, H, W] (normalized) with `labels` (int [n] hard labels, or float [n, C] logits, learned
    when `s.lr_label` > 0) and the step size starting at `syn_lr`, against `reader`'s experts.

    Returns (images, labels, learned step size, history: per-iteration `total` loss, `start_epoch`, `syn_lr`,
    `applied` (1 = the update was made))."""
    device = images.device
    x = images.detach().clone().requires_grad_(True)
    y = labels.detach().clone()
    learn_y = s.lr_label > 0 and y.is_floating_point()
    if learn_y:
        y.requires_grad_(True)
    lr = torch.tensor(float(syn_lr), device=device, requires_grad=True)
    opts = {"img": torch.optim.SGD([x], lr=s.lr_img, momentum=s.momentum),
            "lr": torch.optim.SGD([lr], lr=s.lr_lr, momentum=s.momentum)}
    if learn_y:
        opts["label"] = torch.optim.SGD([y], lr=s.lr_label, momentum=s.label_momentum)
    hist = {k: torch.zeros(s.iterations, device=device) for k in ("total", "start_epoch", "syn_lr", "applied")}
    it0 = _resume(ckpt, x, y, lr, opts, gen, hist, s.iterations)
    inner = tesla if s.inner.memory == "tesla" else unrolled
    for it in range(it0, s.iterations):
        expert = _randint(0, reader.num_experts, gen)
        lo, hi = start_window(s, it)
        t = _randint(lo, hi, gen)
        start = reader.snapshot(expert, t).to(device)
        target = reader.snapshot(expert, t + s.expert_epochs).to(device)
        for opt in opts.values():
            opt.zero_grad(set_to_none=True)
        loss = inner(net, x, y, lr, start, target, s.inner, gen)
        if s.inner.memory != "tesla":
            loss.backward()
        applied = bool(loss.detach() <= s.loss_threshold) if math.isfinite(s.loss_threshold) else True
        if applied:
            for opt in opts.values():
                opt.step()
        hist["total"][it] = loss.detach()
        hist["start_epoch"][it] = t
        hist["syn_lr"][it] = lr.detach()
        hist["applied"][it] = float(applied)
        _save(ckpt, it + 1, s.iterations, x, y, lr, opts, gen, hist)
    return x.detach(), y.detach(), float(lr.detach()), hist


def _resume(ckpt: Any, x: Tensor, y: Tensor, lr: Tensor, opts: dict[str, torch.optim.Optimizer],
            gen: torch.Generator, hist: dict[str, Tensor], iterations: int) -> int:
    state = ckpt.load() if ckpt is not None else None
    if state is None:
        return 0
    if tuple(state["x"].shape) != tuple(x.shape) or state.get("iterations") != iterations or \
            set(state["opts"]) != set(opts):
        raise ValueError(f"the unit checkpoint holds images {tuple(state['x'].shape)} after {state.get('iterations')} "
                         f"iterations, this loop has {tuple(x.shape)} and {iterations}: it belongs to another unit; "
                         "delete it")
    with torch.no_grad():
        x.copy_(state["x"])
        y.copy_(state["y"])
        lr.copy_(state["lr"])
        for k, h in hist.items():
            h.copy_(state["hist"][k])
    for k, opt in opts.items():
        opt.load_state_dict(state["opts"][k])
    gen.set_state(state["gen"])
    return int(state["it"])


def _save(ckpt: Any, it: int, iterations: int, x: Tensor, y: Tensor, lr: Tensor,
          opts: dict[str, torch.optim.Optimizer], gen: torch.Generator, hist: dict[str, Tensor]) -> None:
    if ckpt is None or it >= iterations or not ckpt.due():
        return
    ckpt.save({"it": it, "iterations": iterations, "x": x.detach().cpu(), "y": y.detach().cpu(),
               "lr": lr.detach().cpu(), "opts": {k: o.state_dict() for k, o in opts.items()}, "gen": gen.get_state(),
               "hist": {k: h.cpu() for k, h in hist.items()}, "loss": float(hist["total"][it - 1])})
