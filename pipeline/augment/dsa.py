"""Differentiable Siamese Augmentation (DSA): Zhao & Bilen, "Dataset Condensation with Differentiable Siamese
Augmentation", ICML 2021; official code `utils.py` (`ParamDiffAug`, `DiffAugment`, `rand_*`) of
https://github.com/VICO-UoE/DatasetCondensation, also used unchanged by DM and DataDAM.

What the official code does, and this file reproduces:

* `aug_mode = 'S'`: each call draws ONE group of the strategy (e.g. `color_crop_cutout_flip_scale_rotate`)
  uniformly and applies only that group; the group `color` applies all three of its operations, in the order
  brightness (x + (U - 0.5)), saturation (grey + (x - grey) * 2U, grey = the channel mean per pixel),
  contrast (m + (x - m) * (U + 0.5), m = the mean of the whole image).
* crop: an integer shift (tx, ty), each uniform in [-round(0.125 H), round(0.125 H)], zero fill;
  cutout: a zero square of side round(0.5 H) whose centre is uniform (clipped at the border);
  flip: horizontal with probability 0.5; scale: x and y factors uniform in [1/1.2, 1.2] (an affine
  sampling grid, bilinear, zero padding); rotate: an angle uniform in [-15, 15] degrees (same).
* Siamese (a seed given): the real and the synthetic batch of a class get the SAME parameters, and, because
  the official code overwrites every sample's parameters with sample 0's, one draw serves the whole batch.
  Without a seed (the inner loop of DSA, which trains the network on the synthetic set) every sample draws
  its own parameters, but the group is still chosen once per call.

Here a draw is a value (`DSADraw`): `draw(gen, ...)` makes it from a torch.Generator, `apply(x, d)` applies it,
so the Siamese pair is `apply(real, d)`, `apply(syn, d)` and both are exactly aligned. The augmentation runs on
normalized images (as the official code: the zero fill of crop and cutout is the data mean). Every operation is
differentiable w.r.t. the images (arithmetic, masks, gathers and `grid_sample`); nothing here reads the global
RNG, so the same generator state gives the same augmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

STRATEGY = "color_crop_cutout_flip_scale_rotate"
"""The official strategy for natural images (CIFAR, Fashion-MNIST, Tiny-ImageNet)."""
DIGITS_STRATEGY = "color_crop_cutout_scale_rotate"
"""The official strategy for digits (MNIST, SVHN): the official readme drops flip, "not good for digit data sets"."""
GROUPS = ("color", "crop", "cutout", "flip", "scale", "rotate")


@dataclass(frozen=True)
class DSAParams:
    """Magnitudes of the operations: the official `ParamDiffAug` values."""

    flip_p: float = 0.5  # probability of a horizontal flip
    scale: float = 1.2  # scale factors uniform in [1 / scale, scale]
    rotate: float = 15.0  # degrees, angle uniform in [-rotate, rotate]
    crop_pad: float = 0.125  # shift up to round(crop_pad * side) pixels each way
    cutout: float = 0.5  # side of the zero square, as a fraction of the image side
    brightness: float = 1.0  # x + (U - 0.5) * brightness
    saturation: float = 2.0  # saturation factor U * saturation
    contrast: float = 0.5  # contrast factor U + contrast


DEFAULT_PARAMS = DSAParams()


def parse_strategy(strategy: str) -> tuple[str, ...]:
    """The groups of a strategy string such as 'color_crop_cutout_flip_scale_rotate' ('' or 'none': none)."""
    if strategy in ("", "none", "None"):
        return ()
    groups = tuple(strategy.split("_"))
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        raise ValueError(f"unknown DSA operation(s) {bad} in strategy {strategy!r}; valid: {', '.join(GROUPS)}")
    return groups


@dataclass(frozen=True)
class DSADraw:
    """One draw: the chosen group and its parameters, CPU tensors of shape [n] (n = 1: shared by the batch)."""

    group: str
    values: dict[str, Tensor]
    n: int


def _cutout_side(side: int, params: DSAParams) -> int:
    return int(side * params.cutout + 0.5)


def draw(gen: torch.Generator, strategy: str, height: int, width: int, n: int = 1,
         params: DSAParams = DEFAULT_PARAMS) -> DSADraw | None:
    """Draw one group of `strategy` and its parameters from `gen` (CPU): `n` = 1 for a Siamese draw shared by
    every image it is applied to, or the batch size for per-sample parameters. None for an empty strategy.

    Ranges and integer conventions are the official ones: crop shifts `randint(-s, s + 1)` with
    s = int(0.125 * side + 0.5); cutout centres `randint(0, side + (1 - k % 2))` for a square of side
    k = int(0.5 * side + 0.5), covering rows [centre - k // 2, centre - k // 2 + k) clipped to the image.
    """
    groups = parse_strategy(strategy)
    if not groups:
        return None
    group = groups[int(torch.randint(len(groups), (), generator=gen))]

    def u() -> Tensor:
        return torch.rand(n, generator=gen)

    if group == "color":
        values = {"brightness": u(), "saturation": u(), "contrast": u()}
    elif group == "crop":
        sh, sw = int(height * params.crop_pad + 0.5), int(width * params.crop_pad + 0.5)
        values = {"tx": torch.randint(-sh, sh + 1, (n,), generator=gen),
                  "ty": torch.randint(-sw, sw + 1, (n,), generator=gen)}
    elif group == "cutout":
        kh, kw = _cutout_side(height, params), _cutout_side(width, params)
        values = {"cx": torch.randint(0, height + (1 - kh % 2), (n,), generator=gen),
                  "cy": torch.randint(0, width + (1 - kw % 2), (n,), generator=gen)}
    elif group == "flip":
        values = {"u": u()}
    elif group == "scale":
        r = params.scale
        values = {"sx": u() * (r - 1.0 / r) + 1.0 / r, "sy": u() * (r - 1.0 / r) + 1.0 / r}
    else:  # rotate
        values = {"angle": (u() - 0.5) * 2.0 * params.rotate / 180.0 * math.pi}
    return DSADraw(group=group, values=values, n=n)


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A small CPU tensor on `device` without a host sync: on CUDA through pinned memory and an asynchronous copy
    (a plain `.to()` from pageable memory waits for the stream to drain)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _per_sample(v: Tensor, x: Tensor) -> float | Tensor:
    """A parameter [n] as a Python number (n = 1: shared by the batch, no transfer) or [n, 1, 1, 1] on x's device."""
    if v.numel() == 1:
        return float(v)
    return to_device(v, x.device).to(x.dtype).view(-1, 1, 1, 1)


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    """Resample x through the affine map theta [n, 2, 3] (bilinear, zero padding), as the official code."""
    theta = to_device(theta, x.device).to(x.dtype).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _shift(x: Tensor, tx: Tensor, ty: Tensor) -> Tensor:
    """out[..., i, j] = x[..., i + tx, j + ty], zero where that falls outside (integer shifts).

    As the official `rand_crop`, which pads one zero pixel around x and clamps the source index into the padded
    image so that every outside position reads the zero border. One shift for the batch: pad and slice;
    per-sample shifts: the official clamped gathers. Both are differentiable w.r.t. x.
    """
    n, c, h, w = x.shape
    if tx.numel() == 1:
        dx, dy = int(tx), int(ty)
        p = max(abs(dx), abs(dy))
        padded = F.pad(x, (p, p, p, p))
        return padded[:, :, p + dx:p + dx + h, p + dy:p + dy + w]
    txd = to_device(tx, x.device).view(n, 1)
    tyd = to_device(ty, x.device).view(n, 1)
    rows = (torch.arange(h, device=x.device).view(1, h) + txd + 1).clamp(0, h + 1)  # [n, h] into padded rows
    cols = (torch.arange(w, device=x.device).view(1, w) + tyd + 1).clamp(0, w + 1)  # [n, w]
    padded = F.pad(x, (1, 1, 1, 1))
    out = padded.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, w + 2))
    return out.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))


def _cutout_mask(x: Tensor, cx: Tensor, cy: Tensor, params: DSAParams) -> Tensor:
    """[n, 1, H, W] mask, 0 inside each sample's square (clipped at the border), 1 elsewhere."""
    h, w = x.shape[-2:]
    kh, kw = _cutout_side(h, params), _cutout_side(w, params)
    if cx.numel() == 1:
        top, left = int(cx) - kh // 2, int(cy) - kw // 2
        mask = torch.ones(1, 1, h, w, dtype=x.dtype, device=x.device)
        mask[:, :, max(0, top):max(0, top + kh), max(0, left):max(0, left + kw)] = 0
        return mask
    top = (to_device(cx, x.device) - kh // 2).view(-1, 1)
    left = (to_device(cy, x.device) - kw // 2).view(-1, 1)
    r = torch.arange(h, device=x.device).view(1, h)
    c = torch.arange(w, device=x.device).view(1, w)
    in_rows = (r >= top) & (r < top + kh)  # [n, h]
    in_cols = (c >= left) & (c < left + kw)  # [n, w]
    inside = in_rows.unsqueeze(2) & in_cols.unsqueeze(1)  # [n, h, w]
    return (~inside).to(x.dtype).unsqueeze(1)


def apply(x: Tensor, d: DSADraw | None, params: DSAParams = DEFAULT_PARAMS) -> Tensor:
    """Apply a draw to images x [N, C, H, W] (normalized); differentiable w.r.t. x. `d.n` must be 1 or N.

    A draw shared by the batch (n = 1, the Siamese case) enters as Python numbers, so nothing is copied to the
    device; per-sample parameters are copied without a host sync (`to_device`).
    """
    if d is None:
        return x
    if x.dim() != 4:
        raise ValueError(f"DSA expects images [N, C, H, W], got shape {tuple(x.shape)}")
    if d.n not in (1, x.shape[0]):
        raise ValueError(f"a DSA draw for {d.n} samples cannot be applied to a batch of {x.shape[0]}")
    v = d.values
    if d.group == "color":
        x = x + (_per_sample(v["brightness"], x) - 0.5) * params.brightness
        grey = x.mean(dim=1, keepdim=True)
        x = (x - grey) * (_per_sample(v["saturation"], x) * params.saturation) + grey
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - m) * (_per_sample(v["contrast"], x) + params.contrast) + m
    elif d.group == "crop":
        x = _shift(x, v["tx"], v["ty"])
    elif d.group == "cutout":
        x = x * _cutout_mask(x, v["cx"], v["cy"], params)
    elif d.group == "flip":
        u = _per_sample(v["u"], x)
        if isinstance(u, float):
            x = x.flip(3) if u < params.flip_p else x
        else:
            x = torch.where(u < params.flip_p, x.flip(3), x)
    elif d.group == "scale":
        zero = torch.zeros(d.n)
        theta = torch.stack([torch.stack([v["sx"], zero, zero], 1), torch.stack([zero, v["sy"], zero], 1)], 1)
        x = _affine(x, theta)
    elif d.group == "rotate":
        a, zero = v["angle"], torch.zeros(d.n)
        theta = torch.stack([torch.stack([a.cos(), -a.sin(), zero], 1), torch.stack([a.sin(), a.cos(), zero], 1)], 1)
        x = _affine(x, theta)
    else:
        raise ValueError(f"unknown DSA group {d.group!r}")
    return x.contiguous()


def augment(x: Tensor, gen: torch.Generator, strategy: str = STRATEGY, params: DSAParams = DEFAULT_PARAMS,
            per_sample: bool = False) -> Tensor:
    """One DSA call: a draw (shared by the batch, or per sample) applied to x."""
    d = draw(gen, strategy, x.shape[-2], x.shape[-1], n=x.shape[0] if per_sample else 1, params=params)
    return apply(x, d, params)


def siamese(real: Tensor, syn: Tensor, gen: torch.Generator, strategy: str = STRATEGY,
            params: DSAParams = DEFAULT_PARAMS) -> tuple[Tensor, Tensor]:
    """The Siamese pair: one draw applied to both the real and the synthetic batch of a class."""
    if real.shape[-2:] != syn.shape[-2:]:
        raise ValueError(f"Siamese batches need the same image size, got {tuple(real.shape)} and {tuple(syn.shape)}")
    d = draw(gen, strategy, real.shape[-2], real.shape[-1], n=1, params=params)
    return apply(real, d, params), apply(syn, d, params)
