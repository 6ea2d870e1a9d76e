"""File-per-image sources: the ImageFolder layout (`train/<class>/*`, `val/<class>/*`) and ImageNet's ILSVRC / Kaggle
layout (`ILSVRC/Data/CLS-LOC/train/<wnid>/*.JPEG`, a flat `val/` folder labelled by `LOC_val_solution.csv`)."""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from pipeline.core.errors import ConfigError
from pipeline.data.images import SOURCE_IMAGE_SUFFIXES, check_name, class_folders
from pipeline.data.sources.base import (
    SPLITS,
    Listing,
    Source,
    file_stat,
    find_names_file,
    finish_fingerprint,
    read_names,
)

log = logging.getLogger(__name__)

VAL_CSV = "LOC_val_solution.csv"
SYNSETS = "LOC_synset_mapping.txt"
CLS_LOC = Path("ILSVRC") / "Data" / "CLS-LOC"


def list_images(folder: Path) -> tuple[list[os.DirEntry], int, list[str]]:
    """The images directly in `folder` (sorted by name), the number of other files, the sub-folders (not read)."""
    with os.scandir(folder) as it:
        entries = list(it)
    nested = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    files = sorted((e for e in entries if e.is_file() and not e.name.startswith(".")), key=lambda e: e.name)
    for e in files:
        check_name(folder, e.name)
    images = [e for e in files if Path(e.name).suffix.lower() in SOURCE_IMAGE_SUFFIXES]
    return images, len(files) - len(images), nested


def group_stats(images: list[os.DirEntry]) -> dict[str, Any]:
    """A group's fingerprint entry: number of images, their bytes, a sha256 of their (name, size, mtime) list."""
    stats = [(e.name, e.stat()) for e in images]
    listing = "".join(f"{n}\t{st.st_size}\t{st.st_mtime_ns}\n" for n, st in stats)
    return {"files": len(images), "bytes": sum(st.st_size for _, st in stats),
            "sha256": hashlib.sha256(listing.encode()).hexdigest()}


def _class_split(root: Path, split_dir: Path, classes: list[str], split: str, out: Listing,
                 per_class: dict[str, dict[str, Any]], nested: list[str]) -> None:
    """Add the images of `split_dir/<class>/` to `out.items[split]` and their stats to `per_class`."""
    for ci, name in enumerate(classes):
        folder = split_dir / name
        images, skipped, sub = list_images(folder)
        out.skipped += skipped
        nested += [f"{split}/{name}/{s}" for s in sub]
        if not images:
            raise ConfigError(f"class folder {folder} holds no images; remove it from both splits or add images")
        out.items[split].extend((str(folder / e.name), ci) for e in images)
        per_class[name] = group_stats(images)


def _warn_nested(root: Path, nested: list[str]) -> None:
    if nested:
        log.warning("%s: %d sub-folder(s) of class folders are not read (%s%s): only the files directly in a class "
                    "folder are its images (torchvision's ImageFolder would also read the sub-folders' images); "
                    "move their images up into the class folder to use them", root, len(nested),
                    ", ".join(nested[:3]), ", ..." if len(nested) > 3 else "")


def names_for(ids: list[str], names_file: Path | None) -> list[str] | None:
    """Human-readable names of folder-named classes from a names file (an id it lacks keeps its id as name)."""
    if names_file is None:
        return None
    known = dict(zip(*read_names(names_file), strict=True))
    missing = [i for i in ids if i not in known]
    if missing:
        log.warning("%s has no name for %d class(es), e.g. %s: they are named by their ids", names_file,
                    len(missing), ", ".join(missing[:3]))
    return [known.get(i, i) for i in ids]


class ImageFolderSource(Source):
    """`train/<class>/*` and `val/<class>/*` with the same class folders (torchvision's ImageFolder rule)."""

    format = "imagefolder"

    def scan(self) -> Listing:
        root = self.root
        split_classes: dict[str, list[str]] = {}
        for split in SPLITS:
            d = root / split
            if not d.is_dir():
                raise ConfigError(f"{d} is missing: the data folder needs train/<class>/* and val/<class>/*")
            split_classes[split] = class_folders(d)  # torchvision's rule; dot-named folders get a warning
            if not split_classes[split]:
                raise ConfigError(f"{d} holds no class folders")
        if split_classes["train"] != split_classes["val"]:
            only_t = sorted(set(split_classes["train"]) - set(split_classes["val"]))
            only_v = sorted(set(split_classes["val"]) - set(split_classes["train"]))
            raise ConfigError(
                f"train and val class folders differ under {root}: only in train: {only_t[:5]}, only in val: "
                f"{only_v[:5]}; both splits need the same class folders")
        classes = split_classes["train"]
        out = Listing(classes=classes, names=names_for(classes, find_names_file(root)),
                      items={s: [] for s in SPLITS}, fingerprint={})
        per_class: dict[str, dict[str, dict[str, Any]]] = {}
        nested: list[str] = []
        for split in SPLITS:
            per_class[split] = {}
            _class_split(root, root / split, classes, split, out, per_class[split], nested)
        _warn_nested(root, nested)
        out.fingerprint = finish_fingerprint(root, self.format, classes, per_class)
        return out


def ilsvrc_dirs(root: Path) -> tuple[Path, Path]:
    """(the folder holding train/ and val/, the folder holding the CSV) of an ILSVRC / Kaggle download: `root` is
    the Kaggle folder (ILSVRC/Data/CLS-LOC/ and LOC_val_solution.csv in it) or a folder with train/, a flat val/
    and the CSV."""
    data = root / CLS_LOC if (root / CLS_LOC).is_dir() else root
    for need in (data / "train", data / "val"):
        if not need.is_dir():
            raise ConfigError(f"{need} is missing: data.format=ilsvrc reads {CLS_LOC}/train/<wnid>/*.JPEG and "
                              f"{CLS_LOC}/val/*.JPEG with {VAL_CSV} (the Kaggle ImageNet download)")
    for folder in (root, data):
        if (folder / VAL_CSV).is_file():
            return data, folder
    raise ConfigError(f"{root / VAL_CSV} is missing: the flat val folder's labels come from it (columns ImageId, "
                      "PredictionString whose first token is the wnid)")


def read_val_csv(path: Path) -> dict[str, str]:
    """ImageId -> wnid (the first token of PredictionString) of LOC_val_solution.csv."""
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise ConfigError(f"{path}: expected the columns ImageId and PredictionString, found "
                              f"{reader.fieldnames}")
        out = {}
        for row in reader:
            tokens = (row.get("PredictionString") or "").split()
            out[row["ImageId"].strip()] = tokens[0] if tokens else ""
    return out


class IlsvrcSource(Source):
    """ImageNet as Kaggle / image-net.org ship it: class folders of wnids for train, a flat val folder whose labels
    are in LOC_val_solution.csv, the names in LOC_synset_mapping.txt. Class order = sorted wnids (ImageFolder's)."""

    format = "ilsvrc"

    def scan(self) -> Listing:
        data, csv_dir = ilsvrc_dirs(self.root)
        classes = class_folders(data / "train")
        if not classes:
            raise ConfigError(f"{data / 'train'} holds no class folders")
        names_file = find_names_file(self.root, data, csv_dir)
        if names_file is None and (self.root / SYNSETS).is_file():
            names_file = self.root / SYNSETS
        out = Listing(classes=classes, names=names_for(classes, names_file), items={s: [] for s in SPLITS},
                      fingerprint={})
        groups: dict[str, dict[str, dict[str, Any]]] = {"train": {}, "val": {}}
        nested: list[str] = []
        _class_split(self.root, data / "train", classes, "train", out, groups["train"], nested)
        _warn_nested(self.root, nested)
        labels = read_val_csv(csv_dir / VAL_CSV)
        index = {c: i for i, c in enumerate(classes)}
        images, skipped, _ = list_images(data / "val")
        out.skipped += skipped
        seen = set()
        for e in images:
            stem = e.name.rsplit(".", 1)[0]
            seen.add(stem)
            wnid = labels.get(stem)
            path = str(data / "val" / e.name)
            if wnid is None:
                out.bad.append(f"{path}: no entry for {stem} in {VAL_CSV}")
            elif wnid not in index:
                out.bad.append(f"{path}: {VAL_CSV} labels it {wnid!r}, which is not a class folder of train/")
            else:
                out.items["val"].append((path, index[wnid]))
        unseen = len(set(labels) - seen)
        if unseen:
            out.notes.append(f"{unseen} {VAL_CSV} entries have no image in {data / 'val'}")
        if not out.items["val"]:
            raise ConfigError(f"{data / 'val'}: no image has a usable label in {csv_dir / VAL_CSV}")
        groups["val"]["val/"] = group_stats(images)
        groups["val"][VAL_CSV] = file_stat(csv_dir / VAL_CSV, self.root)
        out.fingerprint = finish_fingerprint(self.root, self.format, classes, groups)
        return out
