"""The inner loop of trajectory matching: a student network, its parameters one flat vector, trained for
`syn_steps` SGD steps on batches of the synthetic set from an expert's snapshot, and the normalized distance of
where it lands to where the expert landed `expert_epochs` later.

MTT (Cazenavette et al., "Dataset Distillation by Matching Training Trajectories", CVPR 2022,
github.com/GeorgeCazenavette/mtt-distillation `distill.py`): theta_0 = theta*_t; theta_{i+1} = theta_i - alpha *
grad CE(f(A(X_i); theta_i), Y_i), with alpha a learnable step size, X_i a batch of `batch_syn` synthetic images
(a fresh permutation whenever the previous one is used up), A a DSA draw per image; loss =
||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2.

Two ways to get the gradient of that loss with respect to the images, the labels and alpha:

* `unrolled`: the official one: the N steps' graph is kept (create_graph) and back-propagated once. Its memory
  grows with syn_steps x batch_syn (`pipeline.methods.trajectory.memory` estimates it).
* `tesla`: constant memory (Cui et al., "Scaling Up Dataset Distillation to ImageNet-1K with Constant Memory",
  ICML 2023; DATM's `DATM_tesla.py`): the steps run without a graph, keeping only each step's parameters and
  batch; then each step is recomputed alone and d loss / d theta_N, pushed through that step's gradient, gives
  its batch's image (and label) gradient and alpha's. It drops the terms through which a step's images change
  the later steps' starting points (the Hessian terms), as TESLA does.

Parameter selection (`mask`): the loss may count only part of the parameter vector: PAD's (Li et al., 2024)
`deep-layers` leaves out the first `ratio` share of the flat vector (the shallow layers; its `PAD_depth.py`),
`loss-ratio` leaves out, at each iteration, the `ratio` share of entries whose student-expert error is smallest
(its current `PAD.py`). Pure compute: tensors in, tensors out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

MASKS = ("none", "deep-layers", "loss-ratio")
MEMORY = ("unrolled", "tesla")


class FlatNet:
    """A network evaluated at a flat parameter vector (`functional_call`; the module's own parameters unused)."""

    def __init__(self, module: nn.Module, names: Sequence[str], shapes: Sequence[Sequence[int]]) -> None:
        own = dict(module.named_parameters())
        if list(own) != list(names) or any(list(own[n].shape) != list(s) for n, s in zip(names, shapes, strict=True)):
            raise ValueError("the trajectories' parameter layout is not that of the student network "
                             f"({len(names)} tensors vs {len(own)}): were they made for another architecture?")
        self.module, self.names = module, list(names)
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.num_params = sum(self.sizes)

    def __call__(self, x: Tensor, flat: Tensor) -> Tensor:
        chunks = torch.split(flat, self.sizes)
        params = {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes, strict=True)}
        return functional_call(self.module, params, (x,))


@dataclass(frozen=True)
class InnerLoop:
    """The settings of one inner loop."""

    syn_steps: int
    batch_syn: int  # synthetic images per step; 0 = all
    strategy: str  # DSA strategy of every step's batch ("" = none)
    mask: str = "none"  # none | deep-layers | loss-ratio
    mask_ratio: float = 0.0  # the share of the parameter vector the mask leaves out
    memory: str = "unrolled"  # unrolled | tesla


def batches(n: int, batch: int, steps: int, gen: torch.Generator) -> list[Tensor]:
    """The index batch of every step: a permutation of all n images cut into batches of `batch`, a new one when
    used up (MTT's `indices_chunks`, popped from the end)."""
    out: list[Tensor] = []
    chunks: list[Tensor] = []
    batch = batch or n
    while len(out) < steps:
        if not chunks:
            chunks = list(torch.randperm(n, generator=gen).split(batch))
        out.append(chunks.pop())
    return out


def soft_targets(labels: Tensor) -> Tensor:
    """Learned labels (logits) -> the target distribution of the inner loop's cross-entropy."""
    return torch.softmax(labels, dim=1)


def step_loss(net: FlatNet, x: Tensor, y: Tensor, flat: Tensor) -> Tensor:
    """CE of the student at `flat` on one batch: hard labels (int [b]) or learned label logits (float [b, C])."""
    out = net(x, flat)
    return F.cross_entropy(out, soft_targets(y) if y.is_floating_point() else y)


def view(images: Tensor, idx: Tensor, strategy: str, gen: torch.Generator) -> Tensor:
    """The augmented batch of one step (one DSA draw per image; differentiable in the images)."""
    from pipeline.augment.dsa import augment

    x = images[idx]
    return augment(x, gen, strategy, per_sample=True) if strategy else x


def param_mask(kind: str, ratio: float, start: Tensor, target: Tensor, end: Tensor | None) -> Tensor | None:
    """The entries of the parameter vector the loss counts (bool [P]), None = all.

    deep-layers: all but the first `ratio` share of the flat vector; loss-ratio: all but the `ratio` share with the
    smallest |end - target| (ties broken by position), computed on detached values."""
    if kind == "none" or ratio <= 0:
        return None
    p = start.numel()
    drop = min(p - 1, int(ratio * p))
    mask = torch.ones(p, dtype=torch.bool, device=start.device)
    if kind == "deep-layers":
        mask[:drop] = False
        return mask
    if kind == "loss-ratio":
        if end is None:
            raise ValueError("the loss-ratio mask needs the student's end point")
        err = (end.detach() - target).abs()
        mask[torch.argsort(err, stable=True)[:drop]] = False
        return mask
    raise ValueError(f"mask must be one of {', '.join(MASKS)}, got {kind!r}")


def matching_loss(end: Tensor, start: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:
    """||end - target||^2 / ||start - target||^2 over the masked-in entries (MTT's normalization; its division of
    both by the parameter count cancels)."""
    if mask is not None:
        end, start, target = end[mask], start[mask], target[mask]
    return (end - target).pow(2).sum() / (start - target).pow(2).sum().clamp_min(1e-12)


def unrolled(net: FlatNet, images: Tensor, labels: Tensor, syn_lr: Tensor, start: Tensor, target: Tensor,
             loop: InnerLoop, gen: torch.Generator) -> Tensor:
    """The matching loss with the whole inner loop in the graph (backward gives every gradient exactly)."""
    theta = start.clone().requires_grad_(True)
    for idx in batches(len(images), loop.batch_syn, loop.syn_steps, gen):
        x = view(images, idx, loop.strategy, gen)
        grad = torch.autograd.grad(step_loss(net, x, labels[idx], theta), theta, create_graph=True)[0]
        theta = theta - syn_lr * grad
    mask = param_mask(loop.mask, loop.mask_ratio, start, target, theta)
    return matching_loss(theta, start, target, mask)


def tesla(net: FlatNet, images: Tensor, labels: Tensor, syn_lr: Tensor, start: Tensor, target: Tensor,
          loop: InnerLoop, gen: torch.Generator) -> Tensor:
    """TESLA's constant-memory gradient: accumulates into .grad of images (and of labels / syn_lr when they require
    grad) and returns the loss, detached. Memory: one step's graph plus syn_steps parameter vectors."""
    plan = []
    theta = start.detach().clone()
    for idx in batches(len(images), loop.batch_syn, loop.syn_steps, gen):
        state = gen.get_state()  # replayed in the second pass: the same DSA draw
        with torch.no_grad():
            x = view(images, idx, loop.strategy, gen)
        theta_in = theta.clone().requires_grad_(True)
        grad = torch.autograd.grad(step_loss(net, x, labels[idx], theta_in), theta_in)[0]
        plan.append((idx, state, theta))
        theta = theta - syn_lr.detach() * grad
    mask = param_mask(loop.mask, loop.mask_ratio, start, target, theta)
    end = theta.requires_grad_(True)
    loss = matching_loss(end, start, target, mask)
    (d_end,) = torch.autograd.grad(loss, end)  # theta_N = theta_0 - alpha * sum_i g_i(X_i; theta_i)
    replay = torch.Generator(device=gen.device)
    for idx, state, theta_i in plan:
        replay.set_state(state)
        x = view(images, idx, loop.strategy, replay)
        theta_i = theta_i.detach().requires_grad_(True)
        g = torch.autograd.grad(step_loss(net, x, labels[idx], theta_i), theta_i, create_graph=True)[0]
        # d loss / d (X_i, Y_i, alpha) through theta_N only: -alpha * <d_end, g_i>
        (-(syn_lr * (g * d_end).sum())).backward()
    return loss.detach()
