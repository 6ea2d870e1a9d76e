"""The synthetic set written by recover: its shard index and its images in memory."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from manifests.schema import Record
from pipeline.data.images import decode_rgb  # also re-exported: stages, methods and tests import it from here
from pipeline.data.shards import IndexedImages, read_index

SYNTHETIC_DIR = "synthetic"


LABELS_SUFFIX = ".labels.npy"  # a unit's label vectors (float32 [n, C], in its shard's order), if its method made any


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


def write_set_labels(folder: Path, unit: str, labels: Sequence[Any]) -> Path:
    """A unit's label vectors (one per image, in its shard's order) as `<unit>.labels.npy` (float32 [n, C]), written
    through a temporary file; returns its path."""
    from manifests.store import atomic_path

    rows = [torch.as_tensor(v, dtype=torch.float32).detach().cpu().reshape(-1) for v in labels]
    if not rows or len({len(r) for r in rows}) != 1:
        raise ValueError(f"unit {unit}: label vectors must be non-empty and of one length, got "
                         f"{sorted({len(r) for r in rows})}")
    path = Path(folder) / f"{unit}{LABELS_SUFFIX}"
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, torch.stack(rows).numpy(), allow_pickle=False)
    return path


def set_label_paths(run_dir: str | Path, recover_records: Iterable[Record]) -> list[Path]:
    """The label-vector files of the synthetic set in image-id order (`synthetic_index`), [] when its method stored
    none. A set where only some units have them is an error naming the units."""
    records = sorted(recover_records, key=lambda r: r.unit)
    paths = {rec.unit: [Path(run_dir) / o.uri for o in rec.outputs if o.uri.endswith(LABELS_SUFFIX)]
             for rec in records}
    with_labels = [u for u, ps in paths.items() if ps]
    if not with_labels:
        return []
    if len(with_labels) != len(records):
        missing = [u for u, ps in paths.items() if not ps]
        raise ValueError(f"recover units {', '.join(missing[:5])} have no label vectors while others do: rerun "
                         "the recover stage (distill run --fresh --stages recover)")
    return [p for u in with_labels for p in paths[u]]


def load_set_labels(paths: Sequence[str | Path]) -> torch.Tensor:
    """The label vectors of `set_label_paths`, float32 [N, C]."""
    return torch.cat([torch.from_numpy(np.load(p, allow_pickle=False)) for p in paths])


def read_set_labels(run_dir: str | Path, recover_records: Iterable[Record]) -> torch.Tensor | None:
    """The label vectors of the whole synthetic set, float32 [N, C] in image-id order (`synthetic_index`), or None
    when its method stored none."""
    paths = set_label_paths(run_dir, recover_records)
    return load_set_labels(paths) if paths else None


def set_values(recover_records: Iterable[Record]) -> dict[str, Any]:
    """The values a method learned for the whole set (`MethodOutput.values`, each unit record's `set_values`), merged
    over units in key order (a method with one unit, as trajectory matching, has one dict)."""
    out: dict[str, Any] = {}
    for rec in sorted(recover_records, key=lambda r: r.unit):
        out.update(rec.metrics.get("set_values") or {})
    return out
