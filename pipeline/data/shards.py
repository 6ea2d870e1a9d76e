"""WebDataset shards: writing (tar + DALI .idx + per-shard parquet index) and random access.

A shard `{prefix}-{NNNNNN}.tar` is a USTAR tar whose members are `<key>.<ext>`; keys hold no
dots. Beside it: `.idx` in the format of DALI's `wds2idx` (v1.2: one line per sample with
`ext data_offset size name` per member) and a parquet index with one row per sample
(key, cls, shard, offset, size, ext) so a worker can read the real images of given classes
without scanning the tar.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.store import atomic_path, atomic_write_text

INDEX_SCHEMA = pa.schema([
    ("key", pa.string()), ("cls", pa.int32()), ("shard", pa.string()), ("offset", pa.int64()),
    ("size", pa.int64()), ("ext", pa.string()),
])


@dataclass(frozen=True)
class Sample:
    """One sample: key (no dots), class index, image bytes and extension, extra JSON metadata."""

    key: str
    cls: int
    image: bytes
    ext: str
    meta: dict


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}"


def write_shard(folder: Path, name: str, samples: Iterable[Sample]) -> list[Path]:
    """Write `name`.tar, `name`.idx and `name`.parquet into `folder`, each through `atomic_path`.

    Returns the three paths. The tar is written first, its index files after, so a
    reader that finds the parquet index also finds the complete tar.
    """
    folder = Path(folder)
    tar_path, idx_path, pq_path = (folder / f"{name}{ext}" for ext in (".tar", ".idx", ".parquet"))
    rows: list[dict] = []
    idx_lines: list[str] = []
    with atomic_path(tar_path) as tmp:
        with open(tmp, "wb") as fh, tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for s in samples:
                if "." in s.key or "/" in s.key:
                    raise ValueError(f"sample key '{s.key}' must not contain '.' or '/'")
                members = [
                    (s.ext, s.image),
                    ("cls", str(int(s.cls)).encode()),
                    ("json", json.dumps(s.meta, sort_keys=True).encode()),
                ]
                parts = []
                for ext, data in members:
                    info = tarfile.TarInfo(f"{s.key}.{ext}")
                    info.size = len(data)
                    info.mode = 0o644
                    info.mtime = 0  # reproducible bytes
                    info.uname = info.gname = ""
                    offset = fh.tell() + 512  # data follows the 512-byte USTAR header
                    tar.addfile(info, io.BytesIO(data))
                    parts.append(f"{ext} {offset} {len(data)} {info.name}")
                    if ext == s.ext:
                        rows.append({"key": s.key, "cls": int(s.cls), "shard": f"{name}.tar", "offset": offset,
                                     "size": len(data), "ext": ext})
                idx_lines.append(" ".join(parts))
        if not rows:
            raise ValueError(f"shard {name} would be empty")
    atomic_write_text(idx_path, f"v1.2 {len(idx_lines)}\n" + "\n".join(idx_lines) + "\n")
    with atomic_path(pq_path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA), tmp)
    return [tar_path, idx_path, pq_path]


def read_index(paths: Sequence[Path]) -> pa.Table:
    """Concatenate per-shard parquet indexes (in the given order)."""
    tables = [pq.read_table(p) for p in paths]
    if not tables:
        return INDEX_SCHEMA.empty_table()
    return pa.concat_tables(tables)


def read_member(folder: Path, shard: str, offset: int, size: int) -> bytes:
    """Bytes of one member, by the offset recorded in the index."""
    with open(Path(folder) / shard, "rb") as fh:
        fh.seek(offset)
        data = fh.read(size)
    if len(data) != size:
        raise OSError(f"{Path(folder) / shard}: truncated at offset {offset} (wanted {size} bytes)")
    return data


class IndexedImages:
    """Random access to images by row of a shard index (used for DWA subsets, real init, synthetic sets)."""

    def __init__(self, folder: Path, index: pa.Table) -> None:
        self.folder = Path(folder)
        self.keys = index.column("key").to_pylist()
        self.cls = index.column("cls").to_pylist()
        self.shard = index.column("shard").to_pylist()
        self.offset = index.column("offset").to_pylist()
        self.size = index.column("size").to_pylist()

    def __len__(self) -> int:
        return len(self.keys)

    def raw(self, i: int) -> bytes:
        return read_member(self.folder, self.shard[i], self.offset[i], self.size[i])

    def rows_of_class(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for i, c in enumerate(self.cls):
            out.setdefault(c, []).append(i)
        return out
