"""Pure compute of the matching recover methods: tensors and generators in, tensors out (no files, no Ray).

* DC, gradient matching: Zhao, Mopuri & Bilen, "Dataset Condensation with Gradient Matching", ICLR 2021;
* DSA, DC with Siamese augmentation: Zhao & Bilen, ICML 2021 (`pipeline.dsa`);
* DM, distribution matching: Zhao & Bilen, "Dataset Condensation with Distribution Matching", WACV 2023;
  all three after https://github.com/VICO-UoE/DatasetCondensation (`main.py`, `main_DM.py`, `utils.py`);
* DataDAM, attention matching: Sajedi et al., ICCV 2023, https://github.com/DataDistillation/DataDAM
  (`main_DataDAM.py`, `utils.py` `get_attention`).

Shared by all: the synthetic images of the classes of a unit are one leaf tensor [K * ipc, 3, H, W] in normalized
space, class-major, optimized together by SGD with momentum 0.5; every outer iteration builds a fresh randomly
initialized ConvNet-3 (instance norm by default) from a seed drawn from the unit's generator, without touching
the global RNG. The official code never clamps the images while optimizing, nor does this file: the caller
denormalizes and clamps to [0, 1] only when encoding. Losses are recorded per iteration as device tensors
(no host sync inside the loops), divided by the number of classes as the official logs do.

Both loops take an optional `LoopCheckpoint` (`pipeline.unit_state`): they save their whole state at iteration
boundaries when it says a save is due, and start from the saved state when there is one, so a resumed loop
returns the same bytes as one that never stopped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.dsa import DEFAULT_PARAMS, DSAParams, apply, augment, draw, to_device
from pipeline.models import ConvNet, Norm

if TYPE_CHECKING:
    from pipeline.unit_state import LoopCheckpoint

# --------------------------------------------------------------------------------------------------
# Networks and real images


@dataclass(frozen=True)
class NetSpec:
    """The randomly initialized network of every outer iteration (official default: ConvNet-3, width 128,
    instance norm = GroupNorm(width, width))."""

    num_classes: int
    resolution: int
    width: int = 128
    depth: int = 3
    norm: Norm = "instance"


def fresh_net(spec: NetSpec, gen: torch.Generator, device: torch.device | str = "cpu") -> ConvNet:
    """A new ConvNet with PyTorch's default initialization, seeded from `gen`: the same generator state gives the
    same weights (on a given device type), and the global RNGs are left exactly as they were.

    The official code reseeds the global RNG from the clock for every network (`get_network`); a seed drawn from
    the unit's generator keeps the randomness while making a unit reproducible. On CUDA the network is built on
    the device from the device's generator (forked and restored), so no weights are copied from the host and
    nothing waits for the GPU; elsewhere it is built on the CPU and moved.
    """
    device = torch.device(device)
    seed = int(torch.randint(2**62, (), generator=gen))

    def build() -> ConvNet:
        return ConvNet(spec.num_classes, spec.resolution, width=spec.width, depth=spec.depth, norm=spec.norm)

    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index]), torch.device(f"cuda:{index}"):
            torch.cuda.default_generators[index].manual_seed(seed)
            return build()
    with torch.random.fork_rng(devices=[]):  # restores the CPU RNG on exit; no CUDA RNG is touched
        torch.random.default_generator.manual_seed(seed)  # CPU only (torch.manual_seed would also reseed CUDA)
        return build().to(device)


class RealImages:
    """The real training images of a unit's classes, kept on the device as uint8, sampled per iteration.

    uint8 is 4x smaller than float and exact for 8-bit sources (the ingest shards always are): `normalized`
    images in are turned back into bytes once, and each sample is normalized again on the device.
    """

    def __init__(self, per_class: Sequence[Tensor], mean: Sequence[float], std: Sequence[float]) -> None:
        if not per_class or any(t.dim() != 4 or t.shape[0] == 0 for t in per_class):
            raise ValueError("RealImages needs a non-empty [N, 3, H, W] tensor for every class")
        self.images = list(per_class)
        dev = per_class[0].device
        self.mean = torch.tensor(mean, dtype=torch.float32, device=dev).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=dev).view(1, -1, 1, 1)

    @staticmethod
    def to_bytes(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
        """Normalized float images (what `RealPool.batch` returns) back to uint8, rounding."""
        m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        return (x.float() * s + m).mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)

    @classmethod
    def from_normalized(cls, per_class: Sequence[Tensor], mean: Sequence[float], std: Sequence[float]) -> RealImages:
        return cls([cls.to_bytes(x, mean, std) for x in per_class], mean, std)

    def __len__(self) -> int:
        return len(self.images)

    def count(self, k: int) -> int:
        return int(self.images[k].shape[0])

    def sample(self, k: int, n: int, gen: torch.Generator) -> Tensor:
        """n normalized images of class k: the first n of a random permutation, as the official `get_images`
        (`np.random.permutation(indices_class[c])[:n]`): without replacement, all of the class if it has fewer."""
        idx = torch.randperm(self.count(k), generator=gen)[:n]
        x = self.images[k][to_device(idx, self.images[k].device)].float().div_(255.0)
        return (x - self.mean) / self.std


def _autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


# --------------------------------------------------------------------------------------------------
# Distribution matching (DM) and attention matching (DataDAM)


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
    with _autocast(x_syn.device, amp):
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


def siamese_views(reals: Sequence[Tensor], syns: Sequence[Tensor], gen: torch.Generator, strategy: str,
                  params: DSAParams = DEFAULT_PARAMS) -> tuple[list[Tensor], list[Tensor]]:
    """One Siamese DSA draw per class, applied to that class's real and synthetic batch."""
    out_r, out_s = [], []
    for r, s in zip(reals, syns, strict=True):
        d = draw(gen, strategy, r.shape[-2], r.shape[-1], n=1, params=params)
        out_r.append(apply(r, d, params))
        out_s.append(apply(s, d, params))
    return out_r, out_s


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
    _check_syn(syn_init, k_classes, ipc)
    device = syn_init.device
    x = syn_init.detach().clone().float().requires_grad_(True)
    opt = torch.optim.SGD([x], lr=cfg.lr, momentum=cfg.momentum)
    keys = ("total",) if cfg.attention is None else ("total", "attention", "embedding")
    hist = {key: torch.zeros(cfg.iterations, device=device) for key in keys}
    for it in range(_resume(ckpt, x, opt, gen, hist, cfg.iterations), cfg.iterations):
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
        _save(ckpt, it + 1, cfg.iterations, x, opt, gen, hist)
    return x.detach(), hist


def _resume(ckpt: LoopCheckpoint | None, x: Tensor, opt: torch.optim.Optimizer, gen: torch.Generator,
            hist: dict[str, Tensor], iterations: int) -> int:
    """Restore a saved loop state into (x, opt, gen, hist); the iteration to continue from (0 = none saved)."""
    state = ckpt.load() if ckpt is not None else None
    if state is None:
        return 0
    if (tuple(state["x"].shape) != tuple(x.shape) or state.get("iterations") != iterations
            or set(state["hist"]) != set(hist)):
        raise ValueError(f"the unit checkpoint holds images {tuple(state['x'].shape)} after "
                         f"{state.get('iterations')} iterations, this loop has {tuple(x.shape)} and {iterations}: "
                         "it belongs to another unit; delete it")
    with torch.no_grad():
        x.copy_(state["x"])
        for key, h in hist.items():
            h.copy_(state["hist"][key])
    opt.load_state_dict(state["opt"])  # the momentum buffer, moved to x's device
    gen.set_state(state["gen"])
    return int(state["it"])


def _save(ckpt: LoopCheckpoint | None, it: int, iterations: int, x: Tensor, opt: torch.optim.Optimizer,
          gen: torch.Generator, hist: dict[str, Tensor]) -> None:
    """After iteration `it - 1`: save the state when the checkpoint says a save is due (never after the last)."""
    if ckpt is None or it >= iterations or not ckpt.due():
        return
    state: dict[str, Any] = {"it": it, "iterations": iterations, "x": x.detach().cpu(), "opt": opt.state_dict(),
                             "gen": gen.get_state(), "hist": {k: h.cpu() for k, h in hist.items()},
                             "loss": float(hist["total"][it - 1])}
    ckpt.save(state)


def _check_syn(syn: Tensor, k_classes: int, ipc: int) -> None:
    if syn.dim() != 4 or syn.shape[0] != k_classes * ipc:
        raise ValueError(f"synthetic images must be [{k_classes} classes x {ipc} ipc, 3, H, W], "
                         f"got {tuple(syn.shape)}")


# --------------------------------------------------------------------------------------------------
# Gradient matching (DC, DSA)

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
    _check_syn(syn_init, k_classes, ipc)
    device = syn_init.device
    x = syn_init.detach().clone().float().requires_grad_(True)
    opt_img = torch.optim.SGD([x], lr=cfg.lr_img, momentum=cfg.momentum)
    labels = torch.arange(k_classes, device=device).repeat_interleave(ipc)
    hist = torch.zeros(cfg.iterations, device=device)
    for it in range(_resume(ckpt, x, opt_img, gen, {"total": hist}, cfg.iterations), cfg.iterations):
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
        _save(ckpt, it + 1, cfg.iterations, x, opt_img, gen, {"total": hist})
    return x.detach(), {"total": hist}


def summarize(hist: dict[str, Tensor]) -> dict[str, float]:
    """loss_first / loss_last (mean of the last 5 % of iterations, at least one) per history, `total` named
    plainly (`loss_first`, `loss_last`), the others `loss_<key>_first` / `_last`: one host sync for all."""
    keys = list(hist)
    n = hist[keys[0]].shape[0]
    tail = max(1, n // 20)
    stacked = torch.stack([torch.stack([hist[k][0], hist[k][-tail:].mean()]) for k in keys]).tolist()
    out: dict[str, float] = {}
    for k, (first, last) in zip(keys, stacked, strict=True):
        name = "loss" if k == "total" else f"loss_{k}"
        out[f"{name}_first"], out[f"{name}_last"] = float(first), float(last)
    return out
