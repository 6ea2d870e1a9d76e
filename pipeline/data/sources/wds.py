"""WebDataset tar shards made for training (timm's `imagenet1k-train-{0000..1023}.tar`, a cluster's own): one sample
per key, an image member (`.jpg`, `.jpeg`, `.png`, `.webp`) and its integer class in `.cls` (or a `label` in
`.json`). Shards named `*train*` are the train split, `*val*` / `*validation*` the val split.

Ingest re-packs them: it reads each image's bytes at its offset in the user's tar (one seek, no decode beyond the
check every source gets, no re-encode of RGB / grey JPEGs) into the project's own shards, in the same seeded order
as every other source, with its own keys, `.cls`, `.json` (the source shard and key) and indexes. Indexing the
user's shards in place would tie every later stage to files the project does not own (they may be rewritten,
lack `.cls`, use dotted keys the loaders split wrongly, or sit on read-only storage) and to their order (often
by class); a copy costs the bytes once, as ingest of every other source does.
"""

from __future__ import annotations

import json
import tarfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.core.errors import ConfigError
from pipeline.data.images import IMAGE_EXTS
from pipeline.data.sources.base import SPLITS, Listing, ShardFilesSource

WDS_IMAGE_EXTS = (*IMAGE_EXTS, "webp")
OPEN_FILES = 32
"""Source shards a worker keeps open while it gathers a shard's samples from them."""


def _label(cls_bytes: bytes | None, json_bytes: bytes | None) -> int | None:
    """A sample's class: its `.cls` integer, else the `label` (or `cls`) field of its `.json`; None without either."""
    if cls_bytes is not None:
        return int(cls_bytes.decode().strip())
    if json_bytes is not None:
        meta = json.loads(json_bytes)
        for key in ("label", "cls", "class"):
            if isinstance(meta, dict) and isinstance(meta.get(key), int):
                return int(meta[key])
    return None


def scan_tar(path: Path) -> tuple[list[tuple[str, int, int, int | None]], list[str]]:
    """(key, image offset, image size, label or None) per sample of one tar, in stored order, and its bad samples.

    Members are grouped by key as webdataset does (the member path up to the first dot of its base name); the tar's
    headers are read and the data skipped, except the small `.cls` / `.json` members."""
    samples: dict[str, dict[str, Any]] = {}
    bad: list[str] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                folder, _, base = m.name.rpartition("/")
                if base.startswith("."):
                    continue
                stem, _, ext = base.partition(".")
                key = f"{folder}/{stem}" if folder else stem
                s = samples.setdefault(key, {})
                ext = ext.lower()
                if ext in WDS_IMAGE_EXTS and "image" not in s:
                    s["image"] = (m.offset_data, m.size)
                elif ext in ("cls", "json"):
                    fh = tar.extractfile(m)
                    s[ext] = fh.read() if fh is not None else None
    except (tarfile.TarError, OSError) as exc:
        raise ConfigError(f"{path}: not a readable tar ({exc}); remove it or replace it") from None
    out = []
    for key, s in samples.items():
        where = f"{path}:{key}"
        if "image" not in s:
            bad.append(f"{where}: no image member ({', '.join(WDS_IMAGE_EXTS)})")
            continue
        try:
            label = _label(s.get("cls"), s.get("json"))
        except (ValueError, UnicodeDecodeError) as exc:
            bad.append(f"{where}: unreadable label ({exc})")
            continue
        if label is None:
            bad.append(f"{where}: no label (.cls, or 'label' in .json)")
            continue
        out.append((key, *s["image"], label))
    return out, bad


class WebDatasetSource(ShardFilesSource):
    format = "webdataset"
    suffix = ".tar"
    what = "the shards"
    missing = ("shards: data.format=webdataset reads *.tar files whose names contain 'train' and 'val' (or "
               "'validation')")

    def scan(self) -> Listing:
        files = self.files()
        raw: dict[str, list[tuple[Any, Any]]] = {s: [] for s in SPLITS}
        bad: list[str] = []
        for split in SPLITS:
            for path in files[split]:
                samples, tar_bad = scan_tar(path)
                bad += tar_bad
                raw[split] += [([str(path), off, size, key], label) for key, off, size, label in samples]
        return self.labelled(files, raw, None, bad)

    def reader(self) -> Callable[[Any], bytes]:
        handles: OrderedDict[str, Any] = OrderedDict()  # the last OPEN_FILES shards read, kept open

        def read(ref: Any) -> bytes:
            path, offset, size = ref[0], int(ref[1]), int(ref[2])
            fh = handles.pop(path, None)
            if fh is None:
                if len(handles) >= OPEN_FILES:
                    handles.popitem(last=False)[1].close()
                fh = open(path, "rb")  # noqa: SIM115 - kept open across a unit's reads
            handles[path] = fh
            fh.seek(offset)
            data = fh.read(size)
            if len(data) != size:
                raise OSError(f"{path}: truncated at offset {offset} (wanted {size} bytes)")
            return data

        return read

    def describe(self, ref: Any) -> str:
        return f"{ref[0]}:{ref[3]}"
