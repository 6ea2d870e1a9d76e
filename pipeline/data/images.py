"""Image decoding and the loaders' per-image transforms (the PIL path; the DALI path mirrors them).

Transforms (R = resolution):

=========  ======================================================  ==================================
           R > 64                                                  R <= 64
=========  ======================================================  ==================================
train      RandomResizedCrop(R, scale 0.08-1, ratio 3/4-4/3), flip   resize to R x R, pad 4, random crop R, flip
eval       resize shorter side to int(R * 256 / 224), center crop R  resize to R x R
=========  ======================================================  ==================================
"""

from __future__ import annotations

import io
import logging
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.augment.crops import RandomDraws, random_resized_crop

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png")
"""Extensions a shard sample's image member may have (ingest writes jpg or png; both loaders accept these)."""
SOURCE_IMAGE_SUFFIXES = frozenset({f".{e}" for e in IMAGE_EXTS} | {".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif"})
"""File suffixes ingest reads from a data folder (lower case); it stores other formats as PNG members."""

SMALL_RESOLUTION = 64
"""At or below this side, the CIFAR-style transforms apply (pad-and-crop, plain resize)."""
SMALL_PAD = 4
"""Padding (pixels, each side) of the CIFAR-style training crop."""


WIDE_INT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
"""PIL modes of 16-bit (and 32-bit integer) images: 16-bit grey PNG, TIFF and PGM files open in these."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB, the way ingest stores and the loaders read every image.

    - 16-bit grey (I;16*, and I, which 16-bit PGM / 32-bit TIFF files open as): the top 8 bits
      (value >> 8, after clipping I to 0..65535). PIL's own `convert` clips these to 0..255 instead, which
      turns nearly every pixel of a 16-bit image white;
    - every other mode as PIL (and so torchvision's `ImageFolder` loader) converts it: 1 -> 0/255, L and LA
      replicated (alpha dropped), P and PA through the palette, RGBA / RGBX / RGBa without alpha, CMYK,
      YCbCr, LAB and HSV by PIL's colour conversions, F (32-bit float) taken on the 0..255 scale, clipped
      and truncated. 16-bit RGB(A) and grey+alpha PNGs open as RGB(A) / LA with their top 8 bits already.
    """
    if img.mode == "RGB":
        return img
    from PIL import Image

    if img.mode in WIDE_INT_MODES:
        wide = np.asarray(img).astype(np.int64)
        grey = (np.clip(wide, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return img.convert("RGB")


def check_name(folder: str | Path, name: str) -> None:
    """A ConfigError naming the entry when its file name is not valid UTF-8 (Linux hands such names to Python with
    surrogate escapes; they cannot be written to the shards' JSON, the parquet index or a log line)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        from pipeline.core.errors import ConfigError

        raise ConfigError(f"{folder}: the name {os.fsencode(name)!r} is not valid UTF-8; rename it (for example "
                          "`convmv -f latin1 -t utf8 --notest`) or move it out of the data folder") from None


def class_folders(split_dir: str | Path) -> list[str]:
    """The class folders of one split, sorted: torchvision's `find_classes` rule (every sub-folder, names
    starting with a dot included; class index = position). Dot-named folders (.ipynb_checkpoints, .git...)
    are usually not classes, so they are named in a warning (once per folder); dropping them instead would
    shift every class index against torchvision's on the same folder ('.' sorts first)."""
    split_dir = Path(split_dir)
    names = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    for name in names:
        check_name(split_dir, name)
    hidden = [n for n in names if n.startswith(".")]
    if hidden and str(split_dir) not in _WARNED_HIDDEN:
        _WARNED_HIDDEN.add(str(split_dir))
        log.warning("%s: folders whose names start with a dot count as classes, as in torchvision's ImageFolder: "
                    "%s; remove them if they are not classes", split_dir, ", ".join(hidden))
    return names


_WARNED_HIDDEN: set[str] = set()


def decode_rgb_image(data: bytes) -> Image.Image:
    """Encoded bytes -> PIL image in 8-bit RGB (`to_rgb`: grey, palette, CMYK, alpha and 16-bit converted)."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return to_rgb(img)


def decode_rgb(data: bytes, resolution: int | None = None) -> np.ndarray:
    """Encoded bytes -> uint8 HWC RGB array, optionally resized (bilinear) to resolution x resolution."""
    from PIL import Image

    img = decode_rgb_image(data)
    if resolution is not None and img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def train_crop_window(rng: random.Random, width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, w, h) of the training RandomResizedCrop window, in PIL's box order.

    The shared sampler with Python's draws; the offsets are drawn left first, as this loader always did.
    """
    top, left, h, w = random_resized_crop(RandomDraws(rng), height, width, left_first=True)
    return int(left), int(top), int(w), int(h)


def pil_transform(img: Image.Image, resolution: int, train: bool, rng: random.Random | None = None) -> torch.Tensor:
    """The transform of the table above on one RGB PIL image -> uint8 tensor [3, R, R] (not normalized).

    Training draws from `rng`, in this order: the crop window (R > 64) or the pad-crop offsets
    (top, then left), then the flip.
    """
    from PIL import Image

    r = resolution
    bilinear = Image.Resampling.BILINEAR
    if train:
        if rng is None:
            raise ValueError("training transforms need an rng")
        if r > SMALL_RESOLUTION:
            left, top, w, h = train_crop_window(rng, img.width, img.height)
            arr = np.asarray(img.resize((r, r), bilinear, box=(left, top, left + w, top + h)))
        else:
            small = np.asarray(img.resize((r, r), bilinear))
            pad = SMALL_PAD
            padded = np.zeros((r + 2 * pad, r + 2 * pad, 3), dtype=np.uint8)
            padded[pad:pad + r, pad:pad + r] = small
            top, left = rng.randint(0, 2 * pad), rng.randint(0, 2 * pad)
            arr = padded[top:top + r, left:left + r]
        if rng.random() < 0.5:
            arr = arr[:, ::-1]
    elif r > SMALL_RESOLUTION:
        short = int(r * 256 / 224)
        w, h = img.size
        size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        resized = img.resize(size, bilinear)
        top, left = int(round((size[1] - r) / 2.0)), int(round((size[0] - r) / 2.0))
        arr = np.asarray(resized)[top:top + r, left:left + r]
    else:
        arr = np.asarray(img.resize((r, r), bilinear))
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
