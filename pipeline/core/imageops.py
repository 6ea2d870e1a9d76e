"""Image tensors and arrays: per-channel normalization (and its inverse) and the resize + center crop that every
real image goes through before a model sees it (recover's real pool, the holdout slice, imported sets, the
full-real reference)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

# torchvision's ImageNet statistics: what torchvision's and SRe2L's ImageNet teachers expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def center_crop(arr: np.ndarray, res: int) -> np.ndarray:
    """Resize the shorter side to `res` (bilinear) and center-crop res x res."""
    from PIL import Image

    h, w = arr.shape[:2]
    if (h, w) == (res, res):
        return arr
    scale = res / min(h, w)
    nh, nw = max(res, round(h * scale)), max(res, round(w * scale))
    img = Image.fromarray(arr).resize((nw, nh), Image.BILINEAR)
    top, left = (nh - res) // 2, (nw - res) // 2
    return np.asarray(img.crop((left, top, left + res, top + res)), dtype=np.uint8)
