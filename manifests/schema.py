"""Manifest record schema: one frozen record per finished (or failed) unit of work."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class FileRef:
    """An output or input file: path relative to the run directory, content hash, size."""

    uri: str
    sha256: str
    bytes: int

    @staticmethod
    def of(path: Path, root: Path) -> FileRef:
        """Hash `path` (streamed) and express it relative to `root` when inside it."""
        from manifests.digest import file_digest

        path = Path(path)
        sha, size = file_digest(path)
        try:
            uri = str(path.resolve().relative_to(Path(root).resolve()))
        except ValueError:
            uri = str(path.resolve())
        return FileRef(uri=uri, sha256=sha, bytes=size)


RECORD_STATUSES = ("done", "failed")


@dataclass(frozen=True)
class Record:
    """What one unit did. Written last, atomically: its presence marks the unit done."""

    run_id: str
    stage: str
    unit: str
    status: str  # "done" | "failed"
    config_hash: str
    seed: int
    inputs: tuple[FileRef, ...] = ()
    outputs: tuple[FileRef, ...] = ()
    metrics: dict[str, Any] = field(default_factory=dict)
    code_version: str = ""
    host: str = ""
    attempt: int = 1
    started: float = 0.0
    ended: float = 0.0
    error: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Record:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"manifest schema version {version} is not supported (expected {SCHEMA_VERSION})")
        if data.get("status") not in RECORD_STATUSES:  # an unknown status must not pass for done
            raise ValueError(f"status {data.get('status')!r} is not one of {', '.join(RECORD_STATUSES)}")
        data = dict(data)
        data["inputs"] = tuple(FileRef(**f) for f in data.get("inputs", ()))
        data["outputs"] = tuple(FileRef(**f) for f in data.get("outputs", ()))
        names = {f.name for f in dataclasses.fields(Record)}
        return Record(**{k: v for k, v in data.items() if k in names})

    @staticmethod
    def from_json(text: str) -> Record:
        return Record.from_dict(json.loads(text))
