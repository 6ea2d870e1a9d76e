"""Pure core of the recover stage (SRe2L and DWA): tensors and generators in, tensors out.

Synthetic images are optimized in normalized pixel space against a frozen teacher. The loss is
CE(teacher(aug(x)), y) + r_bn * sum_l m_l * (||mu_l - rm_l||_2 + r_var * ||var_l - rv_l||_2), with the
statistics taken on the input of each BatchNorm2d layer l (running mean rm_l, running variance rv_l).
DWA first perturbs the teacher's parameters by K steps of normalized gradient ascent on CE over real
images; the clean teacher is always restored.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401 - the defaults of normalize(), re-exported
from pipeline.crops import TorchDraws, random_resized_crop

_NO_BN_MESSAGE = "the teacher has no BatchNorm2d layers; SRe2L/DWA recover needs BN statistics"


@dataclass(frozen=True)
class RecoverParams:
    """Hyperparameters of the recover optimization (defaults: SRe2L/DWA ImageNet, except `iterations`)."""

    iterations: int
    lr: float = 0.25
    betas: tuple[float, float] = (0.5, 0.9)
    r_bn: float = 0.01
    r_var: float = 1.0
    first_bn_multiplier: float = 10.0
    crop_scale: tuple[float, float] = (0.08, 1.0)
    jitter: int = 32
    flip: bool = True
    crop: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"iterations must be an int >= 1, got {self.iterations!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two values in [0, 1), got {self.betas!r}")
        for name in ("r_bn", "r_var", "first_bn_multiplier"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale!r}")
        if isinstance(self.jitter, bool) or not isinstance(self.jitter, int) or self.jitter < 0:
            raise ValueError(f"jitter must be an int >= 0 (pixels), got {self.jitter!r}")
        if not isinstance(self.flip, bool) or not isinstance(self.crop, bool):
            raise ValueError(f"flip and crop must be bools, got {self.flip!r}, {self.crop!r}")


@dataclass(frozen=True)
class DWAParams:
    """Directed weight adjustment: `steps` (K) ascent steps with total perturbation norm at most `rho`."""

    steps: int = 15
    rho: float = 15e-3

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"DWA steps must be an int >= 1, got {self.steps!r}")
        if not self.rho >= 0:
            raise ValueError(f"DWA rho must be >= 0, got {self.rho!r}")


# --------------------------------------------------------------------------------------------------
# Normalization helpers


def _channel_view(values: Sequence[float], like: Tensor) -> Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


def normalize(
    x: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Tensor:
    """(x - mean) / std per channel, for images [N, C, H, W] in [0, 1]."""
    return (x - _channel_view(mean, x)) / _channel_view(std, x)


def denormalize(
    x: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Tensor:
    """x * std + mean per channel: the inverse of `normalize`."""
    return x * _channel_view(std, x) + _channel_view(mean, x)


def clamp_to_image_(
    x: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Tensor:
    """In place: clamp each channel of normalized `x` to [(0 - mean) / std, (1 - mean) / std]; returns `x`."""
    if x.dim() != 4 or x.shape[1] != len(mean) or len(mean) != len(std):
        raise ValueError(f"expected [N, {len(mean)}, H, W] images, got shape {tuple(x.shape)}")
    for c, (m, s) in enumerate(zip(mean, std, strict=True)):
        x[:, c].clamp_(min=(0.0 - m) / s, max=(1.0 - m) / s)
    return x


def cosine_lr(base_lr: float, it: int, total: int) -> float:
    """Cosine schedule without warm-up: 0.5 * base_lr * (1 + cos(pi * it / total)), `it` counted from 0."""
    if total < 1:
        raise ValueError(f"total must be >= 1, got {total}")
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * it / total))


def init_images(
    kind: str,
    num: int,
    resolution: int,
    gen: torch.Generator,
    real: Tensor | None = None,
    *,
    device: str | torch.device | None = None,
) -> Tensor:
    """Initial synthetic images [num, 3, resolution, resolution] in normalized space.

    kind "noise": standard normal drawn from `gen` (SRe2L); kind "real": a clone of `real`, already
    normalized (DWA). The result is moved to `device` when given.
    """
    shape = (num, 3, resolution, resolution)
    if kind == "noise":
        out = torch.randn(shape, generator=gen, device=gen.device)
    elif kind == "real":
        if real is None:
            raise ValueError("init kind 'real' needs the `real` images")
        if tuple(real.shape) != shape:
            raise ValueError(f"real init images must have shape {shape}, got {tuple(real.shape)}")
        out = real.detach().clone()
    else:
        raise ValueError(f"unknown init kind {kind!r}; valid kinds: noise, real")
    return out if device is None else out.to(device)


# --------------------------------------------------------------------------------------------------
# BatchNorm statistics loss


class BNStatsHook:
    """Context manager hooking every `nn.BatchNorm2d` of a model to compute the BN-matching loss.

    On each forward, a hook takes the BN *input*, computes per-channel mean and biased variance over (N, H, W)
    in float32 and stores ||mean - running_mean||_2 + r_var * ||var - running_var||_2 for that layer.
    `loss(first_bn_multiplier)` sums the stored terms, the first BN layer (module order) weighted by the
    multiplier. Hooks are removed on exit.
    """

    def __init__(self, model: nn.Module, r_var: float = 1.0) -> None:
        self.r_var = float(r_var)
        self._bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self._bns:
            raise ValueError(_NO_BN_MESSAGE)
        for bn in self._bns:
            if bn.running_mean is None or bn.running_var is None:
                raise ValueError(
                    "every BatchNorm2d of the teacher needs running statistics (track_running_stats=True)"
                )
        self._terms: dict[int, Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.active = True  # False: the hooks stay registered but compute nothing (other forwards of the teacher)
        # > 1: the forward holds this many batches of equal size, one after the other; each term is then [groups],
        # the statistics of each batch alone (what that batch would give in a forward of its own).
        self.groups = 1

    def _make_hook(self, index: int):  # noqa: ANN202 - torch hook signature
        def hook(module: nn.BatchNorm2d, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if not self.active:
                return
            with torch.autocast(device_type=inputs[0].device.type, enabled=False):
                x = inputs[0].float()
                if self.groups == 1:
                    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
                    dims: int | tuple[int, ...] | None = None
                else:  # [G * B, C, H, W] -> per batch: mean, var [G, C]
                    var, mean = torch.var_mean(x.unflatten(0, (self.groups, -1)), dim=(1, 3, 4), correction=0)
                    dims = -1
                term = torch.linalg.vector_norm(mean - module.running_mean.float(), dim=dims) + self.r_var * (
                    torch.linalg.vector_norm(var - module.running_var.float(), dim=dims)
                )
            self._terms[index] = term

        return hook

    def __enter__(self) -> BNStatsHook:
        self._terms.clear()
        self._handles = [bn.register_forward_hook(self._make_hook(i)) for i, bn in enumerate(self._bns)]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._terms.clear()

    def terms(self) -> list[Tensor]:
        """The per-layer terms of the last forward, in module order (layers that did not run are skipped)."""
        return [self._terms[i] for i in sorted(self._terms)]

    def loss(self, first_bn_multiplier: float = 10.0) -> Tensor:
        """sum_l m_l * term_l over the last forward, with m = first_bn_multiplier for the first BN, else 1."""
        if not self._terms:
            raise RuntimeError("no BatchNorm2d statistics captured; run a forward inside the context first")
        total: Tensor | None = None
        for i in sorted(self._terms):
            t = self._terms[i] * first_bn_multiplier if i == 0 else self._terms[i]
            total = t if total is None else total + t
        assert total is not None
        return total


class TeacherObjective:
    """The teacher's part of one recover iteration: forward of an augmented batch, CE and the BN-statistics loss.

    `objective(xa, targets)` returns (ce, bn), both float32 scalars; the loss is ce + r_bn * bn. With
    `groups` = G > 1 the batch is G batches of equal size one after the other, and ce and bn are [G]: each
    batch's CE mean and BN-statistics term computed on its rows alone. The teacher runs in eval mode (BN
    normalizes with its running statistics), so a row's logits do not depend on the other rows of the forward,
    and sum(ce + r_bn * bn) has, for each batch's pixels, the gradient that batch has in a forward of its own.
    The BN hooks
    are registered once, for the object's life (`close()` removes them), and compute only inside a call, so
    other forwards of the teacher (DWA's ascent steps, feature passes) do not pay for them.

    `compile=True` wraps the call in `torch.compile` (static shapes): one compilation per batch shape and
    teacher, reused by every batch of the worker that owns the object. Parameters are inputs of the compiled
    graph, not constants, so DWA's in-place perturbation is seen. The compiled kernels fuse the memory-bound
    work around the convolutions (the BN statistics, BN, ReLU, pooling): about 2x per iteration for the
    ConvNet at 32 px on CPU, for a compilation of 20-40 s; its float results differ from eager in rounding
    only (`tests/test_synthesis.py` states the tolerance).
    """

    def __init__(self, teacher: nn.Module, r_var: float, first_bn_multiplier: float,
                 autocast_dtype: torch.dtype | None = None, compile: bool = False, groups: int = 1) -> None:
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be an int >= 1, got {groups!r}")
        self.teacher = teacher
        self.first_bn_multiplier = float(first_bn_multiplier)
        self.autocast_dtype = autocast_dtype
        self.groups = groups
        self.hook = BNStatsHook(teacher, r_var=r_var)  # raises early if the teacher has no BatchNorm2d
        self.hook.__enter__()
        self.hook.active = False
        self.hook.groups = groups
        if compile:  # inductor's C++ toolchain probe warns about CUDA_HOME on every CPU-only machine
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        self._fn = torch.compile(self._forward, dynamic=False) if compile else self._forward

    def _forward(self, xa: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        with torch.autocast(device_type=xa.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None):
            logits = self.teacher(xa)
        if self.groups == 1:
            ce = F.cross_entropy(logits.float(), targets)
        else:  # each batch's own mean
            ce = F.cross_entropy(logits.float(), targets, reduction="none").unflatten(0, (self.groups, -1)).mean(1)
        return ce, self.hook.loss(self.first_bn_multiplier)

    def __call__(self, xa: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        if xa.shape[0] % self.groups:
            raise ValueError(f"a batch of {xa.shape[0]} images does not split into {self.groups} equal batches")
        self.hook.active = True
        try:
            return self._fn(xa, targets)
        finally:
            self.hook.active = False
            self.hook._terms.clear()

    def close(self) -> None:
        self.hook.__exit__(None, None, None)


# --------------------------------------------------------------------------------------------------
# Augmentation


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    """Uniform float in [lo, hi) from a float32 (torch's default dtype) draw."""
    return TorchDraws(gen).uniform(lo, hi)


def _randint_inclusive(gen: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi], both ends included."""
    return TorchDraws(gen).randint_inclusive(lo, hi)


def _crop_params(
    gen: torch.Generator, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """(top, left, h, w) sampled like torchvision's RandomResizedCrop.get_params, from `gen` (float32 draws)."""
    top, left, h, w = random_resized_crop(TorchDraws(gen), height, width, scale, ratio, pixels=True)
    return int(top), int(left), int(h), int(w)


@dataclass(frozen=True)
class AugDraw:
    """One iteration's augmentation of a batch: crop box (top, left, h, w) in pixels, flip, roll (dy, dx)."""

    top: int
    left: int
    h: int
    w: int
    flip: bool
    dy: int
    dx: int


def draw_augment(
    gen: torch.Generator,
    height: int,
    width: int,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    jitter: int = 32,
    flip: bool = True,
    crop: bool = True,
) -> AugDraw:
    """The random part of `augment_batch`: draws from `gen` in its order (crop, flip, dy, dx), nothing else.

    Drawing depends only on `gen`, never on the images, so a batch's draws for all its iterations can be made
    before it is optimized (`synthesize_batch(draws=...)`, several batches in one forward)."""
    if gen.device.type != "cpu":
        raise ValueError(f"augment_batch needs a CPU torch.Generator, got one on {gen.device}")
    top, left, h, w = (_crop_params(gen, height, width, crop_scale, (3.0 / 4.0, 4.0 / 3.0)) if crop
                       else (0, 0, height, width))
    flipped = bool(flip and _uniform(gen, 0.0, 1.0) < 0.5)
    dy = dx = 0
    if jitter > 0:
        dy = _randint_inclusive(gen, 0, jitter)
        dx = _randint_inclusive(gen, 0, jitter)
    return AugDraw(top, left, h, w, flipped, dy, dx)


def apply_augment(x: Tensor, d: AugDraw, out_size: int | tuple[int, int]) -> Tensor:
    """The deterministic part of `augment_batch`: crop `d`'s box, resize bilinearly to `out_size`, flip, roll."""
    size = (out_size, out_size) if isinstance(out_size, int) else (int(out_size[0]), int(out_size[1]))
    out = x[:, :, d.top : d.top + d.h, d.left : d.left + d.w]
    if (d.h, d.w) != size:
        out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
    if d.flip:
        out = out.flip(-1)
    if d.dy or d.dx:
        out = torch.roll(out, shifts=(d.dy, d.dx), dims=(2, 3))
    return out


def augment_batch(
    x: Tensor,
    gen: torch.Generator,
    out_size: int | tuple[int, int],
    crop_scale: tuple[float, float] = (0.08, 1.0),
    jitter: int = 32,
    flip: bool = True,
    crop: bool = True,
) -> Tensor:
    """Random-resized crop + horizontal flip + roll, one random draw shared by the whole batch.

    `crop` False skips the crop (and draws nothing for it): the official CIFAR recover only rolls.

    The crop (scale in `crop_scale`, aspect ratio in [3/4, 4/3]) is resized to `out_size` bilinearly, so
    the result is differentiable w.r.t. `x`; the flip has probability 0.5 (if `flip`); the roll shifts by
    (dy, dx), each uniform in [0, jitter] (one-sided, as the official SRe2L / DWA code's
    `random.randint(0, jitter)`; the roll wraps around, so a shift of s equals one of s - H the other way).
    All randomness comes from `gen`, a CPU generator (`draw_augment`; `apply_augment` does the rest).
    """
    if gen.device.type != "cpu":
        raise ValueError(f"augment_batch needs a CPU torch.Generator, got one on {gen.device}")
    if x.dim() != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(x.shape)}")
    return apply_augment(x, draw_augment(gen, x.shape[-2], x.shape[-1], crop_scale, jitter, flip, crop), out_size)


# --------------------------------------------------------------------------------------------------
# DWA


def _module_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for m, training in modes:
        m.training = training


def restore_parameters(teacher: nn.Module, saved: Sequence[Tensor]) -> None:
    """Copy `saved` (from `dwa_perturb`) back into the teacher's parameters, bitwise exactly."""
    params = list(teacher.parameters())
    if len(params) != len(saved):
        raise ValueError(f"saved has {len(saved)} tensors but the teacher has {len(params)} parameters")
    with torch.no_grad():
        for p, s in zip(params, saved, strict=True):
            p.copy_(s)


def dwa_perturb(teacher: nn.Module, batch: tuple[Tensor, Tensor], params: DWAParams) -> list[Tensor]:
    """Perturb the teacher's parameters in place by K = `params.steps` normalized gradient-ascent steps on CE.

    Every step uses the same real subset `batch` = (normalized images, labels), as the official DWA code
    does with its batch of real init images: the K steps then keep pointing the same way and the total
    perturbation reaches (almost exactly) rho. Step k: e = grad * (rho / K) / (||grad||_2 + 1e-12), one
    global L2 norm over all parameter gradients, theta += e, with the gradient taken at the already
    perturbed parameters. The teacher runs in eval mode, so its BN running buffers never change; buffers
    are never perturbed. Gradients come from `torch.autograd.grad`, so no `.grad` is read or written.
    Returns clones of the original parameters for `restore_parameters` (and `perturbation_norm`); if an
    error occurs the parameters are restored before it propagates. Module modes and requires_grad flags
    are restored on return.
    """
    if not (isinstance(batch, tuple | list) and len(batch) == 2 and isinstance(batch[0], Tensor)):
        raise ValueError("DWA needs one real subset: a pair (normalized images [B, 3, H, W], labels [B])")
    images, labels = batch
    if images.dim() != 4 or labels.dim() != 1 or images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(f"DWA subset: images {tuple(images.shape)} and labels {tuple(labels.shape)} must be "
                         "[B, 3, H, W] and [B] with B >= 1")
    plist = list(teacher.parameters())
    if not plist:
        raise ValueError("the teacher has no parameters to perturb")
    saved = [p.detach().clone() for p in plist]
    flags = [p.requires_grad for p in plist]
    modes = _module_modes(teacher)
    step_size = params.rho / params.steps
    teacher.eval()
    try:
        for p in plist:
            p.requires_grad_(True)
        with torch.enable_grad():
            for _ in range(params.steps):
                loss = F.cross_entropy(teacher(images).float(), labels)
                grads = torch.autograd.grad(loss, plist, allow_unused=True)
                used = [(p, g) for p, g in zip(plist, grads, strict=True) if g is not None]
                if not used:
                    raise RuntimeError("the DWA loss does not depend on any teacher parameter")
                norms = torch.stack([torch.linalg.vector_norm(g.detach()).to(torch.float64) for _, g in used])
                scale = step_size / (torch.linalg.vector_norm(norms) + 1e-12)
                with torch.no_grad():
                    for p, g in used:
                        p.add_(g * scale.to(g.dtype))
    except BaseException:
        restore_parameters(teacher, saved)
        raise
    finally:
        for p, f in zip(plist, flags, strict=True):
            p.requires_grad_(f)
        _restore_modes(modes)
    return saved


def perturbation_norm(teacher: nn.Module, saved: Sequence[Tensor]) -> Tensor:
    """||theta - saved||_2 over all parameters (float64, on the parameters' device, no host sync)."""
    with torch.no_grad():
        sq = [(p.detach().double() - s.double()).pow(2).sum() for p, s in zip(teacher.parameters(), saved, strict=True)]
    return torch.stack(sq).sum().sqrt()


# --------------------------------------------------------------------------------------------------
# Recover


def synthesize_batch(
    teacher: nn.Module,
    targets: Tensor,
    init: Tensor,
    params: RecoverParams,
    gen: torch.Generator,
    *,
    dwa_batch: tuple[Tensor, Tensor] | None = None,
    dwa: DWAParams | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    objective: TeacherObjective | None = None,
    draws: Sequence[Sequence[AugDraw]] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Optimize one batch of synthetic images against `teacher` (SRe2L recover; DWA when `dwa_batch`).

    `targets` [B] are class ids, `init` [B, 3, H, W] normalized initial images (on the teacher's device).
    If `dwa_batch` (a real subset: normalized images, labels) is given, the teacher is first perturbed by
    `dwa_perturb` (with `dwa`, default `DWAParams()`) and the clean parameters are restored in all cases. The
    teacher's values, buffers, module modes and requires_grad flags are as before on return, and no `.grad`
    is set.

    `objective`: a `TeacherObjective` of this teacher to reuse (a worker keeps one, compiled or not, for all
    its batches; its own r_var, first_bn_multiplier and autocast dtype then apply); default: an eager one made
    for this call from `params` and `autocast_dtype`.

    `draws`: G lists of `iterations` augmentations made beforehand (`draw_augment`), one list per batch: `init`
    and `targets` are then G batches of equal size one after the other, optimized in one forward each
    iteration, batch g augmented by draws[g][it] and scored on its own rows (the objective's `groups` must be
    G). Nothing is drawn from `gen`. Each batch's result is the one it gets optimized alone with the same
    draws, up to float rounding (`tests/test_synthesis.py` states the tolerance). DWA perturbs the teacher for
    one batch, so it takes a single group.

    Returns (images denormalized to [0, 1], float32, detached, on init's device;
    {"ce", "bn", "total"}: per-iteration losses [iterations] ([iterations, G] with `draws`) on the same device,
    detached, plus, with DWA, "dwa_delta_norm": [1], the L2 norm of the parameter perturbation that was used).
    """
    if init.dim() != 4 or init.shape[1] != len(mean):
        raise ValueError(f"init must be [B, {len(mean)}, H, W], got shape {tuple(init.shape)}")
    if targets.dim() != 1 or targets.shape[0] != init.shape[0]:
        raise ValueError(f"targets must be [B] with B = {init.shape[0]}, got shape {tuple(targets.shape)}")
    if dwa is not None and dwa_batch is None:
        raise ValueError("DWAParams given without dwa_batch (real images for the weight perturbation)")
    groups = 1
    if draws is not None:
        groups = len(draws)
        if groups < 1 or init.shape[0] % groups:
            raise ValueError(f"{groups} lists of draws for a batch of {init.shape[0]} images: they must split it "
                             "into equal batches")
        if any(len(d) != params.iterations for d in draws):
            raise ValueError(f"each batch needs one draw per iteration ({params.iterations}), got "
                             f"{[len(d) for d in draws]}")
        if groups > 1 and dwa_batch is not None:
            raise ValueError("DWA perturbs the teacher for one batch: it cannot share a forward with others")
    own = objective is None
    if objective is None:
        objective = TeacherObjective(teacher, params.r_var, params.first_bn_multiplier, autocast_dtype,
                                     groups=groups)
    elif objective.teacher is not teacher:
        raise ValueError("the objective was made for another teacher")
    elif objective.groups != groups:
        raise ValueError(f"the objective scores {objective.groups} batches per forward, the call has {groups}")

    device = init.device
    use_channels_last = channels_last and device.type == "cuda"
    plist = list(teacher.parameters())
    flags = [p.requires_grad for p in plist]
    modes = _module_modes(teacher)
    saved: list[Tensor] | None = None
    iters = params.iterations
    shape = (iters,) if draws is None else (iters, groups)
    hist = {k: torch.zeros(shape, device=device, dtype=torch.float32) for k in ("ce", "bn", "total")}
    try:
        teacher.eval()
        if use_channels_last:
            teacher.to(memory_format=torch.channels_last)
        if dwa_batch is not None:
            saved = dwa_perturb(teacher, dwa_batch, dwa if dwa is not None else DWAParams())
            hist["dwa_delta_norm"] = perturbation_norm(teacher, saved).float().reshape(1).to(device)
        for p in plist:
            p.requires_grad_(False)

        x = init.detach().clone().float()
        if use_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        opt = torch.optim.Adam([x], lr=params.lr, betas=params.betas)
        out_size = (int(x.shape[-2]), int(x.shape[-1]))
        with torch.enable_grad():
            for it in range(iters):
                lr = cosine_lr(params.lr, it, iters)
                for group in opt.param_groups:
                    group["lr"] = lr
                if draws is None:
                    xa = augment_batch(x, gen, out_size, params.crop_scale, params.jitter, params.flip,
                                       params.crop)
                elif groups == 1:
                    xa = apply_augment(x, draws[0][it], out_size)
                else:
                    xa = torch.cat([apply_augment(part, d[it], out_size)
                                    for part, d in zip(x.chunk(groups), draws, strict=True)])
                ce, bn = objective(xa, targets)
                loss = ce + params.r_bn * bn
                opt.zero_grad(set_to_none=True)
                (loss.sum() if groups > 1 else loss).backward()
                opt.step()
                with torch.no_grad():
                    clamp_to_image_(x, mean, std)
                hist["ce"][it] = ce.detach()
                hist["bn"][it] = bn.detach()
                hist["total"][it] = loss.detach()
    finally:
        if own:
            objective.close()
        if saved is not None:
            restore_parameters(teacher, saved)
        for p, f in zip(plist, flags, strict=True):
            p.requires_grad_(f)
        _restore_modes(modes)

    images = denormalize(x.detach(), mean, std).clamp_(0.0, 1.0).contiguous()
    return images, hist
