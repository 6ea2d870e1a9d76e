"""The recover-method plug-in protocol and its registry.

A method is one file in this package that registers itself with `@register`: its name, one line of
description, what it needs (`Needs`), its own config dataclass (a nested section `recover.<name>` of the run
configuration, documented field by field), whether the IPC images of a class are made together, its default
init, and `open(env, cfg) -> MethodWorker`. The worker turns (classes, IPC range, generator) into images plus
metrics: pure compute on tensors, no files. The recover stage keeps sharding, the real-image pool, encoding,
outputs and grids.

This module imports neither torch nor the run configuration, so `pipeline.config` can build its `recover`
section from the registry without an import cycle; method files import torch inside their functions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


def doc_field(default: Any, doc: str) -> Any:
    """A method config field with its documentation (shown by `distill methods` and `distill run --help`)."""
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class Needs:
    """What a method needs from the run, checked by the recover stage before any unit runs."""

    teacher: bool = False  # the squeeze stage's teacher, frozen on the worker's device
    bn_teacher: bool = False  # ... and it must have BatchNorm2d layers (BN-statistics matching)
    real_images: bool = False  # the real training images of the unit's classes
    squeeze_stats: bool = False  # per-sample statistics recorded by the squeeze stage

    def describe(self) -> str:
        parts = [name.replace("_", " ") for name, on in (("bn_teacher", self.bn_teacher),
                                                           ("teacher", self.teacher and not self.bn_teacher),
                                                           ("real_images", self.real_images),
                                                           ("squeeze_stats", self.squeeze_stats)) if on]
        return ", ".join(parts) or "nothing"


@dataclass
class MethodOutput:
    """What a method worker returns for one unit.

    images: float tensors [3, H, W] in [0, 1], one per (class, ipc index) pair, in the order of `classes` /
    `ipc_index`; the stage writes them in this order. metrics: JSON-able figures for the unit record.
    """

    images: list[Any]
    classes: list[int]
    ipc_index: list[int]
    metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not len(self.images) == len(self.classes) == len(self.ipc_index):
            raise ValueError(f"method output: {len(self.images)} images, {len(self.classes)} classes and "
                             f"{len(self.ipc_index)} ipc indices differ in length")


class MethodWorker(Protocol):
    def run(self, classes: range, ipc: range, gen: Any, unit_key: str) -> MethodOutput: ...


@dataclass(frozen=True)
class Method:
    """A registered recover method."""

    name: str
    description: str
    needs: Needs
    open: Callable[[Any, Any], MethodWorker]  # (RecoverEnv, the method's config or None) -> worker
    config_cls: type | None = None  # its config dataclass, the section `recover.<config_key>`
    whole_class: bool = False  # all IPC images of a class are made together: units split classes, not IPC
    default_init: str = "noise"  # what `recover.init = auto` means for this method
    synthesizes: bool = True  # False for methods that select real images (no image-iterations)
    # How its paper trains the hard-label student (`train.hard_augment = auto`): "dsa" (DSA, DM, DataDAM train
    # it with DSA augmentation) or "none".
    hard_augment: str = "none"
    key: str = ""  # its config section's name when the method's name cannot be one (`import`: `import_set`)

    @property
    def config_key(self) -> str:
        """The attribute name of its config section (a Python identifier: '-' becomes '_')."""
        return self.key or self.name.replace("-", "_")

    def config_fields(self) -> list[tuple[str, Any, str]]:
        """(key, default, doc) of each config field."""
        if self.config_cls is None:
            return []
        out = []
        for f in dataclasses.fields(self.config_cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            out.append((f.name, default, f.metadata.get("doc", "")))
        return out


_REGISTRY: dict[str, Method] = {}


def register(name: str, *, description: str, needs: Needs = Needs(), config: type | None = None,
             whole_class: bool = False, default_init: str = "noise",
             synthesizes: bool = True, hard_augment: str = "none", key: str = "") -> Callable[[Callable[[Any, Any], MethodWorker]], Callable[[Any, Any], MethodWorker]]:
    """Decorator on a method's `open(env, cfg)` function: adds the method to the registry under `name`."""

    def wrap(open_fn: Callable[[Any, Any], MethodWorker]) -> Callable[[Any, Any], MethodWorker]:
        if name in _REGISTRY:
            raise ValueError(f"recover method '{name}' is registered twice")
        if config is not None and not dataclasses.is_dataclass(config):
            raise TypeError(f"recover method '{name}': config must be a dataclass, got {config!r}")
        _REGISTRY[name] = Method(name=name, description=description, needs=needs, open=open_fn, config_cls=config,
                                 whole_class=whole_class, default_init=default_init, synthesizes=synthesizes,
                                 hard_augment=hard_augment, key=key)
        return open_fn

    return wrap


def registry() -> dict[str, Method]:
    """Every registered method, by name (the built-in ones are registered by importing `pipeline.methods`)."""
    return dict(_REGISTRY)


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown recover method '{name}'{hint}; `distill methods` lists them")
    return _REGISTRY[name]
