"""The real training images a method may read: the ingest shards through their parquet index, less the holdout
slice, in seeded per-class orders, decoded to normalized tensors on the worker's device."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.core.imageops import center_crop, normalize
from pipeline.core.seeding import generator


class RealPool:
    """The real training images of the ingest shards, read by offset through the parquet index (less the
    holdout slice: `holdout` = (eval.holdout_fraction, data.shuffle_seed))."""

    def __init__(self, real_dir: Path, index_paths: list[Path], seed: int, resolution: int,
                 mean: tuple[float, ...], std: tuple[float, ...], device: torch.device,
                 holdout: tuple[float, int] = (0.0, 0)) -> None:
        from pipeline.data.holdout import holdout_rows
        from pipeline.data.shards import IndexedImages, read_index

        self.images = IndexedImages(real_dir, read_index(index_paths))
        by_class = self.images.rows_of_class()
        # the holdout slice (fraction, seed) is never offered to a method (see pipeline.data.holdout)
        held = set(holdout_rows(by_class, *holdout)) if holdout[0] > 0 else set()
        self.by_class = {c: [r for r in rows if r not in held] for c, rows in by_class.items()}
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

    def decoded(self, rows: list[int]) -> list[np.ndarray]:
        """The real images as stored, uncropped: uint8 [H, W, 3] arrays at their own sizes (for methods that crop
        patches themselves)."""
        from pipeline.data.synthetic import decode_rgb

        return [decode_rgb(self.images.raw(i)) for i in rows]

    def batch(self, rows: list[int]) -> torch.Tensor:
        """Normalized real images [len(rows), 3, R, R] on the device (shorter side resized, center crop)."""
        arrays = [center_crop(arr, self.resolution) for arr in self.decoded(rows)]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
        return normalize(x, self.mean, self.std).to(self.device)

