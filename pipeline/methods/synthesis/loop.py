"""One recover batch (SRe2L; DWA with a real subset): initial images, the cosine lr, the Adam loop in normalized
pixel space, the pixel clamp. Tensors and generators in, tensors out."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pipeline.core.imageops import IMAGENET_MEAN, IMAGENET_STD, denormalize
from pipeline.methods.synthesis.augment import AugDraw, apply_augment, augment_batch
from pipeline.methods.synthesis.dwa import (
    dwa_perturb,
    module_modes,
    perturbation_norm,
    restore_modes,
    restore_parameters,
)
from pipeline.methods.synthesis.objective import DWAParams, RecoverParams, TeacherObjective


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
    modes = module_modes(teacher)
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
                    xa = augment_batch(x, gen, out_size, params.crop_scale_at(it), params.jitter, params.flip,
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
        restore_modes(modes)

    images = denormalize(x.detach(), mean, std).clamp_(0.0, 1.0).contiguous()
    return images, hist
