"""The holdout slice: a seeded share of each class of the real *train* split, kept out of every student's data.

No number this pipeline reports is chosen on val. Anything that needs a choice during training (the epoch whose
weights to keep, with `eval.select=best-holdout`) looks at this slice instead, and the slice never reaches a
distilled set (the recover stage's real pool leaves it out, so selection methods, real inits and matching
batches never see it) nor the full-real baseline's training data. The teacher is trained on the whole train
split: the slice measures students, not the teacher.

The slice depends only on the ingest index and (`data.shuffle_seed`, `eval.holdout_fraction`), never on the run
seed, so every run on the same data holds out the same images, and so do the baselines they share.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.core.seeding import generator


def holdout_count(n: int, fraction: float) -> int:
    """How many of a class's n training images are held out: round(fraction * n), at least one when the fraction
    is positive and the class has two or more images, and never the class's last image."""
    if fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, math.floor(fraction * n + 0.5)))


def holdout_rows(by_class: Mapping[int, Sequence[int]], fraction: float, seed: int) -> list[int]:
    """The held-out rows (sorted) of an index whose rows of class c are `by_class[c]`: per class, the first
    `holdout_count` rows of a permutation seeded by (seed, "holdout", c), so a class's slice does not depend on
    the other classes."""
    out: list[int] = []
    for cls in sorted(by_class):
        rows = sorted(by_class[cls])
        k = holdout_count(len(rows), fraction)
        if k:
            perm = torch.randperm(len(rows), generator=generator(seed, "holdout", cls)).tolist()
            out.extend(rows[i] for i in perm[:k])
    return sorted(out)


@dataclass(frozen=True)
class HoldoutSpec:
    """Where the slice's images are: the ingest train shards (`real_dir`, their parquet `index_paths` in shard
    order) and the fraction and seed that pick the rows."""

    real_dir: str
    index_paths: tuple[str, ...]
    fraction: float
    seed: int

    def images(self) -> object:
        from pipeline.data.shards import IndexedImages, read_index

        return IndexedImages(Path(self.real_dir), read_index([Path(p) for p in self.index_paths]))

    def rows(self) -> list[int]:
        return holdout_rows(self.images().rows_of_class(), self.fraction, self.seed)


def holdout_batches(spec: HoldoutSpec, resolution: int, mean: Sequence[float], std: Sequence[float],
                    batch_size: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The slice as normalized (images, labels) batches: shorter side resized to `resolution`, center crop (the
    real pool's and the val loader's geometry)."""
    import numpy as np

    from pipeline.core.imageops import center_crop, normalize
    from pipeline.data.synthetic import decode_rgb

    images = spec.images()
    by_class = images.rows_of_class()
    rows = holdout_rows(by_class, spec.fraction, spec.seed)
    for i in range(0, len(rows), batch_size):
        part = rows[i:i + batch_size]
        arrays = [center_crop(decode_rgb(images.raw(r)), resolution) for r in part]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
        yield normalize(x, tuple(mean), tuple(std)), torch.tensor([int(images.cls[r]) for r in part])


@torch.no_grad()
def holdout_top1(model: torch.nn.Module, spec: HoldoutSpec, resolution: int, mean: Sequence[float],
                 std: Sequence[float], device: torch.device) -> float | None:
    """Top-1 (percent) of `model` on the slice; None when the slice is empty."""
    was_training = model.training
    model.eval()
    right = total = 0
    for x, y in holdout_batches(spec, resolution, mean, std):
        pred = model(x.to(device)).argmax(1).cpu()
        right += int((pred == y).sum())
        total += len(y)
    model.train(was_training)
    return 100.0 * right / total if total else None
