"""Views keyed by (seed, epoch, image id): determinism, batch independence, rendering."""

from __future__ import annotations

import pytest
import torch

from pipeline.augment.views import (
    ViewConfig,
    ViewParams,
    draw_view,
    draw_views,
    render_batch,
    render_view,
    render_views_batched,
)

RES = 16
N = 10
CUTMIX = ViewConfig(resolution=RES, mix="cutmix")
MIXUP = ViewConfig(resolution=RES, mix="mixup", mix_alpha=0.8)


def test_draw_view_is_pure_function_of_seed_epoch_id() -> None:
    for i in range(5):
        assert draw_view(7, 3, i, N, CUTMIX) == draw_view(7, 3, i, N, CUTMIX)
    # A different epoch, id or seed gives a different view.
    assert all(draw_view(7, 3, i, N, CUTMIX) != draw_view(7, 4, i, N, CUTMIX) for i in range(5))
    assert all(draw_view(7, 3, i, N, CUTMIX) != draw_view(8, 3, i, N, CUTMIX) for i in range(5))
    boxes = {draw_view(7, 3, i, N, CUTMIX).box for i in range(N)}
    assert len(boxes) == N


def test_views_do_not_depend_on_batching() -> None:
    one_by_one = [draw_view(1, 2, i, N, CUTMIX) for i in range(N)]
    in_threes = [
        v for s in range(0, N, 3) for v in draw_views(1, 2, list(range(s, min(s + 3, N))), N, CUTMIX)
    ]
    whole = draw_views(1, 2, list(range(N)), N, CUTMIX)
    shuffled_ids = [3, 9, 0, 5, 1, 8, 2, 7, 4, 6]
    shuffled = dict(zip(shuffled_ids, draw_views(1, 2, shuffled_ids, N, CUTMIX), strict=True))
    assert one_by_one == in_threes == whole == [shuffled[i] for i in range(N)]


def test_cutmix_params_are_consistent() -> None:
    for epoch in range(3):
        for i in range(N):
            v = draw_view(0, epoch, i, N, CUTMIX)
            assert 0 <= v.partner < N and v.partner != i
            assert 0.0 <= v.lam <= 1.0
            y0, x0, y1, x1 = v.cut
            assert 0 <= y0 <= y1 <= RES and 0 <= x0 <= x1 <= RES
            assert v.lam == pytest.approx(1.0 - (y1 - y0) * (x1 - x0) / RES**2, abs=1e-6)
            top, left, h, w = v.box
            assert 0.0 <= top and 0.0 <= left and 0.0 < h and 0.0 < w
            assert top + h <= 1.0 + 1e-6 and left + w <= 1.0 + 1e-6
            assert 0.08 - 1e-6 <= h * w <= 1.0 + 1e-6 or v.box == (0.0, 0.0, 1.0, 1.0)


def test_mixup_and_no_mix_params() -> None:
    lams = [draw_view(0, 0, i, N, MIXUP).lam for i in range(N)]
    assert all(0.0 <= lam <= 1.0 for lam in lams) and len(set(lams)) > 1
    assert all(draw_view(0, 0, i, N, MIXUP).cut == (0, 0, 0, 0) for i in range(N))
    plain = draw_view(0, 0, 4, N, ViewConfig(resolution=RES, mix="none"))
    assert plain.partner == -1 and plain.lam == 1.0
    # A single image cannot be mixed with another one.
    assert draw_view(0, 0, 0, 1, CUTMIX).partner == -1
    # mix_prob = 0.5 mixes some views and not others.
    half = [draw_view(0, 0, i, N, ViewConfig(resolution=RES, mix_prob=0.5)).partner for i in range(N)]
    assert -1 in half and any(p >= 0 for p in half)


def test_view_config_validates() -> None:
    with pytest.raises(ValueError):
        ViewConfig(resolution=0)
    with pytest.raises(ValueError):
        ViewConfig(resolution=8, mix="cutout")
    with pytest.raises(ValueError):
        ViewConfig(resolution=8, crop_scale=(0.5, 0.2))
    with pytest.raises(ValueError):
        ViewConfig(resolution=8, mix_alpha=0.0)
    with pytest.raises(ValueError):
        ViewConfig(resolution=8, mix_prob=1.5)


def _gradient_image(h: int = 24, w: int = 24) -> torch.Tensor:
    """Brightness rises left to right, a different constant per channel added vertically."""
    x = torch.linspace(0.0, 1.0, w).expand(h, w)
    y = torch.linspace(0.0, 0.2, h).unsqueeze(1).expand(h, w)
    return torch.stack([x * 0.8 + y, x * 0.5, x * 0.3 + y]).clamp(0, 1)


FULL = (0.0, 0.0, 1.0, 1.0)


def test_render_shape_range_and_determinism() -> None:
    g = torch.Generator().manual_seed(0)
    imgs = [torch.rand(3, 20 + 3 * i, 28, generator=g) for i in range(N)]
    for i in range(3):
        v = draw_view(5, 0, i, N, CUTMIX)
        out = render_view(imgs[i], imgs[v.partner], v, RES)
        assert out.shape == (3, RES, RES) and out.dtype == torch.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
        assert torch.equal(out, render_view(imgs[i], imgs[v.partner], v, RES))
    params = draw_views(5, 0, [0, 1, 2], N, CUTMIX)
    batch = render_batch([imgs[i] for i in range(3)], [imgs[p.partner] for p in params], params, RES)
    assert batch.shape == (3, 3, RES, RES)
    assert torch.equal(batch[1], render_view(imgs[1], imgs[params[1].partner], params[1], RES))
    # uint8 input renders like its float version.
    u8 = (imgs[0] * 255).round().to(torch.uint8)
    plain = ViewParams(box=FULL, flip=False)
    assert torch.allclose(render_view(u8, None, plain, RES), render_view(u8.float() / 255, None, plain, RES))


def test_flip_really_flips() -> None:
    img = _gradient_image()
    straight = render_view(img, None, ViewParams(box=FULL, flip=False), RES)
    flipped = render_view(img, None, ViewParams(box=FULL, flip=True), RES)
    assert (straight[:, :, -1] > straight[:, :, 0]).all()
    assert (flipped[:, :, 0] > flipped[:, :, -1]).all()
    assert torch.equal(flipped, straight.flip(-1))
    # The full box at the source's size is the identity.
    same = render_view(img, None, ViewParams(box=FULL, flip=False), 24)
    assert torch.allclose(same, img, atol=1e-6)


def test_crop_box_selects_the_region() -> None:
    img = _gradient_image(32, 32)
    right_half = render_view(img, None, ViewParams(box=(0.0, 0.5, 1.0, 0.5), flip=False), 16)
    expected = torch.nn.functional.interpolate(
        img[None, :, :, 16:], size=(16, 16), mode="bilinear", align_corners=False
    )[0]
    assert torch.allclose(right_half, expected, atol=1e-6)
    left_half = render_view(img, None, ViewParams(box=(0.0, 0.0, 1.0, 0.5), flip=False), 16)
    assert right_half[0].mean() > left_half[0].mean() + 0.3


def test_cutmix_region_is_partner_crop() -> None:
    img = torch.zeros(3, 20, 20)
    partner = _gradient_image(20, 20)
    pbox = (0.1, 0.2, 0.6, 0.7)
    v = ViewParams(
        box=FULL,
        flip=False,
        partner=1,
        partner_box=pbox,
        partner_flip=True,
        lam=1.0 - 36 / RES**2,
        cut=(2, 5, 8, 11),
    )
    out = render_view(img, partner, v, RES)
    partner_view = render_view(partner, None, ViewParams(box=pbox, flip=True), RES)
    assert torch.equal(out[:, 2:8, 5:11], partner_view[:, 2:8, 5:11])
    mask = torch.ones(RES, RES, dtype=torch.bool)
    mask[2:8, 5:11] = False
    assert (out[:, mask] == 0).all()
    with pytest.raises(ValueError):
        render_view(img, None, v, RES)  # a mixed view needs its partner


def test_mixup_is_convex_combination() -> None:
    g = torch.Generator().manual_seed(1)
    img, partner = torch.rand(3, 18, 22, generator=g), torch.rand(3, 30, 30, generator=g)
    box, pbox = (0.1, 0.1, 0.8, 0.7), (0.0, 0.3, 0.5, 0.5)
    v = ViewParams(box=box, flip=True, partner=3, partner_box=pbox, partner_flip=False, lam=0.3)
    out = render_view(img, partner, v, RES)
    a = render_view(img, None, ViewParams(box=box, flip=True), RES)
    b = render_view(partner, None, ViewParams(box=pbox, flip=False), RES)
    assert torch.allclose(out, 0.3 * a + 0.7 * b, atol=1e-6)
    assert not torch.allclose(out, a, atol=1e-3)


@pytest.mark.parametrize("mix", ["cutmix", "mixup", "none"])
@pytest.mark.parametrize("source, res", [(32, 32), (20, 32), (64, 24), (256, 224)])
def test_batched_views_on_the_device_equal_the_per_view_loop_to_two_ulps(mix: str, source: int, res: int) -> None:
    """`render_views_batched` (one call for the batch, the set held as uint8) against `render_batch` (one
    `F.interpolate` per crop): up- and down-scaling crops, flips, CutMix pastes and Mixup blends agree to 2 float32
    ulps at 1.0 (the CPU kernel sums in another order)."""
    g = torch.Generator().manual_seed(source + res)
    images = torch.randint(0, 256, (24, 3, source, source), dtype=torch.uint8, generator=g)
    cfg = ViewConfig(resolution=res, mix=mix)
    ids = [3, 0, 7, 7, 23, 11, 5, 18]
    for epoch in range(3):
        params = draw_views(5, epoch, ids, len(images), cfg)
        loop = render_batch([images[i].float() / 255 for i in ids],
                            [images[p.partner].float() / 255 if p.mixed else None for p in params], params, res)
        batched = render_views_batched(images, ids, params, res)
        assert batched.shape == loop.shape == (len(ids), 3, res, res) and batched.dtype == torch.float32
        assert (batched - loop).abs().max() <= 2.4e-7
        # float sources in [0, 1] render the same
        assert torch.equal(render_views_batched(images.float() / 255, ids, params, res), batched)
    assert any(p.flip for p in params) and (mix == "none" or any(p.mixed for p in params))
    assert render_views_batched(images, [], [], res).shape == (0, 3, res, res)
    with pytest.raises(ValueError, match="ids"):
        render_views_batched(images, ids[:2], params, res)
