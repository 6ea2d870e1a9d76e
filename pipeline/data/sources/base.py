"""What every ingest source shares: the listing it gives, the planning of shards, the names file, file fingerprints.

A source lists, per split, `(reference, class index)` pairs; the reference is JSON (a unit's payload carries it to
a worker) and the source's reader turns it into the image's encoded bytes. Class indices follow one rule for every
source: the position of the class id in the sorted ids where the ids are names of folders (ImageFolder, ILSVRC),
the stored integer label where the source stores integers (WebDataset `.cls`, parquet `label`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import ConfigError
from pipeline.core.seeding import derive_seed

SPLITS = ("train", "val")
NAME_FILES = ("classes.txt", "LOC_synset_mapping.txt")
"""Files beside the data whose lines are `<id> [<human-readable name>]`, line i = class i where labels are integers
(`LOC_synset_mapping.txt` is ImageNet's: `n01440764 tench, Tinca tinca`)."""

Item = tuple[Any, int]


@dataclass
class Listing:
    """A source's content: class ids (index order), their names where the source has them, items per split."""

    classes: list[str]
    names: list[str] | None
    items: dict[str, list[Item]]
    fingerprint: dict[str, Any]
    skipped: int = 0
    """Files that are not images (ignored)."""
    bad: list[str] = field(default_factory=list)
    """Rows found unusable while listing (no label, unknown label, label out of range, no CSV entry): counted with
    the undecodable images against `data.max_bad_fraction`."""
    notes: list[str] = field(default_factory=list)
    """What the listing found worth a warning (e.g. CSV entries without an image)."""


class Source:
    """One on-disk layout. Subclasses set `format` and implement `scan`; file-per-image sources keep the reader."""

    format = ""
    cheap_fingerprint = False
    """Whether `fingerprint` costs less than `scan` (shard sources: file sizes and times against every header)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConfigError(f"data folder not found: {self.root}")

    def scan(self) -> Listing:
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the data (compared at every run start): by default the listing's."""
        return self.scan().fingerprint

    def plan(self, items: Sequence[Item], shard_size: int, seed: int) -> list[list[int]]:
        """Item positions per output shard: one seeded permutation of the split, cut every `shard_size` (shards mix
        the classes; the loaders shuffle shards and a buffer on top)."""
        return permuted_chunks(len(items), shard_size, seed)

    def reader(self) -> Callable[[Any], bytes]:
        """reference -> encoded image bytes (an OSError when it cannot be read); file paths by default."""
        return lambda ref: Path(ref).read_bytes()

    def describe(self, ref: Any) -> str:
        """The reference as the `source` of a sample's JSON and of error messages."""
        return str(ref)


def permuted_chunks(n: int, shard_size: int, seed: int) -> list[list[int]]:
    """A seeded permutation of range(n) cut every `shard_size`."""
    order = np.random.default_rng(seed).permutation(n).tolist()
    return [order[s:s + shard_size] for s in range(0, n, shard_size)]


def split_seed(seed: int, split: str) -> int:
    """The seed of a split's shard order (the ImageFolder ingest's, so its shards keep their bytes)."""
    return derive_seed(seed, "ingest", split)


def read_names(path: Path) -> tuple[list[str], list[str]]:
    """(ids, names) of a names file: one class per line, `<id>` or `<id> <name>` (tab or space); blank lines and
    lines starting with # are skipped; a name defaults to the id."""
    ids, names = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        if parts[0] in (".", "..") or "/" in parts[0] or "\\" in parts[0]:
            raise ConfigError(f"{path}: class id {parts[0]!r} cannot name a folder (exports write one folder per "
                              "class); use ids without '/' or '\\'")
        ids.append(parts[0])
        names.append(parts[1].strip() if len(parts) > 1 else parts[0])
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ConfigError(f"{path}: class ids appear twice: {dup[:5]}; one line per class")
    if not ids:
        raise ConfigError(f"{path} lists no classes")
    return ids, names


def find_names_file(*folders: Path) -> Path | None:
    """The first names file (NAME_FILES order) in the given folders."""
    for folder in folders:
        for name in NAME_FILES:
            if (folder / name).is_file():
                return folder / name
    return None


def file_stat(path: Path, base: Path) -> dict[str, Any]:
    """A file's entry in a fingerprint: one 'file', its bytes, a sha256 of (relative name, size, mtime)."""
    st = path.stat()
    rel = str(path.relative_to(base)) if path.is_relative_to(base) else str(path)
    return {"files": 1, "bytes": st.st_size,
            "sha256": hashlib.sha256(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode()).hexdigest()}


def finish_fingerprint(root: Path, fmt: str, classes: list[str], splits: dict[str, dict[str, dict[str, Any]]],
                       extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fingerprint of a source: per split a group (a class folder, a shard file, a CSV) -> files, bytes, sha256;
    totals and a sha256 over all of it. The ImageFolder fingerprint has no format key, as before sources existed."""
    fp: dict[str, Any] = {"source": str(root.resolve()), "classes": classes, "splits": splits,
                          "files": sum(g["files"] for sp in splits.values() for g in sp.values()),
                          "bytes": sum(g["bytes"] for sp in splits.values() for g in sp.values())}
    digest_of: list[Any] = [classes, splits]
    if fmt != "imagefolder":
        fp["format"] = fmt
        digest_of.append(fmt)
    if extra:
        fp.update(extra)
        digest_of.append(extra)
    fp["sha256"] = hashlib.sha256(json.dumps(digest_of, sort_keys=True).encode()).hexdigest()
    return fp


def split_of(name: str) -> str | None:
    """The split a file or folder name says: `train` -> train, `validation` / `valid` / `val` -> val, else None."""
    low = name.lower()
    return "train" if "train" in low else "val" if "val" in low else None


def files_matching(root: Path, suffix: str) -> dict[str, list[Path]]:
    """Files under `root` (recursively, sorted) ending in `suffix`, by split: from the file's name, else from the
    nearest folder under `root` whose name says one (`train/0000.tar`); others (test...) are left out."""
    out: dict[str, list[Path]] = {s: [] for s in SPLITS}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        folders = Path(dirpath).relative_to(root).parts
        for name in sorted(filenames):
            if not name.endswith(suffix) or name.startswith("."):
                continue
            split = split_of(name) or next((s for s in map(split_of, reversed(folders)) if s), None)
            if split:
                out[split].append(Path(dirpath) / name)
    return out


def integer_classes(root: Path, labels: Sequence[int], names_from_data: list[str] | None,
                    what: str) -> tuple[list[str], list[str] | None]:
    """Class ids and names of a source with integer labels: a names file beside the data (its ids, e.g. wnids, and
    names), else the names stored with the data (ids are then the zero-padded indices: names need not be unique,
    ImageNet has two 'crane'), else zero-padded indices from the largest label."""
    names_file = find_names_file(root)
    if names_file is not None:
        ids, names = read_names(names_file)
        return ids, names
    count = len(names_from_data) if names_from_data else (max(labels) + 1 if labels else 0)
    if count < 1:
        raise ConfigError(f"{root}: {what} hold no labels; add a classes.txt (one class per line)")
    width = max(4, len(str(count - 1)))
    return [f"{i:0{width}d}" for i in range(count)], list(names_from_data) if names_from_data else None


class ShardFilesSource(Source):
    """A source of shard files with integer labels (WebDataset tars, parquet files): its files by split, a per-file
    fingerprint (name, size, modification time), and the listing's labels checked against the class range.
    Subclasses set `suffix`, `what` (the files, in messages) and `missing` (what a split without files is told)."""

    cheap_fingerprint = True
    suffix = ""
    what = ""
    missing = ""

    def files(self) -> dict[str, list[Path]]:
        files = files_matching(self.root, self.suffix)
        for split in SPLITS:
            if not files[split]:
                raise ConfigError(f"{self.root}: no {split} {self.missing}")
        return files

    def fingerprint(self, files: dict[str, list[Path]] | None = None) -> dict[str, Any]:
        files = files or self.files()
        groups = {s: {str(p.relative_to(self.root)): file_stat(p, self.root) for p in files[s]} for s in SPLITS}
        return finish_fingerprint(self.root, self.format, [], groups)

    def labelled(self, files: dict[str, list[Path]], raw: dict[str, list[tuple[Any, Any]]],
                 names_from_data: list[str] | None, bad: list[str]) -> Listing:
        """The listing of (reference, stored label) pairs: class ids and names (`integer_classes`), and every row
        whose label is missing or outside the classes moved to `bad`."""
        ints = [v for s in SPLITS for _, v in raw[s] if isinstance(v, int) and v >= 0]
        classes, names = integer_classes(self.root, ints, names_from_data, self.what)
        out = Listing(classes=classes, names=names, items={s: [] for s in SPLITS},
                      fingerprint=self.fingerprint(files), bad=bad)
        for split in SPLITS:
            for ref, label in raw[split]:
                if not isinstance(label, int):
                    out.bad.append(f"{self.describe(ref)}: no label ({label!r})")
                elif not 0 <= label < len(classes):
                    out.bad.append(f"{self.describe(ref)}: label {label} is outside 0..{len(classes) - 1}")
                else:
                    out.items[split].append((ref, label))
        return out
