"""Stage registry. Stage modules are imported lazily (they pull in torch)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.stages.base import Stage

STAGE_ORDER: tuple[str, ...] = ("ingest", "squeeze", "recover", "relabel", "train", "evaluate")
_MODULES = {name: f"pipeline.stages.{name}" for name in STAGE_ORDER}
_CACHE: dict[str, Stage] = {}


def get_stage(name: str) -> Stage:
    """The stage object registered under `name` (module attribute `STAGE`)."""
    if name not in _MODULES:
        raise KeyError(f"unknown stage '{name}'")
    if name not in _CACHE:
        _CACHE[name] = importlib.import_module(_MODULES[name]).STAGE
    return _CACHE[name]
