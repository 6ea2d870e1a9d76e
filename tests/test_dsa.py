"""Differentiable Siamese Augmentation (pipeline.augment.dsa): Siamese draws, each operation's range, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.augment.dsa import (
    DIGITS_STRATEGY,
    GROUPS,
    STRATEGY,
    DSADraw,
    apply,
    augment,
    draw,
    parse_strategy,
    siamese,
)

H = 32


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int = 4, seed: int = 0, size: int = H) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=gen(seed))


def coords(n: int = 1, size: int = H) -> torch.Tensor:
    """Channel 0 = row index + 1, channel 1 = column index + 1, channel 2 = 1 (0 only where zero-filled)."""
    r = torch.arange(size, dtype=torch.float32).view(size, 1).expand(size, size) + 1
    c = torch.arange(size, dtype=torch.float32).view(1, size).expand(size, size) + 1
    return torch.stack([r, c, torch.ones(size, size)]).expand(n, 3, size, size).clone()


def one_draw(group: str, seed: int, n: int = 1, size: int = H) -> DSADraw:
    d = draw(gen(seed), group, size, size, n=n)
    assert d is not None and d.group == group
    return d


@pytest.mark.parametrize("strategy", [*GROUPS, STRATEGY])
def test_siamese_pair_gets_identical_parameters(strategy):
    x = images()
    for seed in range(8):
        a, b = siamese(x, x.clone(), gen(seed), strategy)
        assert torch.equal(a, b)
        # The same generator state draws the same augmentation (a seed is a Siamese pair across calls).
        assert torch.equal(augment(x, gen(seed), strategy), augment(x, gen(seed), strategy))


@pytest.mark.parametrize("group", GROUPS)
def test_different_batches_get_the_same_transform(group):
    """real and syn of different sizes and contents: applying the pair equals transforming their concatenation
    with the one draw (the transform is shared, pixel-aligned, not re-drawn per batch)."""
    real, syn = images(6, seed=1), images(2, seed=2)
    for seed in range(6):
        a, b = siamese(real, syn, gen(seed), group)
        d = draw(gen(seed), group, H, H)
        both = apply(torch.cat([real, syn]), d)
        torch.testing.assert_close(torch.cat([a, b]), both)


@pytest.mark.parametrize("group", ["crop", "cutout", "flip", "scale", "rotate"])
def test_geometric_groups_are_one_pixel_map_for_every_image(group):
    """A geometric draw is linear in the image: T(a) + T(b) = T(a + b) (same sampling positions everywhere)."""
    a, b = images(3, seed=3), images(3, seed=4)
    for seed in range(6):
        d = one_draw(group, seed)
        torch.testing.assert_close(apply(a, d) + apply(b, d), apply(a + b, d), atol=1e-5, rtol=1e-5)


def test_one_group_per_call_uniformly_and_digits_never_flip():
    counts = {g: 0 for g in GROUPS}
    for seed in range(600):
        counts[draw(gen(seed), STRATEGY, H, H).group] += 1
    assert all(60 <= c <= 140 for c in counts.values()), counts  # ~100 each
    assert all(draw(gen(s), DIGITS_STRATEGY, H, H).group != "flip" for s in range(200))
    assert parse_strategy("none") == () and draw(gen(0), "none", H, H) is None
    x = images()
    assert augment(x, gen(0), "none") is x
    with pytest.raises(ValueError, match="unknown DSA operation"):
        parse_strategy("color_blur")


def test_color_applies_brightness_saturation_contrast_in_order():
    x = images(2)
    b, s, c = 0.8, 0.3, 0.6
    d = DSADraw("color", {"brightness": torch.tensor([b]), "saturation": torch.tensor([s]),
                          "contrast": torch.tensor([c])}, 1)
    y = x + (b - 0.5)
    grey = y.mean(1, keepdim=True)
    y = (y - grey) * (2 * s) + grey
    m = y.mean((1, 2, 3), keepdim=True)
    y = (y - m) * (c + 0.5) + m
    torch.testing.assert_close(apply(x, d), y)
    # All three factors come in one draw and cover their official ranges.
    draws = [one_draw("color", seed).values for seed in range(300)]
    for key, (lo, hi) in {"brightness": (0, 1), "saturation": (0, 1), "contrast": (0, 1)}.items():
        v = torch.cat([dv[key] for dv in draws])
        assert lo <= v.min() < lo + 0.05 and hi - 0.05 < v.max() < hi


def test_brightness_shift_in_half_unit_range():
    """A grey constant image: saturation and contrast leave it, so the output is the brightness shift U - 0.5."""
    x = torch.zeros(1, 3, 8, 8)
    shifts = []
    for seed in range(300):
        y = apply(x, one_draw("color", seed, size=8))
        assert torch.allclose(y, y.flatten()[0].expand_as(y))
        shifts.append(float(y.flatten()[0]))
    assert -0.5 <= min(shifts) < -0.45 and 0.45 < max(shifts) <= 0.5


def test_crop_is_an_integer_shift_within_an_eighth_with_zero_fill():
    x = coords()
    limit = int(H * 0.125 + 0.5)  # 4 px at 32 px
    seen = set()
    for seed in range(200):
        d = one_draw("crop", seed)
        tx, ty = int(d.values["tx"]), int(d.values["ty"])
        assert abs(tx) <= limit and abs(ty) <= limit
        seen.update((tx, ty))
        # Pixel (i, j) reads (i + tx, j + ty), zero where that lies outside.
        src_r = torch.arange(H).view(H, 1) + tx
        src_c = torch.arange(H).view(1, H) + ty
        inside = ((src_r >= 0) & (src_r < H) & (src_c >= 0) & (src_c < H)).float()
        expect = torch.stack([(src_r + 1).expand(H, H), (src_c + 1).expand(H, H), torch.ones(H, H)]) * inside
        assert torch.equal(apply(x, d)[0], expect)
    assert {-limit, limit} <= seen


def test_cutout_zeroes_a_clipped_square_of_half_the_side():
    x = torch.ones(1, 3, H, H)
    fractions = []
    for seed in range(300):
        y = apply(x, one_draw("cutout", seed))
        zero = y[0, 0] == 0
        assert torch.equal(zero, y[0, 1] == 0)  # all channels
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        # An axis-aligned rectangle of at most (H/2) x (H/2), exactly that when it lies inside the image.
        assert zero.sum() == len(rows) * len(cols) and len(rows) <= H // 2 and len(cols) <= H // 2
        touches = rows[0] == 0 or rows[-1] == H - 1
        assert touches or len(rows) == H // 2
        fractions.append(float(zero.float().mean()))
    assert max(fractions) == 0.25
    # Centre uniform over [0, H] (side even): the expected clipped area is (E[overlap] / H)^2 of the side
    # 0.5 H, ~ 0.19 of the image at 32 px, near the 25 % of an unclipped square.
    overlap = [min(H - 1, cx + 7) - max(0, cx - 8) + 1 for cx in range(H + 1)]
    expected = (sum(overlap) / len(overlap) / H) ** 2
    assert abs(sum(fractions) / len(fractions) - expected) < 0.02


def test_flip_is_horizontal_with_probability_half():
    x = images(2)
    flipped = 0
    for seed in range(400):
        y = apply(x, one_draw("flip", seed))
        assert torch.equal(y, x.flip(3)) or torch.equal(y, x)
        flipped += torch.equal(y, x.flip(3))
    assert 160 < flipped < 240


def test_scale_factors_within_1_2_and_sampled_as_official():
    sx = torch.cat([one_draw("scale", seed).values["sx"] for seed in range(300)])
    sy = torch.cat([one_draw("scale", seed).values["sy"] for seed in range(300)])
    for v in (sx, sy):
        assert 1 / 1.2 <= v.min() < 1 / 1.2 + 0.02 and 1.2 - 0.02 < v.max() <= 1.2
    x = images(2)
    ident = DSADraw("scale", {"sx": torch.tensor([1.0]), "sy": torch.tensor([1.0])}, 1)
    torch.testing.assert_close(apply(x, ident), x)
    # sx = 1.2 samples 1.2x wider than the output: content shrinks towards the centre, zeros at the left/right.
    wide = DSADraw("scale", {"sx": torch.tensor([1.2]), "sy": torch.tensor([1.0])}, 1)
    y = apply(torch.ones(1, 1, H, H), wide)
    assert torch.all(y[..., 0] < 0.5) and torch.allclose(y[..., H // 2], torch.ones(1, 1, H))


def test_rotation_within_15_degrees_about_the_centre():
    angles = torch.cat([one_draw("rotate", seed).values["angle"] for seed in range(300)])
    bound = 15 / 180 * math.pi
    assert -bound <= angles.min() < -bound + 0.02 and bound - 0.02 < angles.max() <= bound
    x = torch.arange(16.0).view(1, 1, 4, 4)
    quarter = DSADraw("rotate", {"angle": torch.tensor([math.pi / 2])}, 1)  # +90 deg: anticlockwise (official)
    torch.testing.assert_close(apply(x, quarter), torch.rot90(x, 1, (2, 3)), atol=1e-5, rtol=0)
    none = DSADraw("rotate", {"angle": torch.tensor([0.0])}, 1)
    torch.testing.assert_close(apply(x, none), x)


@pytest.mark.parametrize("group", GROUPS)
def test_per_sample_draws_equal_one_shared_draw_per_image(group):
    """Per-sample parameters (the non-Siamese call of DSA's inner loop) give each image what a draw shared by a
    batch of that one image gives it: the batched path (gathers, masks, where) and the scalar path agree."""
    x = coords(n=12) + images(12, seed=7)
    for seed in range(4):
        d = one_draw(group, seed, n=12)
        y = apply(x, d)
        for i in range(12):
            single = DSADraw(group, {k: v[i:i + 1] for k, v in d.values.items()}, 1)
            torch.testing.assert_close(y[i:i + 1], apply(x[i:i + 1], single), atol=1e-5, rtol=1e-5)
    d = one_draw(group, 0, n=12)
    assert any(len(set(v.tolist())) > 1 for v in d.values.values())  # the samples do differ
    with pytest.raises(ValueError, match="cannot be applied"):
        apply(images(3), d)


@pytest.mark.parametrize("group", GROUPS)
def test_gradients_flow_to_the_images(group):
    w = torch.randn(2, 3, H, H, generator=gen(9))
    for seed in range(4):
        x = images(2).requires_grad_(True)
        d = one_draw(group, seed, n=2)
        (apply(x, d) * w).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
