"""The stage registry, the run order derived from the stages' `depends_on`, and the config hashes.

A stage is one module of `pipeline.run.stages` that ends with `STAGE = register_stage(MyStage())`; importing that
package registers the built-in ones (the runner and the CLI do). The registry's order does not matter:
`stage_order()` sorts the stages so that each comes after the stages it may depend on, which is the order the
runner, `distill run --stages`, `distill status` and the evaluate summary use. A stage's hash covers its own config
sections and the hashes of the stages its configuration actually uses (`Stage.dependencies`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pipeline.core.errors import ConfigError
from pipeline.run.base import Stage

S = TypeVar("S", bound=Stage)
_REGISTRY: dict[str, Stage] = {}
_GRAPH: list[StageGraph] = []  # the pipeline's graph, made on first use after the last registration


def register_stage(stage: S) -> S:
    """Add a stage to the pipeline (a stage module's `STAGE = register_stage(MyStage())`); returns it."""
    if not stage.name:
        raise ValueError(f"{type(stage).__name__} has no name")
    if stage.name in _REGISTRY and _REGISTRY[stage.name] is not stage:
        raise ValueError(f"stage '{stage.name}' is registered twice")
    _REGISTRY[stage.name] = stage
    _GRAPH.clear()
    return stage


def get_stage(name: str) -> Stage:
    """The registered stage `name`."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown stage '{name}'")
    return _REGISTRY[name]


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
            raise ConfigError(f"unknown stage(s) {', '.join(unknown)}; stages are {', '.join(self.names)}")
        return [n for n in self.names if n in names]


    def hashes(self, cfg: Any) -> dict[str, str]:
        """Each stage's config hash: its own config sections and the hashes of the stages it depends on under this
        configuration (`Stage.dependencies`: e.g. recover folds in the teacher's only when its method uses it)."""
        out: dict[str, str] = {}
        for stage in self.stages:
            payload = {
                "stage": stage.name,
                "sections": {s: cfg.section_for_hash(s) for s in stage.sections},
                "upstream": {d: out[d] for d in stage.dependencies(cfg)},
            }
            text = json.dumps(payload, sort_keys=True, default=str)
            out[stage.name] = hashlib.sha256(text.encode()).hexdigest()[:16]
        return out


def pipeline_graph() -> StageGraph:
    """The registered pipeline stages in run order (the built-in ones are registered by importing
    `pipeline.run.stages`)."""
    if not _REGISTRY:
        raise RuntimeError("no stage is registered: import pipeline.run.stages (the built-in stages) first")
    if not _GRAPH:
        _GRAPH.append(StageGraph.of(_REGISTRY.values()))
    return _GRAPH[0]


def stage_order() -> tuple[str, ...]:
    """Names of the pipeline's stages in run order (derived from `depends_on`)."""
    return pipeline_graph().names
