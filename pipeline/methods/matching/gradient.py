"""Gradient matching (DC) and DC with Siamese augmentation (DSA): the per-layer cosine distance of real and
synthetic gradients, the inner training on the synthetic set, and the loop over outer iterations."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.augment.dsa import DEFAULT_PARAMS, DSAParams, augment, to_device
from pipeline.methods.matching.common import (
    LoopCheckpoint,
    NetSpec,
    RealImages,
    check_syn,
    fresh_net,
    resume_loop,
    save_loop,
    siamese_views,
)

DC_LOOPS: dict[int, tuple[int, int]] = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15),
                                        50: (50, 10)}
"""(outer_loop, inner_loop) per IPC: the official `get_loops` (utils.py), which refuses any other IPC."""


def dc_loops(ipc: int) -> tuple[int, int]:
    """(outer, inner) for an IPC: the official table where it has the IPC; otherwise outer = IPC (as every table
    entry) and inner linearly interpolated in IPC between the neighbouring entries, rounded to the nearest
    integer (e.g. IPC 5 -> (5, 23), IPC 15 -> (15, 38)); above 50, inner stays 10 (the last entry)."""
    if ipc < 1:
        raise ValueError(f"ipc must be >= 1, got {ipc}")
    if ipc in DC_LOOPS:
        return DC_LOOPS[ipc]
    keys = sorted(DC_LOOPS)
    if ipc > keys[-1]:
        return ipc, DC_LOOPS[keys[-1]][1]
    lo = max(k for k in keys if k < ipc)
    hi = min(k for k in keys if k > ipc)
    t = (ipc - lo) / (hi - lo)
    inner = DC_LOOPS[lo][1] + t * (DC_LOOPS[hi][1] - DC_LOOPS[lo][1])
    return ipc, int(math.floor(inner + 0.5))


def gradient_distance(g_syn: Sequence[Tensor], g_real: Sequence[Tensor]) -> Tensor:
    """DC's layer-wise distance (official `match_loss` with dis_metric 'ours' = sum of `distance_wb`).

    For each parameter gradient: conv weights [out, in, kh, kw] become [out, in * kh * kw] (3-D [C, H, W]
    become [C, H * W]); per output row i, 1 - <a_i, b_i> / (||a_i|| ||b_i|| + 1e-6); summed over rows and
    tensors. 1-D tensors (biases, norm scales and shifts) contribute 0.
    """
    if len(g_syn) != len(g_real):
        raise ValueError(f"{len(g_syn)} synthetic and {len(g_real)} real gradients")
    total: Tensor | None = None
    for gs, gr in zip(g_syn, g_real, strict=True):
        if gs.shape != gr.shape:
            raise ValueError(f"gradient shapes differ: {tuple(gs.shape)} and {tuple(gr.shape)}")
        if gs.dim() <= 1:
            continue
        a, b = gs.float().flatten(1), gr.float().flatten(1)
        d = (1.0 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + 1e-6)).sum()
        total = d if total is None else total + d
    return total if total is not None else torch.zeros(())


def matched_parameters(net: nn.Module) -> list[Tensor]:
    """The parameters whose gradients count in `gradient_distance` (dim > 1): biases and norm affines count 0,
    so their gradients are not even computed."""
    return [p for p in net.parameters() if p.dim() > 1]


def gradient_matching_loss(net: nn.Module, reals: Sequence[Tensor], syns: Sequence[Tensor],
                           labels: Sequence[int]) -> Tensor:
    """sum over classes of gradient_distance(grad CE(net(syn_k), y_k), grad CE(net(real_k), y_k)).

    The real gradient is a constant (detached); the synthetic one keeps its graph (create_graph), so the loss
    is differentiable w.r.t. the synthetic images (a second-order term through the network).
    """
    params = matched_parameters(net)
    total: Tensor | None = None
    for r, s, y in zip(reals, syns, labels, strict=True):
        yr = torch.full((r.shape[0],), y, dtype=torch.long, device=r.device)
        g_real = [g.detach() for g in torch.autograd.grad(F.cross_entropy(net(r), yr), params)]
        ys = torch.full((s.shape[0],), y, dtype=torch.long, device=s.device)
        g_syn = torch.autograd.grad(F.cross_entropy(net(s), ys), params, create_graph=True)
        d = gradient_distance(g_syn, g_real)
        total = d if total is None else total + d
    assert total is not None
    return total


def train_on_synthetic(net: nn.Module, opt: torch.optim.Optimizer, images: Tensor, labels: Tensor, epochs: int,
                       batch: int, gen: torch.Generator, strategy: str | None, dsa: DSAParams = DEFAULT_PARAMS) -> None:
    """DC's inner loop: `epochs` shuffled passes of SGD on the (detached) synthetic set, batches of `batch`.

    With a DSA strategy every batch is augmented with per-sample parameters (the official non-Siamese call,
    `DiffAugment(img, strategy, param=...)` without a seed); DC trains without augmentation.
    """
    net.train()
    n = images.shape[0]
    for _ in range(epochs):
        order = to_device(torch.randperm(n, generator=gen), images.device)
        for i in range(0, n, batch):
            idx = order[i:i + batch]
            x = images[idx]
            if strategy:
                x = augment(x, gen, strategy, dsa, per_sample=True)
            loss = F.cross_entropy(net(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def freeze_batchnorm(net: nn.Module, real: Tensor) -> None:
    """Official DC for BatchNorm networks: one train-mode forward on real images (16 per class) to set the running
    statistics, then BatchNorm layers in eval mode, so that tiny synthetic batches use stable statistics."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    net.train()
    with torch.no_grad():
        net(real)
    for m in bns:
        m.eval()


@dataclass(frozen=True)
class GradientMatching:
    """Settings of the DC / DSA loop (defaults: the official DC values; DSA = a strategy)."""

    iterations: int = 1000
    outer_loop: int = 10
    inner_loop: int = 50
    lr_img: float = 0.1
    momentum: float = 0.5
    lr_net: float = 0.01
    batch_real: int = 256
    batch_train: int = 256
    strategy: str | None = None  # None = DC; a DSA strategy = DSA
    bn_real_per_class: int = 16


def gradient_matching(syn_init: Tensor, ipc: int, real: RealImages, net: NetSpec, gen: torch.Generator,
                      cfg: GradientMatching, dsa: DSAParams = DEFAULT_PARAMS,
                      ckpt: LoopCheckpoint | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Optimize `syn_init` [K * ipc, 3, H, W] (normalized, class-major; class k has local label k) by DC / DSA.

    Per iteration (official `main.py`): a fresh network, trained only by this iteration's inner loops; then
    `outer_loop` times: (BatchNorm networks: freeze statistics on real images), the summed class losses, one SGD
    step on the images (lr_img, momentum), and, except after the last outer step, `inner_loop` epochs of the
    network on the synthetic set (plain SGD lr_net, as the official `optimizer_net`). Returns (the optimized
    images, normalized, detached; per-iteration loss [iterations] = mean over outer steps of the loss / K).
    fp32 throughout: the loss compares gradients, and no autocast is applied to the second-order graph.
    """
    k_classes = len(real)
    check_syn(syn_init, k_classes, ipc)
    device = syn_init.device
    x = syn_init.detach().clone().float().requires_grad_(True)
    opt_img = torch.optim.SGD([x], lr=cfg.lr_img, momentum=cfg.momentum)
    labels = torch.arange(k_classes, device=device).repeat_interleave(ipc)
    hist = torch.zeros(cfg.iterations, device=device)
    for it in range(resume_loop(ckpt, x, opt_img, gen, {"total": hist}, cfg.iterations), cfg.iterations):
        model = fresh_net(net, gen, device).train()
        opt_net = torch.optim.SGD(model.parameters(), lr=cfg.lr_net)
        acc = torch.zeros((), device=device)
        for ol in range(cfg.outer_loop):
            if net.norm == "batch":
                freeze_batchnorm(model, torch.cat([real.sample(k, cfg.bn_real_per_class, gen)
                                                   for k in range(k_classes)]))
            reals = [real.sample(k, cfg.batch_real, gen) for k in range(k_classes)]
            syns = list(x.split(ipc))
            if cfg.strategy:
                reals, syns = siamese_views(reals, syns, gen, cfg.strategy, dsa)
            with torch.enable_grad():
                loss = gradient_matching_loss(model, reals, syns, range(k_classes))
                (grad,) = torch.autograd.grad(loss, [x])
            x.grad = grad
            opt_img.step()
            acc = acc + loss.detach()
            if ol == cfg.outer_loop - 1:
                break
            with torch.enable_grad():
                train_on_synthetic(model, opt_net, x.detach().clone(), labels, cfg.inner_loop, cfg.batch_train, gen,
                                   cfg.strategy, dsa)
        hist[it] = acc / (k_classes * cfg.outer_loop)
        save_loop(ckpt, it + 1, cfg.iterations, x, opt_img, gen, {"total": hist})
    return x.detach(), {"total": hist}
