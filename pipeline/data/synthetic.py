"""The synthetic set written by recover: its shard index and its images in memory."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from manifests.schema import Record
from pipeline.data.images import decode_rgb  # also re-exported: stages, methods and tests import it from here
from pipeline.data.shards import IndexedImages, read_index

SYNTHETIC_DIR = "synthetic"


def synthetic_index_paths(run_dir: str | Path, recover_records: Iterable[Record]) -> list[Path]:
    """The parquet indexes of the synthetic shards, recover units sorted by key: the image-id order.

    Taken from the recover records' outputs, never by globbing, so files left by an older
    configuration are never picked up. Pass the unit records (`ManifestStore.records("recover")`).
    """
    return [Path(run_dir) / o.uri for rec in sorted(recover_records, key=lambda r: r.unit)
            for o in rec.outputs if o.uri.endswith(".parquet")]


def synthetic_index(run_dir: str | Path, recover_records: Iterable[Record]) -> pa.Table:
    """Rows of every synthetic image in a fixed order (`synthetic_index_paths`): row = image id."""
    return read_index(synthetic_index_paths(run_dir, recover_records))


def load_images(folder: Path, index: pa.Table, resolution: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of an index as uint8 [N, 3, H, W] and their labels [N]."""
    src = IndexedImages(folder, index)
    if len(src) == 0:
        raise ValueError(f"no images in the index of {folder}")
    arrays = [decode_rgb(src.raw(i), resolution) for i in range(len(src))]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(src.cls, dtype=torch.long)
