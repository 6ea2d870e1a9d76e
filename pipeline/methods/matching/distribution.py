"""Distribution matching (DM) and attention matching (DataDAM): the losses over class means of embeddings and
attention maps of a fresh random ConvNet, and the loop that optimizes a unit's synthetic images by them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.augment.dsa import DEFAULT_PARAMS, DSAParams
from pipeline.methods.matching.common import (
    LoopCheckpoint,
    NetSpec,
    RealImages,
    autocast,
    check_syn,
    fresh_net,
    resume_loop,
    save_loop,
    siamese_views,
)
from pipeline.models import ConvNet


def class_means(x: Tensor, sizes: Sequence[int]) -> Tensor:
    """[K, D]: the mean of each consecutive block of `sizes` rows of x [sum(sizes), D], in float32."""
    return torch.stack([block.float().mean(0) for block in x.split(list(sizes))])


def mean_distance(real: Tensor, syn: Tensor) -> Tensor:
    """sum_k ||real_k - syn_k||^2 over class means [K, D] (DM's and DataDAM's "MSE" between means)."""
    return (real - syn).pow(2).sum()


def attention_map(f: Tensor, p: float) -> Tensor:
    """DataDAM's spatial attention: sum over channels of |f|^p, flattened to [N, H * W], L2-normalized per sample
    (official `get_attention(f, param=1, exp=p, norm='l2')`)."""
    a = f.float().abs().pow(p).sum(dim=1).flatten(1)
    return F.normalize(a, p=2.0, dim=1)


def features(net: ConvNet, x: Tensor) -> tuple[list[Tensor], Tensor]:
    """(every ReLU output of `net.features`, in order; the flattened embedding = `net.embed(x)`)."""
    acts: list[Tensor] = []
    h = x
    for m in net.features:
        h = m(h)
        if isinstance(m, nn.ReLU):
            acts.append(h)
    return acts, torch.flatten(h, 1)


@dataclass(frozen=True)
class AttentionSpec:
    """DataDAM's extra terms: attention matching on the first depth-1 ReLU outputs, plus lambda x embedding."""

    p: float = 4.0  # exponent of |f| in the attention map
    lam: float = 0.01  # weight of the embedding (MMD) term, the official `task_balance`
    scale: float = 100.0  # the official code multiplies the whole loss by 100


def matching_loss(net: ConvNet, reals: Sequence[Tensor], syns: Sequence[Tensor],
                  attention: AttentionSpec | None = None, amp: torch.dtype | None = None) -> dict[str, Tensor]:
    """DM (attention None) or DataDAM loss over the (already augmented) real and synthetic batch of each class.

    DM: sum_k ||mean embed(real_k) - mean embed(syn_k)||^2 (official `main_DM.py`).
    DataDAM: scale * (sum_{l < depth} sum_k ||mean A_l(real_k) - mean A_l(syn_k)||^2 + lam * DM), with A_l the
    normalized attention of the l-th ReLU output (official `main_DataDAM.py`: the last ReLU is left out of the
    attention term, the embedding covers it).

    All classes go through the network in one batch, as the official code does for BatchNorm networks; with
    instance norm or none the samples do not interact, so this equals one forward per class. The real forward
    runs without a graph (its outputs are constants). Returns {"total"} (DM) or {"total", "attention",
    "embedding"} (DataDAM, the two parts before `scale`), float32 scalars.
    """
    real_sizes, syn_sizes = [r.shape[0] for r in reals], [s.shape[0] for s in syns]
    x_syn = torch.cat(list(syns))
    with autocast(x_syn.device, amp):
        with torch.no_grad():
            acts_r, emb_r = features(net, torch.cat(list(reals)))
        acts_s, emb_s = features(net, x_syn)
    embedding = mean_distance(class_means(emb_r, real_sizes), class_means(emb_s, syn_sizes))
    if attention is None:
        return {"total": embedding}
    att = embedding.new_zeros(())
    for fr, fs in zip(acts_r[:-1], acts_s[:-1], strict=True):
        att = att + mean_distance(class_means(attention_map(fr, attention.p), real_sizes),
                                  class_means(attention_map(fs, attention.p), syn_sizes))
    total = attention.scale * (att + attention.lam * embedding)
    return {"total": total, "attention": att, "embedding": embedding}


@dataclass(frozen=True)
class DistributionMatching:
    """Settings of the DM / DataDAM loop (defaults: the official DM values)."""

    iterations: int = 20000
    lr: float = 1.0
    momentum: float = 0.5
    batch_real: int = 256
    strategy: str = "color_crop_cutout_flip_scale_rotate"
    attention: AttentionSpec | None = None  # None = DM, else DataDAM


def distribution_matching(syn_init: Tensor, ipc: int, real: RealImages, net: NetSpec, gen: torch.Generator,
                          cfg: DistributionMatching, dsa: DSAParams = DEFAULT_PARAMS,
                          amp: torch.dtype | None = None,
                          ckpt: LoopCheckpoint | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Optimize `syn_init` [K * ipc, 3, H, W] (normalized, class-major) by DM or DataDAM.

    Per iteration: a fresh network in train mode whose parameters are never trained; `batch_real` real images of
    each class; a Siamese DSA draw per class; one SGD step (lr, momentum) on all synthetic images.
    Returns (the optimized images, normalized, detached; per-iteration losses [iterations] divided by K).
    """
    k_classes = len(real)
    check_syn(syn_init, k_classes, ipc)
    device = syn_init.device
    x = syn_init.detach().clone().float().requires_grad_(True)
    opt = torch.optim.SGD([x], lr=cfg.lr, momentum=cfg.momentum)
    keys = ("total",) if cfg.attention is None else ("total", "attention", "embedding")
    hist = {key: torch.zeros(cfg.iterations, device=device) for key in keys}
    for it in range(resume_loop(ckpt, x, opt, gen, hist, cfg.iterations), cfg.iterations):
        model = fresh_net(net, gen, device).train()
        model.requires_grad_(False)
        reals = [real.sample(k, cfg.batch_real, gen) for k in range(k_classes)]
        reals, syns = siamese_views(reals, list(x.split(ipc)), gen, cfg.strategy, dsa)
        with torch.enable_grad():
            losses = matching_loss(model, reals, syns, cfg.attention, amp)
            (grad,) = torch.autograd.grad(losses["total"], [x])
        x.grad = grad
        opt.step()
        for key in keys:
            hist[key][it] = losses[key].detach() / k_classes
        save_loop(ckpt, it + 1, cfg.iterations, x, opt, gen, hist)
    return x.detach(), hist
