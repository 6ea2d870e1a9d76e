"""The one crop sampler draws exactly what the three samplers it replaced drew.

The `_old_*` functions are frozen copies of the code before the merge (pipeline/augment/views.py,
pipeline/methods/synthesis/, pipeline/data/loaders.py); they live only here. For every consumer the box
and the generator state after the call (the next draw) must match, over many seeds and sizes,
including sizes and scales that exhaust the ten tries and reach the fallback.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from pipeline.augment import views as augment
from pipeline.augment.crops import RandomDraws, TorchDraws, random_resized_crop
from pipeline.augment.views import ViewConfig, draw_view
from pipeline.core.seeding import generator
from pipeline.data.images import train_crop_window
from pipeline.methods.synthesis import augment as synthesis

# ----------------------------------------------------------------------------- frozen: pipeline/augment/views.py

_OLD_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def _old_f32(x: float) -> float:
    return float(np.float32(x))


def _old_aug_uniform(g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    u = torch.rand((), generator=g, dtype=torch.float64).item()
    return lo + (hi - lo) * u


def _old_aug_randint(g: torch.Generator, high: int) -> int:
    return int(torch.randint(high, (), generator=g).item())


def _old_gamma(g: torch.Generator, alpha: float) -> float:
    if alpha < 1.0:
        u = _old_aug_uniform(g)
        return _old_gamma(g, alpha + 1.0) * u ** (1.0 / alpha)
    d = alpha - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        x = torch.randn((), generator=g, dtype=torch.float64).item()
        v = 1.0 + c * x
        if v <= 0.0:
            continue
        v = v * v * v
        u = _old_aug_uniform(g)
        if u < 1.0 - 0.0331 * x**4 or (u > 0.0 and math.log(u) < 0.5 * x * x + d * (1.0 - v + math.log(v))):
            return d * v


def _old_beta(g: torch.Generator, alpha: float) -> float:
    x = _old_gamma(g, alpha)
    y = _old_gamma(g, alpha)
    s = x + y
    if s <= 0.0:
        return 0.5
    return min(max(x / s, 0.0), 1.0)


def _old_crop_box(g: torch.Generator, scale: tuple[float, float]) -> tuple[float, float, float, float]:
    log_lo, log_hi = math.log(_OLD_CROP_RATIO[0]), math.log(_OLD_CROP_RATIO[1])
    for _ in range(10):
        area = _old_aug_uniform(g, scale[0], scale[1])
        ratio = math.exp(_old_aug_uniform(g, log_lo, log_hi))
        w = math.sqrt(area * ratio)
        h = math.sqrt(area / ratio)
        if 0.0 < w <= 1.0 and 0.0 < h <= 1.0:
            top = _old_aug_uniform(g, 0.0, 1.0 - h)
            left = _old_aug_uniform(g, 0.0, 1.0 - w)
            return (_old_f32(top), _old_f32(left), _old_f32(h), _old_f32(w))
    return (0.0, 0.0, 1.0, 1.0)


def _old_cutmix_rect(g: torch.Generator, lam: float, res: int) -> tuple[int, int, int, int]:
    cut_ratio = math.sqrt(1.0 - lam)
    ch = int(res * cut_ratio)
    cw = int(res * cut_ratio)
    cy = _old_aug_randint(g, res)
    cx = _old_aug_randint(g, res)
    return (min(max(cy - ch // 2, 0), res), min(max(cx - cw // 2, 0), res),
            min(max(cy + ch // 2, 0), res), min(max(cx + cw // 2, 0), res))


def _old_draw_view(run_seed: int, epoch: int, image_id: int, num_images: int, cfg: ViewConfig) -> tuple:
    """The old draw_view, returning the fields of ViewParams as a tuple."""
    g = generator(run_seed, "view", int(epoch), int(image_id))
    box = _old_crop_box(g, cfg.crop_scale)
    flip = _old_aug_uniform(g) < 0.5
    if cfg.mix == "none" or num_images < 2 or cfg.mix_prob == 0.0:
        return (box, flip, -1, augment.NO_BOX, False, 1.0, augment.NO_CUT)
    if cfg.mix_prob < 1.0 and _old_aug_uniform(g) >= cfg.mix_prob:
        return (box, flip, -1, augment.NO_BOX, False, 1.0, augment.NO_CUT)
    r = _old_aug_randint(g, num_images - 1)
    partner = r + 1 if r >= image_id else r
    partner_box = _old_crop_box(g, cfg.crop_scale)
    partner_flip = _old_aug_uniform(g) < 0.5
    lam = _old_beta(g, cfg.mix_alpha)
    cut = augment.NO_CUT
    if cfg.mix == "cutmix":
        res = cfg.resolution
        cut = _old_cutmix_rect(g, lam, res)
        y0, x0, y1, x1 = cut
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(res * res)
    return (box, flip, partner, partner_box, partner_flip, _old_f32(lam), cut)


# ----------------------------------------------------------------------------- frozen: pipeline/methods/synthesis/


def _old_syn_uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen, device="cpu"))


def _old_syn_randint(gen: torch.Generator, lo: int, hi: int) -> int:
    return int(torch.randint(lo, hi + 1, (), generator=gen, device="cpu"))


def _old_crop_params(
    gen: torch.Generator, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * _old_syn_uniform(gen, scale[0], scale[1])
        aspect = math.exp(_old_syn_uniform(gen, log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = _old_syn_randint(gen, 0, height - h)
            left = _old_syn_randint(gen, 0, width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# ----------------------------------------------------------------------------- frozen: pipeline/data/loaders.py

_OLD_RRC_SCALE = (0.08, 1.0)
_OLD_RRC_RATIO = (3 / 4, 4 / 3)


def _old_random_resized_crop_box(width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
    area = width * height
    log_ratio = (math.log(_OLD_RRC_RATIO[0]), math.log(_OLD_RRC_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*_OLD_RRC_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < _OLD_RRC_RATIO[0]:
        w, h = width, int(round(width / _OLD_RRC_RATIO[0]))
    elif in_ratio > _OLD_RRC_RATIO[1]:
        w, h = int(round(height * _OLD_RRC_RATIO[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


# ----------------------------------------------------------------------------- the comparisons

# Square and extreme sides (the extremes exhaust the tries and take each fallback branch).
SIZES = [(1, 1), (2, 3), (7, 5), (16, 16), (32, 32), (33, 47), (64, 64), (224, 224), (375, 500), (500, 375),
         (3, 300), (300, 3), (1, 50), (50, 1), (10, 1000), (1000, 10)]
SCALES = [(0.08, 1.0), (0.5, 1.0), (0.9, 1.0), (1.0, 1.0), (0.01, 0.02), (0.25, 0.25)]
SEEDS = range(60)


def _pair(seed: int) -> tuple[torch.Generator, torch.Generator]:
    return generator(seed, "crop-test"), generator(seed, "crop-test")


def _after_fallback_torch(seed: int, dtype: torch.dtype | None) -> torch.Tensor:
    """Generator state after the 20 uniforms of ten failed tries (the fallback draws no offset)."""
    g = generator(seed, "crop-test")
    for _ in range(20):
        torch.rand((), generator=g, dtype=dtype)
    return g.get_state()


def test_view_crop_box_matches_old_augment() -> None:
    fallbacks = 0
    for seed in SEEDS:
        for scale in SCALES:
            g_old, g_new = _pair(seed)
            old = _old_crop_box(g_old, scale)
            new = augment._crop_box(TorchDraws(g_new, torch.float64), scale)
            assert new == old, (seed, scale)
            assert all(type(a) is type(b) for a, b in zip(new, old, strict=True))
            # Same number of draws: the generators continue identically.
            assert torch.equal(g_old.get_state(), g_new.get_state())
            fallbacks += torch.equal(g_old.get_state(), _after_fallback_torch(seed, torch.float64))
    assert fallbacks > 0  # the (1.0, 1.0) and (0.9, 1.0) scales reach the fallback


@pytest.mark.parametrize("mix", ["cutmix", "mixup", "none"])
def test_draw_view_matches_old_augment(mix: str) -> None:
    cfgs = [ViewConfig(resolution=r, crop_scale=s, mix=mix, mix_alpha=a, mix_prob=p)
            for r, s, a, p in [(32, (0.08, 1.0), 1.0, 1.0), (17, (0.9, 1.0), 0.3, 0.5), (224, (0.5, 1.0), 2.5, 0.8)]]
    for cfg in cfgs:
        for seed in range(4):
            for epoch in range(3):
                for image_id in range(0, 40, 3):
                    v = draw_view(seed, epoch, image_id, 40, cfg)
                    new = (v.box, v.flip, v.partner, v.partner_box, v.partner_flip, v.lam, v.cut)
                    assert new == _old_draw_view(seed, epoch, image_id, 40, cfg), (cfg, seed, epoch, image_id)


def test_recover_crop_params_match_old_synthesis() -> None:
    ratio = (3.0 / 4.0, 4.0 / 3.0)
    fallbacks = 0
    for seed in SEEDS:
        for height, width in SIZES:
            for scale in SCALES:
                g_old, g_new = _pair(seed)
                old = _old_crop_params(g_old, height, width, scale, ratio)
                new = synthesis._crop_params(g_new, height, width, scale, ratio)
                assert new == old, (seed, height, width, scale)
                assert all(type(v) is int for v in new)
                assert torch.equal(g_old.get_state(), g_new.get_state())
                fallbacks += torch.equal(g_old.get_state(), _after_fallback_torch(seed, None))
        g_old, g_new = _pair(seed)
        assert _old_syn_uniform(g_old, -2.0, 3.0) == synthesis._uniform(g_new, -2.0, 3.0)
        assert _old_syn_randint(g_old, 0, 32) == synthesis._randint_inclusive(g_new, 0, 32)
        assert torch.equal(g_old.get_state(), g_new.get_state())
    assert fallbacks > 0


def test_loader_crop_window_matches_old_loaders() -> None:
    centred = 0
    for seed in SEEDS:
        after_fallback = random.Random(seed)
        for _ in range(20):  # the 20 uniforms of ten failed tries, no offset
            after_fallback.random()
        for height, width in SIZES:
            r_old, r_new = random.Random(seed), random.Random(seed)
            old = _old_random_resized_crop_box(width, height, r_old)
            new = train_crop_window(r_new, width, height)
            assert new == old, (seed, height, width)
            assert all(type(v) is int for v in new)
            assert r_old.getstate() == r_new.getstate()
            centred += r_old.getstate() == after_fallback.getstate()
    assert centred > 0


def test_fallback_is_the_clipped_central_crop() -> None:
    class Never:
        """Draws that never fit: the area fraction is huge."""

        def uniform(self, lo: float, hi: float) -> float:
            return 1e9 if lo >= 0 else 0.0

        def randint_inclusive(self, lo: int, hi: int) -> int:
            raise AssertionError("no offset is drawn in the fallback")

    # Too tall: the full width, height clipped to width / (3/4) = 13; too wide: the other way round.
    assert random_resized_crop(Never(), 100, 10) == ((100 - 13) // 2, 0, 13, 10)
    assert random_resized_crop(Never(), 10, 100) == (0, (100 - 13) // 2, 10, 13)
    assert random_resized_crop(Never(), 40, 50) == (0, 0, 40, 50)
    assert random_resized_crop(Never(), 1.0, 1.0, pixels=False) == (0.0, 0.0, 1.0, 1.0)


def test_random_draws_are_pythons() -> None:
    a, b = random.Random(3), random.Random(3)
    d = RandomDraws(b)
    assert [d.uniform(0.5, 2.0) for _ in range(5)] == [a.uniform(0.5, 2.0) for _ in range(5)]
    assert [d.randint_inclusive(0, 4) for _ in range(20)] == [a.randint(0, 4) for _ in range(20)]
