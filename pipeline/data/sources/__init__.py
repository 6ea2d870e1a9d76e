"""Ingest sources: the layouts a real data set arrives in (`data.format`), detected from the folder with `auto`.

=============  ===========================================================================================
imagefolder    `train/<class>/*`, `val/<class>/*` (torchvision's ImageFolder)
ilsvrc         `ILSVRC/Data/CLS-LOC/train/<wnid>/*.JPEG`, a flat `val/` + `LOC_val_solution.csv` (Kaggle)
webdataset     `*train*.tar` / `*val*.tar` shards with an image member and `.cls` per sample (timm's)
parquet        `*train*.parquet` / `*validation*.parquet` with `image` {bytes, path} and `label` (Hugging Face)
=============  ===========================================================================================

May import: `pipeline.core`, `pipeline.data` (image helpers).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.core.errors import ConfigError
from pipeline.data.sources.base import SPLITS, Listing, Source
from pipeline.data.sources.folders import CLS_LOC, VAL_CSV, IlsvrcSource, ImageFolderSource
from pipeline.data.sources.parquet import ParquetSource
from pipeline.data.sources.wds import WebDatasetSource

__all__ = ["FORMATS", "SPLITS", "Listing", "Source", "detect", "open_source"]

log = logging.getLogger(__name__)

SOURCES: dict[str, type[Source]] = {s.format: s for s in (ImageFolderSource, IlsvrcSource, WebDatasetSource,
                                                           ParquetSource)}
FORMATS = ("auto", *SOURCES)


def _has(root: Path, suffix: str, depth: int = 2) -> bool:
    """Whether a file ending in `suffix` lies within `depth` folder levels under root."""
    layer = [root]
    for _ in range(depth + 1):
        nxt = []
        for d in layer:
            try:
                entries = list(d.iterdir())
            except OSError:
                continue
            if any(e.is_file() and e.name.endswith(suffix) for e in entries):
                return True
            nxt += [e for e in entries if e.is_dir() and not e.name.startswith(".")]
        layer = nxt
    return False


def detect(root: str | Path) -> tuple[str, str]:
    """(format, what was found) of a data folder; a ConfigError naming what was looked for when nothing fits."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"data folder not found: {root}")
    if (root / CLS_LOC).is_dir():
        return "ilsvrc", f"{CLS_LOC}/"
    if (root / VAL_CSV).is_file() and (root / "train").is_dir():
        return "ilsvrc", f"train/ and {VAL_CSV}"
    splits = [root / s for s in ("train", "val") if (root / s).is_dir()]
    if any(e.is_dir() for d in splits for e in d.iterdir()):
        return "imagefolder", "class folders in train/ or val/"
    if _has(root, ".parquet"):
        return "parquet", "*.parquet files"
    if _has(root, ".tar"):
        return "webdataset", "*.tar shards"
    if splits:
        return "imagefolder", "train/ or val/ folders"  # what they lack is said by the ImageFolder listing
    raise ConfigError(f"{root}: data.format=auto found none of the layouts it reads: train/<class>/ and val/<class>/ "
                      f"(imagefolder), {CLS_LOC}/ or {VAL_CSV} (ilsvrc), *.tar shards (webdataset), *.parquet "
                      "files (parquet); name the format with data.format=... or point data.source at the folder "
                      "that holds them")


def resolve_format(fmt: str, root: str | Path) -> str:
    """`fmt`, or with `auto` the detected format (logged with what was found)."""
    if fmt != "auto":
        if fmt not in SOURCES:
            raise ConfigError(f"data.format={fmt!r}: expected one of {', '.join(FORMATS)}")
        return fmt
    found, why = detect(root)
    if (str(root), found) not in _SAID:
        _SAID.add((str(root), found))
        log.info("data.format=auto: %s in %s: reading it as %s", why, root, found)
    return found


_SAID: set[tuple[str, str]] = set()


def open_source(fmt: str, root: str | Path) -> Source:
    """The source of a data folder in the given (or detected) format."""
    return SOURCES[resolve_format(fmt, root)](root)
