"""Stage registry and the run order, derived from the stages' `depends_on`.

Stage modules are imported lazily (they pull in torch). The registry maps a name to the module that
defines `STAGE`; its order does not matter: `stage_order()` sorts the stages so that each comes after the
stages it depends on, which is the order the runner, `distill run --stages`, the evaluate summary and
`distill collect` use.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.stages.base import Stage

_MODULES = {name: f"pipeline.stages.{name}" for name in ("ingest", "squeeze", "recover", "relabel", "train",
                                                          "baseline", "evaluate")}
_CACHE: dict[str, Stage] = {}


def get_stage(name: str) -> Stage:
    """The stage object registered under `name` (module attribute `STAGE`)."""
    if name not in _MODULES:
        raise KeyError(f"unknown stage '{name}'")
    if name not in _CACHE:
        _CACHE[name] = importlib.import_module(_MODULES[name]).STAGE
    return _CACHE[name]


def topological_order(stages: Iterable[Stage]) -> list[Stage]:
    """`stages` with each one after everything in its `depends_on` (Kahn's algorithm).

    Stable: among stages whose dependencies are met, the one given first comes first, so the result is the
    same on every call. Raises ValueError for a dependency on a stage that is not given, or a cycle.
    """
    given = list(stages)
    names = [s.name for s in given]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names are not unique: {names}")
    for s in given:
        missing = [d for d in s.depends_on if d not in names]
        if missing:
            raise ValueError(f"stage '{s.name}' depends on unknown stage(s) {', '.join(missing)}")
    placed: set[str] = set()
    order: list[Stage] = []
    while len(order) < len(given):
        ready = [s for s in given if s.name not in placed and all(d in placed for d in s.depends_on)]
        if not ready:
            stuck = [s.name for s in given if s.name not in placed]
            raise ValueError(f"stages {', '.join(stuck)} depend on each other in a cycle")
        order.append(ready[0])  # one at a time, so ties keep the given order
        placed.add(ready[0].name)
    return order


@dataclass(frozen=True)
class StageGraph:
    """A set of stages in run order (each after its `depends_on`): the pipeline's, or a test's own."""

    stages: tuple[Stage, ...]

    @classmethod
    def of(cls, stages: Iterable[Stage]) -> StageGraph:
        return cls(tuple(topological_order(stages)))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    def get(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"unknown stage '{name}'")

    def select(self, names: Sequence[str] | None) -> list[str]:
        """`names` in run order (all stages when None or empty); ConfigError naming unknown ones."""
        if not names:
            return list(self.names)
        unknown = [n for n in names if n not in self.names]
        if unknown:
            from pipeline.config import ConfigError

            raise ConfigError(f"unknown stage(s) {', '.join(unknown)}; stages are {', '.join(self.names)}")
        return [n for n in self.names if n in names]


@functools.cache
def pipeline_graph() -> StageGraph:
    """The registered pipeline stages in run order."""
    return StageGraph.of(get_stage(name) for name in _MODULES)


def stage_order() -> tuple[str, ...]:
    """Names of the pipeline's stages in run order (derived from `depends_on`)."""
    return pipeline_graph().names
