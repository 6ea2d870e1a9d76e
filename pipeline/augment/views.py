"""Student-side augmented views, keyed by (run seed, epoch, image id).

Every view of a synthetic image is a pure function of ``(run_seed, epoch, image_id)``: a random-resized
crop + horizontal flip of the image, optionally mixed (CutMix or Mixup) with a crop of a partner image.
Because nothing depends on the batch, the sampler, the batch size or the number of DDP ranks, the relabel
stage can render exactly the views the student will see and store the teacher's soft labels for them,
keyed by image id and epoch. The teacher labels the *mixed* view itself, so no label interpolation is needed.

Two halves:

- ``draw_view`` / ``draw_views``: the random parameters (``ViewParams``), all drawn from
  ``generator(run_seed, "view", epoch, image_id)``. Fractions and ``lam`` are rounded to float32 when drawn,
  so that parameters stored in float32 columns (see ``pipeline.softlabels``) round-trip exactly.
- ``render_view`` / ``render_batch``: apply the parameters to image tensors; deterministic, no randomness.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.augment.crops import CROP_RATIO, CROP_SCALE, TorchDraws, random_resized_crop
from pipeline.core.seeding import generator

MIX_MODES = ("cutmix", "mixup", "none")

NO_BOX: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
NO_CUT: tuple[int, int, int, int] = (0, 0, 0, 0)


@dataclass(frozen=True)
class ViewConfig:
    """How student views are drawn.

    resolution: output side in pixels (CutMix rectangles are in these pixels).
    crop_scale: area range of the random-resized crop, as a fraction of the source.
    mix: "cutmix", "mixup" or "none".
    mix_alpha: lambda ~ Beta(mix_alpha, mix_alpha).
    mix_prob: probability that a view is mixed at all.
    """

    resolution: int
    crop_scale: tuple[float, float] = CROP_SCALE
    mix: str = "cutmix"
    mix_alpha: float = 1.0
    mix_prob: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.resolution, int) or isinstance(self.resolution, bool) or self.resolution < 1:
            raise ValueError(f"ViewConfig.resolution must be a positive int, got {self.resolution!r}")
        if len(self.crop_scale) != 2:
            raise ValueError(f"ViewConfig.crop_scale must be (low, high), got {self.crop_scale!r}")
        lo, hi = (float(s) for s in self.crop_scale)
        if not (0.0 < lo <= hi <= 1.0):
            raise ValueError(
                f"ViewConfig.crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale!r}"
            )
        object.__setattr__(self, "crop_scale", (lo, hi))
        if self.mix not in MIX_MODES:
            raise ValueError(f"ViewConfig.mix must be one of {MIX_MODES}, got {self.mix!r}")
        if not (math.isfinite(self.mix_alpha) and self.mix_alpha > 0.0):
            raise ValueError(f"ViewConfig.mix_alpha must be > 0, got {self.mix_alpha!r}")
        if not (0.0 <= self.mix_prob <= 1.0):
            raise ValueError(f"ViewConfig.mix_prob must be in [0, 1], got {self.mix_prob!r}")


@dataclass(frozen=True)
class ViewParams:
    """The random parameters of one view.

    box: crop of the image (top, left, height, width), fractions of the source size.
    flip: horizontal flip of the image crop.
    partner: image id of the mix partner, -1 if the view is not mixed.
    partner_box: crop of the partner, fractions; (0, 0, 0, 0) if not mixed.
    partner_flip: horizontal flip of the partner crop.
    lam: share of the final view that comes from the image itself (after CutMix clipping); 1.0 if not mixed.
    cut: CutMix rectangle in output pixels (y0, x0, y1, x1), half-open; (0, 0, 0, 0) if none.
    """

    box: tuple[float, float, float, float]
    flip: bool
    partner: int = -1
    partner_box: tuple[float, float, float, float] = NO_BOX
    partner_flip: bool = False
    lam: float = 1.0
    cut: tuple[int, int, int, int] = NO_CUT

    @property
    def mixed(self) -> bool:
        """True when the view blends in a partner image."""
        return self.partner >= 0


def _f32(x: float) -> float:
    """Round to the nearest float32 (so float32 storage round-trips exactly)."""
    return float(np.float32(x))


def _gamma(draws: TorchDraws, alpha: float) -> float:
    """Gamma(alpha, 1) by Marsaglia-Tsang, from the generator's uniforms and normals only."""
    if alpha < 1.0:
        u = draws.uniform()
        return _gamma(draws, alpha + 1.0) * u ** (1.0 / alpha)
    d = alpha - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        x = torch.randn((), generator=draws.gen, dtype=torch.float64).item()
        v = 1.0 + c * x
        if v <= 0.0:
            continue
        v = v * v * v
        u = draws.uniform()
        if u < 1.0 - 0.0331 * x**4 or (u > 0.0 and math.log(u) < 0.5 * x * x + d * (1.0 - v + math.log(v))):
            return d * v


def _beta(d: TorchDraws, alpha: float) -> float:
    """Beta(alpha, alpha) as X / (X + Y) with X, Y ~ Gamma(alpha)."""
    x = _gamma(d, alpha)
    y = _gamma(d, alpha)
    s = x + y
    if s <= 0.0:  # both underflowed (tiny alpha): the distribution is then almost all at 0 and 1
        return 0.5
    return min(max(x / s, 0.0), 1.0)


def _crop_box(d: TorchDraws, scale: tuple[float, float]) -> tuple[float, float, float, float]:
    """RandomResizedCrop window in fractions of a (square) source: (top, left, height, width).

    The shared sampler on a 1 x 1 source with fractional offsets; its fallback (the central crop) is
    then the whole image. No pixel rounding here (``render_view`` rounds to the source's pixels), only
    the float32 rounding of stored parameters.
    """
    top, left, h, w = random_resized_crop(d, 1.0, 1.0, scale, CROP_RATIO, pixels=False)
    return (_f32(top), _f32(left), _f32(h), _f32(w))


def _cutmix_rect(d: TorchDraws, lam: float, res: int) -> tuple[int, int, int, int]:
    """A rectangle of area ~(1 - lam) * res^2, centre uniform over the pixels, clipped to the image."""
    cut_ratio = math.sqrt(1.0 - lam)
    ch = int(res * cut_ratio)
    cw = int(res * cut_ratio)
    cy = d.randbelow(res)
    cx = d.randbelow(res)
    y0 = min(max(cy - ch // 2, 0), res)
    y1 = min(max(cy + ch // 2, 0), res)
    x0 = min(max(cx - cw // 2, 0), res)
    x1 = min(max(cx + cw // 2, 0), res)
    return (y0, x0, y1, x1)


def draw_view(run_seed: int, epoch: int, image_id: int, num_images: int, cfg: ViewConfig) -> ViewParams:
    """The view of image ``image_id`` at ``epoch``: a pure function of (run_seed, epoch, image_id) and cfg.

    All randomness comes from ``generator(run_seed, "view", epoch, image_id)``, in this order: image crop,
    image flip, mix decision (only if 0 < mix_prob < 1), partner, partner crop, partner flip, lambda,
    CutMix centre. The partner is uniform over the other ``num_images - 1`` images; with a single image
    there is no partner and the view is not mixed.
    """
    if not (0 <= image_id < num_images):
        raise ValueError(f"image_id {image_id} outside [0, {num_images})")
    # float64 uniforms: the views' parameters were drawn at that precision from the start.
    d = TorchDraws(generator(run_seed, "view", int(epoch), int(image_id)), torch.float64)
    box = _crop_box(d, cfg.crop_scale)
    flip = d.uniform() < 0.5

    if cfg.mix == "none" or num_images < 2 or cfg.mix_prob == 0.0:
        return ViewParams(box=box, flip=flip)
    if cfg.mix_prob < 1.0 and d.uniform() >= cfg.mix_prob:
        return ViewParams(box=box, flip=flip)

    r = d.randbelow(num_images - 1)
    partner = r + 1 if r >= image_id else r
    partner_box = _crop_box(d, cfg.crop_scale)
    partner_flip = d.uniform() < 0.5
    lam = _beta(d, cfg.mix_alpha)
    cut = NO_CUT
    if cfg.mix == "cutmix":
        res = cfg.resolution
        cut = _cutmix_rect(d, lam, res)
        y0, x0, y1, x1 = cut
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(res * res)
    return ViewParams(
        box=box,
        flip=flip,
        partner=partner,
        partner_box=partner_box,
        partner_flip=partner_flip,
        lam=_f32(lam),
        cut=cut,
    )


def draw_views(
    run_seed: int, epoch: int, image_ids: Sequence[int], num_images: int, cfg: ViewConfig
) -> list[ViewParams]:
    """``draw_view`` for each id, in order (the result does not depend on how ids are batched)."""
    return [draw_view(run_seed, epoch, int(i), num_images, cfg) for i in image_ids]


def _as_float_image(x: Tensor) -> Tensor:
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"expected an image tensor [3, H, W], got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if not x.is_floating_point():
        raise ValueError(f"expected a float image in [0, 1] or uint8, got dtype {x.dtype}")
    return x


def _crop_resize(x: Tensor, box: Sequence[float], flip: bool, res: int) -> Tensor:
    """Crop by a fractional box (rounded to the source's pixels), bilinear resize to res x res, flip."""
    _, h, w = x.shape
    py, px, ph, pw = _crop_pixels(box, h, w)
    crop = x[:, py : py + ph, px : px + pw].unsqueeze(0)
    out = F.interpolate(crop, size=(res, res), mode="bilinear", align_corners=False, antialias=False)[0]
    if flip:
        out = out.flip(-1)
    return out


def render_view(image: Tensor, partner: Tensor | None, p: ViewParams, resolution: int) -> Tensor:
    """Render one view: [3, res, res] float in [0, 1].

    ``image`` and ``partner`` are [3, H, W] floats in [0, 1] (uint8 is accepted and scaled), any size,
    on any device. The image crop is resized (bilinear, no antialias) and flipped; if the view is mixed,
    the partner's crop is rendered the same way and either pasted into ``p.cut`` (CutMix: ``cut`` is not
    (0, 0, 0, 0)) or blended as ``lam * image + (1 - lam) * partner`` (Mixup). ``resolution`` must be the
    one the params were drawn for.
    """
    img = _as_float_image(image)
    out = _crop_resize(img, p.box, p.flip, resolution)
    if not p.mixed:
        return out.clamp_(0.0, 1.0)
    if partner is None:
        raise ValueError(f"view is mixed with image {p.partner} but no partner image was given")
    other = _crop_resize(
        _as_float_image(partner).to(out.device, out.dtype), p.partner_box, p.partner_flip, resolution
    )
    if p.cut != NO_CUT:
        y0, x0, y1, x1 = p.cut
        if not (0 <= y0 <= y1 <= resolution and 0 <= x0 <= x1 <= resolution):
            raise ValueError(f"CutMix rectangle {p.cut} does not fit a {resolution} px view")
        out = out.clone()
        out[:, y0:y1, x0:x1] = other[:, y0:y1, x0:x1]
        return out.clamp_(0.0, 1.0)
    # Mixup (a CutMix rectangle clipped to nothing at the origin also lands here, with lam == 1).
    return (p.lam * out + (1.0 - p.lam) * other).clamp_(0.0, 1.0)


def render_batch(
    images: list[Tensor], partners: list[Tensor | None], params: list[ViewParams], resolution: int
) -> Tensor:
    """``render_view`` for each (image, partner, params) triple, stacked to [B, 3, res, res]."""
    if not (len(images) == len(partners) == len(params)):
        raise ValueError(
            f"render_batch: {len(images)} images, {len(partners)} partners, {len(params)} params"
        )
    if not images:
        return torch.empty(0, 3, resolution, resolution)
    return torch.stack([render_view(i, q, p, resolution) for i, q, p in zip(images, partners, params, strict=True)])


def _crop_pixels(box: Sequence[float], h: int, w: int) -> tuple[int, int, int, int]:
    """A fractional box as source pixels (py, px, ph, pw): the crop of `_crop_resize` and `render_views_batched`."""
    top, left, bh, bw = (float(v) for v in box)
    ph = min(max(1, round(bh * h)), h)
    pw = min(max(1, round(bw * w)), w)
    py = min(max(0, round(top * h)), h - ph)
    px = min(max(0, round(left * w)), w - pw)
    return py, px, ph, pw


def _sample_axis(start: Tensor, size: Tensor, res: int) -> tuple[Tensor, Tensor, Tensor]:
    """Bilinear sampling along one axis, as `F.interpolate(align_corners=False)` computes it: for each crop
    (start, size) [B] and output pixel i, the source index (i + 0.5) * size / res - 0.5 clamped at 0, its two
    neighbours (the second clamped to the crop) and the weight of the second, in float32."""
    scale = (size.float() / res).unsqueeze(1)  # [B, 1], as the kernel's float input_size / output_size
    # scale * (i + 0.5) - 0.5 rounded once to float32, as the kernel's fused multiply-add (the product is exact
    # in float64)
    half = torch.arange(res, device=size.device, dtype=torch.float64) + 0.5
    src = (scale.double() * half - 0.5).float().clamp_(min=0.0)
    i0 = src.long()  # floor, src >= 0
    lam1 = (src - i0).clamp_(0.0, 1.0)
    i1 = torch.minimum(i0 + 1, (size - 1).unsqueeze(1))
    base = start.unsqueeze(1)
    return base + i0, base + i1, lam1


def _render_crops(images: Tensor, rows: Tensor, crops: Tensor, flips: Tensor, res: int) -> Tensor:
    """Crop images[rows] by `crops` [B, 4] (py, px, ph, pw), resize bilinearly to res x res, flip where `flips`:
    [B, C, res, res] float in [0, 1] (uint8 sources are scaled by 1 / 255 as `render_view` does).

    Separable: two row gathers blended along y ([B, C, res, W]), then two column gathers blended along x."""
    y0, y1, ly = _sample_axis(crops[:, 0], crops[:, 2], res)  # [B, res]
    x0, x1, lx = _sample_axis(crops[:, 1], crops[:, 3], res)
    # a flipped view reads its columns right to left (flip after the resize = reversed column sampling)
    flip = flips.unsqueeze(1)
    x0, x1, lx = (torch.where(flip, t.flip(1), t) for t in (x0, x1, lx))
    src = images.index_select(0, rows)
    src = src.float() / 255.0 if src.dtype == torch.uint8 else src.float()
    n, c, _, w = src.shape

    def rows_at(ys: Tensor) -> Tensor:  # [B, C, res, W]
        return src.gather(2, ys.view(n, 1, res, 1).expand(n, c, res, w))

    wy1 = ly.view(n, 1, res, 1)
    by_y = rows_at(y0) * (1.0 - wy1) + rows_at(y1) * wy1

    def cols_at(xs: Tensor) -> Tensor:  # [B, C, res, res]
        return by_y.gather(3, xs.view(n, 1, 1, res).expand(n, c, res, res))

    wx1 = lx.view(n, 1, 1, res)
    return cols_at(x0) * (1.0 - wx1) + cols_at(x1) * wx1


def render_views_batched(images: Tensor, ids: Sequence[int], params: Sequence[ViewParams], resolution: int) -> Tensor:
    """All views of a batch in one call on `images`' device: [B, 3, res, res] float in [0, 1].

    ``images`` is the whole set [N, 3, H, W] (uint8, or float in [0, 1]); view b renders image ``ids[b]`` (and
    its partner) with ``params[b]``. The same views as ``render_batch`` (one ``F.interpolate`` per crop), with
    the bilinear source positions and weights computed as that kernel computes them (a float32 scale, the position
    rounded once as its fused multiply-add): on the CPU the pixels agree with it to 2 float32 ulps (its
    vectorized sums round in another order; ``tests/test_augment.py`` states the tolerance). The loop over views
    is only over their integer crop boxes; sampling, flips, CutMix pastes and Mixup blends are tensor operations
    on the device.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [N, 3, H, W], got shape {tuple(images.shape)}")
    if len(ids) != len(params):
        raise ValueError(f"render_views_batched: {len(ids)} ids, {len(params)} params")
    res, dev = resolution, images.device
    if not ids:
        return torch.empty(0, 3, res, res, device=dev)
    h, w = int(images.shape[2]), int(images.shape[3])
    rows = torch.tensor([int(i) for i in ids], dtype=torch.long, device=dev)
    crops = torch.tensor([_crop_pixels(p.box, h, w) for p in params], dtype=torch.long, device=dev)
    flips = torch.tensor([bool(p.flip) for p in params], device=dev)
    out = _render_crops(images, rows, crops, flips, res)
    mixed = [b for b, p in enumerate(params) if p.mixed]
    if mixed:
        for b in mixed:
            p = params[b]
            if p.cut != NO_CUT:
                y0, x0, y1, x1 = p.cut
                if not (0 <= y0 <= y1 <= res and 0 <= x0 <= x1 <= res):
                    raise ValueError(f"CutMix rectangle {p.cut} does not fit a {res} px view")
        sel = torch.tensor(mixed, dtype=torch.long, device=dev)
        mp = [params[b] for b in mixed]
        other = _render_crops(
            images, torch.tensor([p.partner for p in mp], dtype=torch.long, device=dev),
            torch.tensor([_crop_pixels(p.partner_box, h, w) for p in mp], dtype=torch.long, device=dev),
            torch.tensor([bool(p.partner_flip) for p in mp], device=dev), res)
        cut = torch.tensor([p.cut for p in mp], dtype=torch.long, device=dev)  # [M, 4] y0, x0, y1, x1
        is_cut = torch.tensor([p.cut != NO_CUT for p in mp], device=dev).view(-1, 1, 1, 1)
        grid = torch.arange(res, device=dev)
        inside_y = (grid >= cut[:, 0:1]) & (grid < cut[:, 2:3])  # [M, res]
        inside_x = (grid >= cut[:, 1:2]) & (grid < cut[:, 3:4])
        paste = (inside_y.view(-1, 1, res, 1) & inside_x.view(-1, 1, 1, res)) & is_cut
        # Mixup as render_view computes it: lam * out + (1 - lam) * other, both weights rounded to float32
        # from the Python doubles (the CutMix views keep their pixels: lam there is only the label share)
        lam = torch.tensor([p.lam for p in mp], dtype=torch.float32, device=dev).view(-1, 1, 1, 1)
        rest = torch.tensor([1.0 - p.lam for p in mp], dtype=torch.float32, device=dev).view(-1, 1, 1, 1)
        mine = out.index_select(0, sel)
        blended = torch.where(is_cut, torch.where(paste, other, mine), lam * mine + rest * other)
        out = out.index_copy(0, sel, blended)
    return out.clamp_(0.0, 1.0)
