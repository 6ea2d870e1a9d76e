"""Parquet shards in the Hugging Face datasets layout (`data/train-*.parquet`, `data/validation-*.parquet`): a
column `image` = {bytes, path} (or plain bytes) and an integer `label`. Files named `*train*` are the train split,
`*val*` / `*validation*` the val split (a `test` split, unlabelled in ImageNet's, is left out).

Listing reads only the label column. Ingest streams the images a row group at a time (pyarrow), never a whole file:
a unit takes whole row groups, drawn in a seeded order until it holds `data.shard_size` rows, and writes them
shuffled into one shard, so each row group is read once. Row access inside a row group is not cheap (its image
column is read whole), which is why these shards mix row groups rather than single rows drawn from the whole
split as the file sources do: a split stored sorted by class gets shards of a few classes each unless
`data.shard_size` spans many row groups (the stage warns).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import ConfigError
from pipeline.data.sources.base import SPLITS, Item, Listing, ShardFilesSource

IMAGE_COLUMNS = ("image", "img", "jpg")
LABEL_COLUMNS = ("label", "labels", "cls")


def _column(names: Sequence[str], wanted: Sequence[str], path: Path, what: str) -> str:
    for w in wanted:
        if w in names:
            return w
    raise ConfigError(f"{path}: no {what} column ({' / '.join(wanted)}); its columns are {list(names)}")


def hf_label_names(schema: Any) -> list[str] | None:
    """The ClassLabel names the `datasets` library stores in a parquet file's schema metadata, if any."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    try:
        features = json.loads(meta)["info"]["features"]
    except (ValueError, KeyError, TypeError):
        return None
    for name in LABEL_COLUMNS:
        feat = features.get(name) if isinstance(features, dict) else None
        if isinstance(feat, dict) and isinstance(feat.get("names"), list):
            return [str(n) for n in feat["names"]]
    return None


class ParquetSource(ShardFilesSource):
    format = "parquet"
    suffix = ".parquet"
    what = "the parquet files"
    missing = ("files: data.format=parquet reads *.parquet files whose names contain 'train' and 'validation' (or "
               "'val'), as data/train-*.parquet")

    def scan(self) -> Listing:
        import pyarrow.parquet as pq

        files = self.files()
        raw: dict[str, list[tuple[list[Any], Any]]] = {s: [] for s in SPLITS}
        names = None
        for split in SPLITS:
            for path in files[split]:
                pf = pq.ParquetFile(path)
                schema = pf.schema_arrow
                _column(schema.names, IMAGE_COLUMNS, path, "image")
                label_col = _column(schema.names, LABEL_COLUMNS, path, "label")
                names = names or hf_label_names(schema)
                labels = pf.read(columns=[label_col]).column(0).to_pylist()
                row = 0
                for rg in range(pf.metadata.num_row_groups):
                    n = pf.metadata.row_group(rg).num_rows
                    raw[split] += [([str(path), rg, r], labels[row + r]) for r in range(n)]
                    row += n
        return self.labelled(files, raw, names, [])

    def plan(self, items: Sequence[Item], shard_size: int, seed: int) -> list[list[int]]:
        """Whole row groups per shard: the row groups in a seeded order, taken until a shard holds `shard_size`
        rows, its rows shuffled."""
        blocks: dict[tuple[str, int], list[int]] = {}
        for i, (ref, _) in enumerate(items):
            blocks.setdefault((ref[0], int(ref[1])), []).append(i)
        rng = np.random.default_rng(seed)
        keys = list(blocks)
        units, current = [], []
        for b in rng.permutation(len(keys)).tolist():
            current += blocks[keys[b]]
            if len(current) >= shard_size:
                units.append(current)
                current = []
        if current:
            units.append(current)
        return [[unit[j] for j in rng.permutation(len(unit)).tolist()] for unit in units]

    def reader(self) -> Callable[[Any], bytes]:
        """A unit's reader: each row group's image column is read once and kept until the unit ends."""
        import pyarrow.parquet as pq

        groups: dict[tuple[str, int], list[Any]] = {}

        def read(ref: Any) -> bytes:
            path, rg, row = ref[0], int(ref[1]), int(ref[2])
            if (path, rg) not in groups:
                pf = pq.ParquetFile(path)
                col = _column(pf.schema_arrow.names, IMAGE_COLUMNS, Path(path), "image")
                groups[(path, rg)] = pf.read_row_group(rg, columns=[col]).column(0).to_pylist()
            value = groups[(path, rg)][row]
            data = value.get("bytes") if isinstance(value, dict) else value
            if not data:
                where = f" (only a path: {value.get('path')!r})" if isinstance(value, dict) and value.get("path") else ""
                raise OSError(f"{self.describe(ref)}: no image bytes{where}")
            return bytes(data)

        return read

    def describe(self, ref: Any) -> str:
        return f"{ref[0]}#row-group-{ref[1]}/row-{ref[2]}"
