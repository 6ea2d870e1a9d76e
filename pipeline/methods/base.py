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


def doc_field(default: Any, doc: str, *, hash_if_set: bool = False) -> Any:
    """A method config field with its documentation (shown by `distill methods` and `distill run --help`).

    hash_if_set: a field added after run directories existed, left out of the recover hash while it equals its
    default (whose behaviour must be what the code computed before the field existed), so those runs resume."""
    return field(default=default, metadata={"doc": doc, **({"hash_if_set": True} if hash_if_set else {})})


@dataclass(frozen=True)
class Needs:
    """What a method needs from the run, checked by the recover stage before any unit runs.

    Each upstream output is an *artifact* with a name; the recover stage maps it to the stage that makes it (its
    dependency, for ordering, hashing and refusal) and hands the method a reader through `RecoverEnv.artifact(name)`.
    The flags name the common ones: `teacher` / `bn_teacher` the artifact "teacher", `squeeze_stats`
    "sample-stats"; `artifacts` names any other (e.g. "trajectories").
    """

    teacher: bool = False  # the squeeze stage's teacher, frozen on the worker's device
    bn_teacher: bool = False  # ... and it must have BatchNorm2d layers (BN-statistics matching)
    real_images: bool = False  # the real training images of the unit's classes
    squeeze_stats: bool = False  # per-sample statistics recorded by the squeeze stage
    artifacts: tuple[str, ...] = ()  # further upstream outputs, by name

    def artifact_names(self) -> tuple[str, ...]:
        """Every artifact this method reads, flags included, in a fixed order."""
        names = [*(("teacher",) if self.teacher or self.bn_teacher else ()),
                 *(("sample-stats",) if self.squeeze_stats else ()), *self.artifacts]
        return tuple(dict.fromkeys(names))

    def describe(self) -> str:
        parts = [name.replace("_", " ") for name, on in (("bn_teacher", self.bn_teacher),
                                                           ("teacher", self.teacher and not self.bn_teacher),
                                                           ("real_images", self.real_images),
                                                           ("squeeze_stats", self.squeeze_stats)) if on]
        parts += list(self.artifacts)
        return ", ".join(parts) or "nothing"


@dataclass
class MethodOutput:
    """What a method worker returns for one unit.

    images: float tensors [3, H, W] in [0, 1], one per (class, ipc index) pair, in the order of `classes` /
    `ipc_index`; the stage writes them in this order. metrics: JSON-able figures for the unit record.
    labels (optional): one label vector per image (float [num_classes], e.g. soft labels the method learned), which
    the recover stage stores beside the images (`pipeline.data.synthetic.read_set_labels`). values: JSON-able
    values that belong to the whole set (e.g. a learned learning rate), kept in the unit record's `set_values`.
    """

    images: list[Any] = field(default_factory=list)
    classes: list[int] = field(default_factory=list)
    ipc_index: list[int] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    labels: list[Any] | None = None
    values: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not len(self.images) == len(self.classes) == len(self.ipc_index):
            raise ValueError(f"method output: {len(self.images)} images, {len(self.classes)} classes and "
                             f"{len(self.ipc_index)} ipc indices differ in length")
        if self.labels is not None and len(self.labels) != len(self.images):
            raise ValueError(f"method output: {len(self.labels)} label vectors for {len(self.images)} images")

    def add(self, images: Any, classes: Any, ipc_index: Any, labels: Any = None) -> MethodOutput:
        """Append images (a list, or a tensor [n, 3, H, W]) with their classes and IPC indices (and label vectors:
        all of an output's images have one, or none does); returns self."""
        images, classes, ipc_index = list(images), [int(c) for c in classes], [int(j) for j in ipc_index]
        if not len(images) == len(classes) == len(ipc_index):
            raise ValueError(f"method output: adding {len(images)} images with {len(classes)} classes and "
                             f"{len(ipc_index)} ipc indices")
        if (labels is None) != (self.labels is None) and self.images:
            raise ValueError("method output: every image has a label vector, or none does")
        if labels is not None:
            labels = list(labels)
            if len(labels) != len(images):
                raise ValueError(f"method output: adding {len(labels)} label vectors for {len(images)} images")
            self.labels = [*(self.labels or []), *labels]
        self.images += images
        self.classes += classes
        self.ipc_index += ipc_index
        return self


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
    all_classes: bool = False  # every class in one unit (e.g. trajectory matching): recover.classes_per_shard ignored
    default_init: str = "noise"  # what `recover.init = auto` means for this method
    synthesizes: bool = True  # False for methods that select real images (no image-iterations)
    # How its paper trains the hard-label student (`train.hard_augment = auto`): "dsa" (DSA, DM, DataDAM train
    # it with DSA augmentation) or "none".
    hard_augment: str = "none"
    key: str = ""  # its config section's name when the method's name cannot be one (`import`: `import_set`)
    # A selection whose picks can also start other methods (`recover.init = real-<name>`): "greedy" (prefix-stable
    # greedy selection in the teacher's feature space, `RecoverEnv.selected_rows`) or "ranking" (a per-sample score,
    # `RecoverEnv.ranked_rows`); "" = none.
    selection: str = ""
    # Where it differs from its official code, one phrase each (`distill methods NAME` prints them).
    differences: tuple[str, ...] = ()

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


OpenFn = Callable[[Any, Any], MethodWorker]


def register(name: str, *, description: str, needs: Needs = Needs(), config: type | None = None,
             whole_class: bool = False, all_classes: bool = False, default_init: str = "noise",
             synthesizes: bool = True, hard_augment: str = "none", key: str = "",
             selection: str = "", differences: tuple[str, ...] = ()) -> Callable[[OpenFn], OpenFn]:
    """Decorator on a method's `open(env, cfg)` function: adds the method to the registry under `name`."""

    def wrap(open_fn: OpenFn) -> OpenFn:
        if name in _REGISTRY:
            raise ValueError(f"recover method '{name}' is registered twice")
        if config is not None and not dataclasses.is_dataclass(config):
            raise TypeError(f"recover method '{name}': config must be a dataclass, got {config!r}")
        if selection not in ("", "greedy", "ranking"):
            raise ValueError(f"recover method '{name}': selection must be '', 'greedy' or 'ranking', got {selection!r}")
        _REGISTRY[name] = Method(name=name, description=description, needs=needs, open=open_fn, config_cls=config,
                                 whole_class=whole_class or all_classes, all_classes=all_classes,
                                 default_init=default_init, synthesizes=synthesizes, hard_augment=hard_augment,
                                 key=key, selection=selection, differences=tuple(differences))
        return open_fn

    return wrap


def registry() -> dict[str, Method]:
    """Every registered method, by name (the built-in ones are registered by importing `pipeline.methods`)."""
    return dict(_REGISTRY)


def selections(kind: str = "") -> tuple[str, ...]:
    """The registered selection methods whose picks can start other methods (of one `kind`: greedy or ranking)."""
    return tuple(m.name for m in _REGISTRY.values() if m.selection and (not kind or m.selection == kind))


def init_kinds() -> tuple[str, ...]:
    """What `recover.init` may name besides auto and noise: seeded random real images, the real images the teacher
    classifies correctly (PAD's idea), and the picks of every selection method (`real-<name>`)."""
    return ("real", "real-correct", *(f"real-{name}" for name in selections()))


def init_artifacts(init: str) -> tuple[str, ...]:
    """The artifacts an init reads: the teacher for real-correct, and what its selection method needs."""
    if init == "real-correct":
        return ("teacher",)
    name = init.removeprefix("real-")
    if init.startswith("real-") and name in _REGISTRY and _REGISTRY[name].selection:
        return _REGISTRY[name].needs.artifact_names()
    return ()


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown recover method '{name}'{hint}; `distill methods` lists them")
    return _REGISTRY[name]
