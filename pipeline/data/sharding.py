"""Shard bookkeeping of the loaders: which shards a split has, their sample keys, and each rank's share.

Training yields `train_batches` full batches per rank and epoch. Evaluation reads each sample
exactly once over all ranks: rank `r` of `W` takes the samples `rank_range(N, r, W)` of the shards
read in the given order (the split DALI's reader uses), padded to `eval_batches` batches.
"""

from __future__ import annotations

import math
import tarfile
from pathlib import Path

from pipeline.data.classmap import class_map_path, read_class_map


def shard_paths(real_dir: str | Path, split: str) -> list[Path]:
    """The tar paths of `split` ("train" or "val") listed in `real_dir`/classes.json, in its order.

    The list comes from the class map written by ingest (not from a glob), so a half-written
    or stale shard in the folder is never read.
    """
    shards = read_class_map(real_dir).get("shards", {})
    if split not in shards:
        raise ValueError(f"{class_map_path(real_dir)} lists no '{split}' shards (it has: {sorted(shards)})")
    return [Path(real_dir) / f"{name}.tar" for name in shards[split]]


def shard_keys(shard: str | Path) -> list[str]:
    """Sample keys of one shard in stored order: from its parquet index, else its `.idx`, else the tar."""
    shard = Path(shard)
    parquet, idx = shard.with_suffix(".parquet"), shard.with_suffix(".idx")
    if parquet.is_file():
        import pyarrow.parquet as pq

        return [str(k) for k in pq.read_table(parquet, columns=["key"]).column("key").to_pylist()]
    if idx.is_file():
        lines = idx.read_text().splitlines()[1:]
        # v1.2 lines: `ext offset size name` per member; the first member's name gives the key.
        return [line.split()[3].split(".", 1)[0] for line in lines if line.strip()]
    keys: list[str] = []
    with tarfile.open(shard, mode="r:") as tar:
        for member in tar:
            if member.isfile() and not member.name.startswith("."):
                key = member.name.rsplit("/", 1)[-1].split(".", 1)[0]
                if not keys or keys[-1] != key:
                    keys.append(key)
    return keys


def rank_range(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """Half-open range of the global sample positions that `rank` evaluates (DALI's split)."""
    return num_samples * rank // world_size, num_samples * (rank + 1) // world_size


def train_batches(num_samples: int, batch_size: int, world_size: int) -> int:
    """Batches per rank and training epoch: `num_samples // (batch_size * world_size)`."""
    return num_samples // (batch_size * world_size)


def eval_batches(num_samples: int, batch_size: int, world_size: int) -> int:
    """Batches per rank for evaluation: enough for the largest rank share, padded."""
    return math.ceil(math.ceil(num_samples / world_size) / batch_size)
