"""The synthetic set written by recover: its shard index and its images in memory."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from pipeline.data.shards import IndexedImages, read_index

SYNTHETIC_DIR = "synthetic"


def synthetic_index(run_dir: Path, recover_records: list) -> pa.Table:
    """Rows of every synthetic image in a fixed order (recover units sorted by key): row = image id.

    Built from the recover records' outputs, never by globbing, so files left by an
    older configuration are never picked up.
    """
    paths = []
    for rec in sorted(recover_records, key=lambda r: r.unit):
        paths.extend(Path(run_dir) / o.uri for o in rec.outputs if o.uri.endswith(".parquet"))
    return read_index(paths)


def decode_rgb(data: bytes, resolution: int | None = None) -> np.ndarray:
    """Bytes -> uint8 HWC RGB, optionally resized (bilinear) to resolution x resolution."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    if resolution is not None and img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def load_images(folder: Path, index: pa.Table, resolution: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of an index as uint8 [N, 3, H, W] and their labels [N]."""
    src = IndexedImages(folder, index)
    if len(src) == 0:
        raise ValueError(f"no images in the index of {folder}")
    arrays = [decode_rgb(src.raw(i), resolution) for i in range(len(src))]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(src.cls, dtype=torch.long)
