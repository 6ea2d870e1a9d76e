"""SRe2L / DWA's augmentation of a batch per iteration: one random-resized crop, flip and roll for the whole batch,
drawn from the unit's generator (`draw_augment`) and applied differentiably (`apply_augment`); CDA's schedule of the
crop's smallest area over the iterations (`cda_min_scale`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.augment.crops import TorchDraws, random_resized_crop


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


CDA_MODES = ("step", "linear", "cosine")


def cda_min_scale(it: int, iterations: int, milestone: float, start: float, end: float,
                  mode: str = "cosine") -> float:
    """CDA's lower bound of the random-resized crop's area at iteration `it` (0-based) of `iterations` (Yin &
    Shen, TMLR 2024; CDA/recover_cda_*.py of github.com/VILA-Lab/SRe2L): before `milestone` x iterations it goes
    from `start` (1.0: the whole image, easy) down to `end` (0.08: small crops, hard), by a cosine
    end + (start - end) (1 + cos(pi it / (milestone T))) / 2, a straight line, or (`step`) stays at `start`; from
    there on it is `end`."""
    if mode not in CDA_MODES:
        raise ValueError(f"CDA mode must be one of {', '.join(CDA_MODES)}, got {mode!r}")
    span = milestone * iterations
    if not it < span:
        return end
    if mode == "step":
        return start
    frac = it / span
    if mode == "linear":
        return end + (start - end) * (1.0 - frac)
    return end + (start - end) * (1.0 + math.cos(math.pi * frac)) / 2.0


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
