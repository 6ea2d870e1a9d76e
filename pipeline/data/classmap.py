"""The class map of the real data, `RUN_DIR/real/classes.json`: written by ingest, read by every later stage.

It holds the class names (`classes`, `num_classes`), the sample counts per split (`counts`), the
data source and dataset name, and the shard names per split (`shards`): readers take the shard
list from here, never from a glob, so a half-written or stale shard in the folder is never read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from manifests.store import atomic_write_text
from pipeline.core.errors import ConfigError

REAL_DIR = "real"
"""Folder of the ingested real data under the run directory."""
CLASS_MAP = "classes.json"


class IngestMissingError(ConfigError, FileNotFoundError):
    """The class map is missing: the ingest stage has not run (or finished) in this run directory.

    A ConfigError, so the CLI reports it as a usage error (exit 2), and a FileNotFoundError, as the
    loaders raised before the class map had one reader.
    """


def class_map_path(real_dir: str | Path) -> Path:
    return Path(real_dir) / CLASS_MAP


def read_class_map(real_dir: str | Path) -> dict[str, Any]:
    """The parsed class map in `real_dir` (RUN_DIR/real); IngestMissingError when there is none."""
    path = class_map_path(real_dir)
    if not path.is_file():
        raise IngestMissingError(f"{path} is missing: run the ingest stage first")
    return json.loads(path.read_text())


def write_class_map(real_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Write the class map atomically (ingest's finalize, once every shard is written)."""
    path = class_map_path(real_dir)
    atomic_write_text(path, json.dumps(meta, indent=1))
    return path
