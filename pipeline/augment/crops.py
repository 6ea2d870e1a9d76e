"""Seeded random draws, and the one random-resized-crop window sampler of the pipeline.

Three places sample RandomResizedCrop windows with torchvision's `get_params` algorithm (target area
~ U(scale) * area, log aspect ratio ~ U(log ratio), up to 10 tries for a window that fits, its
position uniform; else the central crop with the aspect ratio clipped into `ratio`):

==========================  =====================  ==========================  =====================
consumer                    generator              window                      position drawn
==========================  =====================  ==========================  =====================
PIL loader (train)          `random.Random`        whole pixels                left, then top
recover (`synthesis`)       torch, float32         whole pixels                top, then left
student views (`augment`)   torch, float64         fractions of a unit square  top, then left
==========================  =====================  ==========================  =====================

`random_resized_crop` is that one sampler; a `Draws` adapter carries where the numbers come from,
`pixels` and `left_first` the rest. Each consumer draws exactly the numbers, in the order, that it
drew before the three were merged: the recover shards and the relabel views are bytes that depend on
every draw (tests/test_crops.py compares the sampler with frozen copies of the three old ones).
"""

from __future__ import annotations

import math
import random
from typing import Protocol

import torch

CROP_SCALE = (0.08, 1.0)
"""Default area range of the crop, as a fraction of the source (torchvision's default)."""
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
"""Aspect-ratio (w / h) range of the crop (torchvision's default)."""
CROP_TRIES = 10

CropBox = tuple[float, float, float, float]
"""(top, left, height, width): ints for a pixel window, floats for a fractional one."""


class Draws(Protocol):
    """A source of uniform numbers (the crop sampler needs no more)."""

    def uniform(self, lo: float, hi: float) -> float:
        """Uniform float in [lo, hi)."""
        ...

    def randint_inclusive(self, lo: int, hi: int) -> int:
        """Uniform integer in [lo, hi], both ends included."""
        ...


class TorchDraws:
    """Draws from a CPU `torch.Generator`.

    dtype: of the uniforms before they become Python floats. `None` is torch's default dtype
    (float32): recover draws those; the student views draw float64. The two give different numbers
    from the same generator state, so each consumer keeps its own.
    """

    def __init__(self, gen: torch.Generator, dtype: torch.dtype | None = None) -> None:
        self.gen, self.dtype = gen, dtype

    def uniform(self, lo: float = 0.0, hi: float = 1.0) -> float:
        """Uniform float in [lo, hi): `lo + (hi - lo) * u`, one `torch.rand` draw."""
        return lo + (hi - lo) * torch.rand((), generator=self.gen, dtype=self.dtype, device="cpu").item()

    def randint_inclusive(self, lo: int, hi: int) -> int:
        """Uniform integer in [lo, hi] (as Python's `random.randint`), one `torch.randint` draw."""
        return int(torch.randint(lo, hi + 1, (), generator=self.gen, device="cpu"))

    def randbelow(self, n: int) -> int:
        """Uniform integer in [0, n), one `torch.randint` draw."""
        return int(torch.randint(n, (), generator=self.gen, device="cpu").item())


class RandomDraws:
    """Draws from a `random.Random` (its own `uniform` and `randint`, so the numbers are Python's)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def uniform(self, lo: float, hi: float) -> float:
        return self.rng.uniform(lo, hi)

    def randint_inclusive(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)


def random_resized_crop(
    draws: Draws,
    height: float,
    width: float,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
    *,
    pixels: bool = True,
    left_first: bool = False,
) -> CropBox:
    """(top, left, h, w) of a RandomResizedCrop window of a `height` x `width` source.

    Draws, per try: the area fraction, then the log aspect ratio; for the first window that fits, its
    two offsets (top then left, or left then top with `left_first`). pixels: sides rounded to whole
    pixels and offsets uniform integers (`randint_inclusive`); else (a fractional source such as
    1.0 x 1.0) nothing is rounded and offsets are uniform floats. When no try fits: the central crop
    with the aspect ratio clipped into `ratio`, no draw (for a square source, the whole of it).
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(CROP_TRIES):
        target = area * draws.uniform(scale[0], scale[1])
        aspect = math.exp(draws.uniform(log_lo, log_hi))
        w: float = math.sqrt(target * aspect)
        h: float = math.sqrt(target / aspect)
        if pixels:
            w, h = int(round(w)), int(round(h))
        if 0 < w <= width and 0 < h <= height:
            if left_first:
                left = _offset(draws, width - w, pixels)
                top = _offset(draws, height - h, pixels)
            else:
                top = _offset(draws, height - h, pixels)
                left = _offset(draws, width - w, pixels)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, width / min(ratio)
    elif in_ratio > max(ratio):
        w, h = height * max(ratio), height
    else:
        w, h = width, height
    if pixels:
        w, h = int(round(w)), int(round(h))
        return (height - h) // 2, (width - w) // 2, h, w
    return (height - h) / 2, (width - w) / 2, h, w


def _offset(draws: Draws, span: float, pixels: bool) -> float:
    return draws.randint_inclusive(0, int(span)) if pixels else draws.uniform(0.0, span)
