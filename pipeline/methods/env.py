"""What the recover stage hands a method worker: device, teacher, the real images of the train split, seeds.

Built once per worker (a Ray actor or the driver) by the recover stage; methods read from it and never touch
files. Every random choice here is keyed by (run seed, "recover", purpose, ...) so that any split of the work
into units, and any worker, picks the same images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.seeding import generator


@dataclass
class RecoverEnv:
    """device, teacher (None unless the method needs one), real pool (None unless it needs real images)."""

    seed: int
    device: torch.device
    resolution: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    init: str = "noise"  # initial images: noise | real (`recover.init`, auto resolved by the method)
    amp: torch.dtype | None = None  # autocast dtype on GPU, None = fp32
    channels_last: bool = False
    teacher: torch.nn.Module | None = None
    real: RealPool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def require_real(self) -> RealPool:
        if self.real is None:
            raise RuntimeError("this method declared no need for real images, but asked for them")
        return self.real

    def real_init(self, classes: range, j: int) -> torch.Tensor:
        """Normalized real images, one of each class, for IPC index j: the j-th of each class's seeded order.

        The order is keyed by (run seed, "real-pick", class), so random-real and real-initialized methods pick
        the same images for (class, j) whatever the unit split.
        """
        pool = self.require_real()
        rows = []
        for c in classes:
            order = pool.class_rows(c, "real-pick")
            rows.append(order[j % len(order)])
        return pool.batch(rows)


class RealPool:
    """The real training images of the ingest shards, read by offset through the parquet index."""

    def __init__(self, real_dir: Path, index_paths: list[Path], seed: int, resolution: int,
                 mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> None:
        from pipeline.data.shards import IndexedImages, read_index

        self.images = IndexedImages(real_dir, read_index(index_paths))
        self.by_class = self.images.rows_of_class()
        self.seed, self.resolution, self.mean, self.std, self.device = seed, resolution, mean, std, device

    def label(self, row: int) -> int:
        return int(self.images.cls[row])

    def rows(self, cls: int) -> list[int]:
        rows = self.by_class.get(cls, [])
        if not rows:
            raise ValueError(f"class {cls} has no real training images in the ingest index")
        return rows

    def class_rows(self, cls: int, purpose: str) -> list[int]:
        """This class's rows in a seeded order keyed by (run seed, purpose, class): any unit split agrees."""
        rows = self.rows(cls)
        g = generator(self.seed, "recover", purpose, cls)
        return [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]

    def batch(self, rows: list[int]) -> torch.Tensor:
        """Normalized real images [len(rows), 3, R, R] on the device (shorter side resized, center crop)."""
        from pipeline.data.synthetic import decode_rgb
        from pipeline.synthesis import normalize

        arrays = [center_crop(decode_rgb(self.images.raw(i)), self.resolution) for i in rows]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
        return normalize(x, self.mean, self.std).to(self.device)


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
