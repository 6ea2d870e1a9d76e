"""Typed configuration: one dataclass per stage section, checked at load.

A configuration comes from a named recipe or a YAML file, then `--set section.key=value` overrides (values
parsed as YAML scalars): `pipeline.recipes.load_config` composes them. This module knows no recipe (recipes are
downstream of the config, so there is no import cycle). Unknown sections
or keys and wrongly typed values raise `ConfigError` naming the key, the closest valid
key and the expected type.

Fields whose metadata has `hash=False` are operational (worker counts, loader choice):
changing them does not change what a stage computes, so they are left out of the stage
config hashes and never invalidate finished work.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration or usage error (exit code 2)."""


def _f(default: Any, doc: str) -> Any:
    """A field with its documentation: `distill run --help` and the README list it."""
    return field(default=default, metadata={"doc": doc})


def _op(default: Any, doc: str) -> Any:
    """An operational field: it never changes what a stage computes, so it is not part of any config hash."""
    return field(default=default, metadata={"hash": False, "doc": doc})


def _by_name(default: tuple[float, ...], doc: str) -> Any:
    """A field left out of its own section's hash and hashed, by its dotted name, by the stages that use it.

    Normalization is a property of the data that ingest does not use: changing it must re-run the teacher and
    everything after it, never re-ingest.
    """
    return field(default_factory=lambda: list(default), metadata={"hash": "by-name", "doc": doc})


# torchvision's ImageNet statistics: what torchvision's and SRe2L's ImageNet teachers expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataConfig:
    """Real data and ingest."""

    source: str = _f("demo", "'demo' (the bundled scikit-learn digits) or a folder with train/<class>/* and "
                     "val/<class>/*")
    dataset: str = _f("demo", "name of the data set in results tables")
    resolution: int = _f(32, "side in pixels of the square images every model sees")
    shard_size: int = _f(256, "samples per WebDataset shard")
    max_bad_fraction: float = _f(0.01, "share of unreadable images tolerated before ingest stops (exit 2)")
    val_fraction: float = _f(0.2, "demo data only: share of each class held out as val")
    shuffle_seed: int = _f(0, "order of samples across shards (independent of the run seed)")
    mean: list[float] = _by_name(IMAGENET_MEAN, "per-channel mean every model's input is normalized with (RGB, "
                                 "[0, 1] scale); an imported teacher needs the values it was trained with")
    std: list[float] = _by_name(IMAGENET_STD, "per-channel std of the input normalization (RGB, [0, 1] scale)")
    loader: str = _op("auto", "real-image loader: auto (DALI when importable) | pil | dali")
    num_workers: int = _op(2, "DataLoader worker processes per rank (PIL path) or DALI threads")


@dataclass
class SqueezeConfig:
    """Teacher: train on the real shards, or import weights."""

    arch: str = _f("convnet", "teacher architecture: convnet, convnet-in, lenet, mlp or any torchvision "
                   "classification model name")
    weights: str = _f("", "'' = train the teacher here; else a state_dict file or a torchvision weights name "
                      "(e.g. ResNet18_Weights.IMAGENET1K_V1, from the local cache only)")
    epochs: int = _f(10, "teacher training epochs")
    batch_size: int = _f(64, "global batch (split over the DDP ranks)")
    optimizer: str = _f("sgd", "sgd (momentum 0.9, as the official scripts) | sgd-nesterov | adamw")
    lr: float = _f(0.05, "base learning rate (per-epoch cosine to 0)")
    weight_decay: float = _f(5e-4, "weight decay, on every parameter as the official teacher scripts")
    warmup_epochs: int = _f(0, "linear warm-up epochs from 0.01x before the cosine (official Tiny-ImageNet: 5)")
    amp: bool = _f(True, "bf16 autocast on GPU; ignored on CPU")
    workers: int = _op(0, "DDP workers: 0 = one per GPU (1 without GPUs); CPU workers use gloo")


@dataclass
class RecoverCommon:
    """Synthesis (or selection) of IPC images per class: the settings every method shares."""

    method: str = _f("dwa", "recover method (see `distill methods`)")
    ipc: int = _f(10, "images per class")
    init: str = _f("auto", "initial images: auto (the method's default) | real | noise")
    classes_per_shard: int = _f(0, "classes per unit and per synthesis batch (0 = min(100, classes))")
    ipc_per_unit: int = _f(10, "images per class in one unit of work (methods that make a class's images "
                           "together take all IPC in one unit)")
    amp: str = _f("bf16", "bf16 | none: autocast on GPU (CPU is always fp32)")
    channels_last: bool = _f(True, "channels_last memory format on GPU")


def _recover_config() -> type:
    """`RecoverConfig`: the shared settings plus one nested section per registered method with a config.

    Built from the methods registry, so a new method file adds its `recover.<name>.*` keys, its choice of
    `recover.method` and its documentation without touching this module.
    """
    from pipeline.methods import registry

    extra = []
    for m in registry().values():
        if m.config_cls is not None:
            extra.append((m.config_key, m.config_cls,
                          field(default_factory=m.config_cls, metadata={"method": m.name, "doc": m.description})))
    cls = dataclasses.make_dataclass("RecoverConfig", extra, bases=(RecoverCommon,))
    cls.__module__, cls.__qualname__ = __name__, "RecoverConfig"  # picklable by name (Ray actors)
    cls.__doc__ = RecoverCommon.__doc__
    return cls


RecoverConfig = _recover_config()


@dataclass
class RelabelConfig:
    """Teacher soft labels for the student's views of the synthetic images."""

    mode: str = _f("stored", "stored (parquet of fp16 logits + log-partition per view) | online (the teacher "
                   "runs during training)")
    top_k: int = _f(0, "kept logits per view (+ the log-partition); 0 = all classes: the exact target")
    images_per_unit: int = _f(1000, "synthetic images per relabel unit (stored mode)")
    batch_size: int = _op(256, "teacher batch size while relabelling")


@dataclass
class TrainConfig:
    """Student trained from scratch on the synthetic set."""

    arch: str = _f("convnet", "student architecture (any name `squeeze.arch` accepts)")
    epochs: int = _f(300, "student epochs")
    batch_size: int = _f(128, "global batch (split over the DDP ranks)")
    optimizer: str = _f("adamw", "adamw | sgd (momentum 0.9) | sgd-nesterov")
    lr: float = _f(1e-3, "base learning rate (per-epoch cosine to 0)")
    weight_decay: float = _f(0.01, "weight decay")
    decay_1d: bool = _f(False, "weight decay on 1-D tensors too (official Tiny/CIFAR code); False = SRe2L ImageNet")
    warmup_epochs: int = _f(0, "linear warm-up epochs from 0.01x before the cosine (official Tiny-ImageNet: 5)")
    temperature: float = _f(20.0, "KD temperature T of teacher and student softmax")
    loss_t2: bool = _f(False, "multiply the KD loss by T^2 (official Tiny-ImageNet code)")
    mix: str = _f("cutmix", "cutmix | mixup | none, applied to every view")
    mix_alpha: float = _f(1.0, "lambda ~ Beta(alpha, alpha) of CutMix / Mixup")
    crop_scale_min: float = _f(0.08, "smallest area fraction of the student's random-resized crop")
    amp: bool = _f(True, "bf16 autocast on GPU; ignored on CPU")
    workers: int = _op(0, "DDP workers: 0 = one per GPU (1 without GPUs); CPU workers use gloo")


@dataclass
class EvalConfig:
    """Evaluation of the student on the real val shards."""

    every: int = _f(0, "evaluate every N epochs during training (0 = only at the end)")
    batch_size: int = _op(256, "eval batch size")


@dataclass
class ExecutorConfig:
    """Where and how the units of the distributed stages (ingest, recover, relabel) run. Never hashed."""

    kind: str = _op("auto", "auto (Ray inside a Ray job or when address is set) | local (in this process) | ray")
    address: str = _op("", "'' = start a private local Ray cluster (127.0.0.1); 'auto' or host:port = join one")
    num_cpus: int = _op(0, "CPUs of a private local Ray cluster (0 = all)")
    num_gpus: int = _op(-1, "GPUs of a private local Ray cluster (-1 = detect)")
    num_workers: int = _op(0, "actors; 0 = one per GPU, or CPUs // cpus_per_worker without GPUs")
    cpus_per_worker: int = _op(1, "CPU actors: cores (and torch threads) per actor")
    max_attempts: int = _op(3, "tries per unit before the stage fails")


# Keys of earlier versions, still read from old config.json files, YAML and --set (with a warning).
LEGACY_KEYS: dict[str, str] = {
    "ray.executor": "executor.kind", "ray.address": "executor.address", "ray.num_cpus": "executor.num_cpus",
    "ray.num_gpus": "executor.num_gpus", "recover.num_workers": "executor.num_workers",
    "recover.cpus_per_worker": "executor.cpus_per_worker", "recover.max_attempts": "executor.max_attempts",
}


LEGACY_RECOVER_KEYS: dict[str, str] = {
    **{k: k for k in ("iterations", "lr", "r_bn", "r_var", "first_bn_multiplier", "jitter", "crop", "flip",
                      "crop_scale_min")},
    "dwa_steps": "steps", "dwa_rho": "rho", "dwa_batch_size": "batch_size",
}


@dataclass
class Config:
    """The whole run configuration."""

    seed: int = _f(0, "run seed: every unit is seeded from (seed, stage, unit key)")
    data: DataConfig = field(default_factory=DataConfig)
    squeeze: SqueezeConfig = field(default_factory=SqueezeConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)  # type: ignore[valid-type]
    relabel: RelabelConfig = field(default_factory=RelabelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_for_hash(self, name: str) -> dict[str, Any]:
        """The hashed fields of one section ({'seed': ...} for 'seed'; {key: value} for a dotted 'section.key').

        A section's hash leaves out operational fields (`hash=False`) and fields hashed by name (`by-name`),
        which the stages that use them list as 'section.key'.
        """
        if name == "seed":
            return {"seed": self.seed}
        if "." in name:
            section, key = name.split(".", 1)
            return {key: getattr(getattr(self, section), key)}
        sec = getattr(self, name)
        out = {}
        for f in dataclasses.fields(sec):
            if f.metadata.get("hash", True) is not True:
                continue
            value = getattr(sec, f.name)
            if "method" in f.metadata:  # a method's own section counts only when that method is chosen
                if f.metadata["method"] != sec.method:
                    continue
                value = dataclasses.asdict(value)
            out[f.name] = value
        return out


_HINTS = typing.get_type_hints(Config)
SECTIONS: dict[str, type] = {f.name: _HINTS[f.name] for f in dataclasses.fields(Config) if f.name != "seed"}

_CHOICES: dict[str, tuple[str, ...]] = {
    "data.loader": ("auto", "pil", "dali"),
    "squeeze.optimizer": ("sgd", "sgd-nesterov", "adamw"),
    "train.optimizer": ("adamw", "sgd", "sgd-nesterov"),
    "recover.init": ("auto", "real", "noise"),
    "recover.amp": ("bf16", "none"),
    "relabel.mode": ("stored", "online"),
    "train.mix": ("cutmix", "mixup", "none"),
    "executor.kind": ("auto", "local", "ray"),
}
_POSITIVE = (
    "data.resolution", "data.shard_size", "squeeze.epochs", "squeeze.batch_size", "recover.ipc",
    "recover.ipc_per_unit",
    "executor.max_attempts", "executor.cpus_per_worker", "relabel.images_per_unit", "relabel.batch_size",
    "train.epochs", "train.batch_size", "eval.batch_size",
    "squeeze.lr", "train.lr", "train.temperature", "train.mix_alpha",
)
# Counts where 0 has a meaning ("auto", "all", "never") but a negative value has none.
_NON_NEGATIVE = (
    "squeeze.weight_decay", "train.weight_decay", "recover.classes_per_shard", "relabel.top_k", "eval.every",
    "data.num_workers", "squeeze.workers", "train.workers", "executor.num_workers", "executor.num_cpus",
)


def _check_finite(prefix: str, sec: Any) -> None:
    """No NaN or infinity in any float of a section (nested method sections included)."""
    for f in dataclasses.fields(sec):
        value = getattr(sec, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(f"{prefix}.{f.name}", value)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key '{prefix}.{f.name}' must be a finite number, got {value}")


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.4)
    return f" (did you mean '{match[0]}'?)" if match else f" (valid: {', '.join(sorted(options))})"


def _coerce(key: str, value: Any, expected: Any) -> Any:
    """Check `value` against the annotated type; ints are accepted for floats."""
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(expected):
            try:
                return _coerce(key, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': expected {expected}, got {value!r} ({type(value).__name__})")
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r} ({type(value).__name__})")
        (item,) = typing.get_args(expected)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if expected is type(None) and value is None:
        return None
    if isinstance(expected, type) and isinstance(value, expected) and not (
        expected is int and isinstance(value, bool)
    ):
        return value
    tname = getattr(expected, "__name__", str(expected))
    raise ConfigError(
        f"config key '{key}': expected {tname}, got {value!r} ({type(value).__name__})"
    )


def _apply_section(section_obj: Any, section: str, values: dict[str, Any]) -> None:
    """Set `values` on a section; a nested section (a method's `recover.<name>`) takes a mapping or dotted keys."""
    hints = typing.get_type_hints(type(section_obj))
    names = [f.name for f in dataclasses.fields(section_obj)]
    for key, value in values.items():
        head, _, rest = key.partition(".")
        if head not in names:
            raise ConfigError(f"unknown config key '{section}.{key}'{_closest(head, names)}")
        nested = getattr(section_obj, head)
        if dataclasses.is_dataclass(nested):
            if rest:
                value = {rest: value}
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{section}.{head}' is a section: set its keys "
                                  f"('{section}.{head}.<key>=...') or give a mapping, not {value!r}")
            _apply_section(nested, f"{section}.{head}", value)
        elif rest:
            raise ConfigError(f"config key '{section}.{head}' has no sub-keys (got '{section}.{key}')")
        else:
            setattr(section_obj, key, _coerce(f"{section}.{key}", value, hints[key]))


def _upgrade_legacy(data: dict[str, Any], source: str) -> dict[str, Any]:
    """A copy of `data` with the keys of earlier versions (`LEGACY_KEYS`) moved to their new place."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    rec = out.get("recover")
    if isinstance(rec, dict):  # flat SRe2L / DWA keys of earlier versions -> recover.<method>.<key>
        for old, new in LEGACY_RECOVER_KEYS.items():
            if old in rec:
                value = rec.pop(old)
                for method in (("dwa",) if old.startswith("dwa_") else ("sre2l", "dwa")):
                    sub = rec.setdefault(method, {})
                    if isinstance(sub, dict):
                        sub.setdefault(new, value)
                log.warning("%s: config key 'recover.%s' is now 'recover.<method>.%s'", source, old, new)
    for old, new in LEGACY_KEYS.items():
        osec, okey = old.split(".")
        nsec, nkey = new.split(".")
        if isinstance(out.get(osec), dict) and okey in out[osec]:
            value = out[osec].pop(okey)
            if not out[osec] and osec not in SECTIONS:
                del out[osec]
            out.setdefault(nsec, {})
            if isinstance(out[nsec], dict):
                out[nsec].setdefault(nkey, value)
            log.warning("%s: config key '%s' is now '%s'", source, old, new)
    return out


def apply_dict(cfg: Config, data: dict[str, Any], source: str = "config") -> Config:
    """Overlay a nested dict (from YAML or JSON) onto `cfg` in place."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    data = _upgrade_legacy(data, source)
    valid = ["seed", *SECTIONS]
    for name, values in data.items():
        if name in ("run_id", "schema_version"):
            continue
        if name not in valid:
            raise ConfigError(f"{source}: unknown config section '{name}'{_closest(name, valid)}")
        if name == "seed":
            cfg.seed = _coerce("seed", values, int)
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{name}' must be a mapping, got {values!r}")
        _apply_section(getattr(cfg, name), name, values)
    return cfg


def parse_override(text: str) -> tuple[str, str | None, Any]:
    """'section.key=value' -> (section, key, value parsed as a YAML scalar)."""
    if "=" not in text:
        raise ConfigError(f"--set expects section.key=value, got '{text}'")
    lhs, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {lhs}: cannot parse value '{raw}': {exc}") from None
    if lhs == "seed":
        return "seed", None, value
    if "." not in lhs:
        raise ConfigError(f"--set expects section.key=value, got '{text}'")
    section, key = lhs.split(".", 1)
    return section, key, value


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    for text in overrides:
        section, key, value = parse_override(text)
        data = {"seed": value} if key is None else {section: {key: value}}
        apply_dict(cfg, data, source=f"--set {text}")
    return cfg


def _validate_method(cfg: Config) -> None:
    """`recover.method` is registered; the chosen method's own section passes its checks."""
    from pipeline.methods import registry

    methods = registry()
    name = cfg.recover.method
    if name not in methods:
        raise ConfigError(f"config key 'recover.method': unknown method '{name}'{_closest(name, list(methods))}; "
                          "`distill methods` lists them")
    method = methods[name]
    section = getattr(cfg.recover, method.config_key, None) if method.config_cls else None
    if section is not None and hasattr(section, "validate"):
        try:
            section.validate()
        except ValueError as exc:
            raise ConfigError(f"config section 'recover.{method.config_key}': {exc}") from None


def validate(cfg: Config) -> Config:
    """Value checks that types alone cannot express."""
    for dotted, choices in _CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise ConfigError(f"config key '{dotted}': '{value}' is not one of {', '.join(choices)}")
    for name in SECTIONS:
        _check_finite(name, getattr(cfg, name))
    for dotted in _POSITIVE:
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value <= 0:
            raise ConfigError(f"config key '{dotted}' must be > 0, got {value}")
    for dotted in _NON_NEGATIVE:
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value < 0:
            raise ConfigError(f"config key '{dotted}' must be >= 0, got {value}")
    if not 0.0 <= cfg.data.max_bad_fraction <= 1.0:
        raise ConfigError(f"config key 'data.max_bad_fraction' must be in [0, 1], got {cfg.data.max_bad_fraction}")
    for key in ("mean", "std"):
        values = getattr(cfg.data, key)
        if len(values) != 3 or not all(math.isfinite(v) for v in values):
            raise ConfigError(f"config key 'data.{key}' must be 3 finite numbers (R, G, B), got {values}")
    if not all(v > 0 for v in cfg.data.std):
        raise ConfigError(f"config key 'data.std' must be > 0 in every channel, got {cfg.data.std}")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError(f"config key 'data.val_fraction' must be in (0, 1), got {cfg.data.val_fraction}")
    if not 0.0 < cfg.train.crop_scale_min <= 1.0:
        raise ConfigError(f"config key 'train.crop_scale_min' must be in (0, 1], got {cfg.train.crop_scale_min}")
    _validate_method(cfg)
    for sec in ("squeeze", "train"):
        sc = getattr(cfg, sec)
        if not 0 <= sc.warmup_epochs < sc.epochs:
            raise ConfigError(f"config key '{sec}.warmup_epochs' must be in [0, {sec}.epochs) = [0, {sc.epochs}), "
                              f"got {sc.warmup_epochs}")
        bs, workers = getattr(cfg, sec).batch_size, getattr(cfg, sec).workers
        if workers < 0:
            raise ConfigError(f"config key '{sec}.workers' must be >= 0 (0 = one per GPU), got {workers}")
        if workers and bs % workers:
            raise ConfigError(f"config key '{sec}.batch_size' ({bs}) must be a multiple of '{sec}.workers' ({workers}): "
                              "it is the global batch, split evenly over the DDP ranks")
    from pipeline.models import check_arch  # local import: models pulls in torch

    for dotted in ("squeeze.arch", "train.arch"):
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        try:
            check_arch(value)
        except ValueError as exc:
            raise ConfigError(f"config key '{dotted}': {exc}") from None
    return cfg


def config_from_json(path: Path) -> Config:
    """Read a resolved config.json written by a run."""
    data = json.loads(Path(path).read_text())
    return validate(apply_dict(Config(), data, source=str(path)))


def describe() -> str:
    """Every key with its type, default and documentation, for --help and the README."""
    lines = ["seed: int = 0  # run seed: every unit is seeded from (seed, stage, unit key)"]
    cfg = Config()

    def walk(prefix: str, sec: Any) -> None:
        hints = typing.get_type_hints(type(sec))
        for f in dataclasses.fields(sec):
            value = getattr(sec, f.name)
            doc = f.metadata.get("doc", "")
            if dataclasses.is_dataclass(value):
                lines.append(f"{prefix}.{f.name}: section  # {doc}" if doc else f"{prefix}.{f.name}: section")
                walk(f"{prefix}.{f.name}", value)
                continue
            tname = getattr(hints[f.name], "__name__", str(hints[f.name]))
            lines.append(f"{prefix}.{f.name}: {tname} = {value!r}" + (f"  # {doc}" if doc else ""))

    for name in SECTIONS:
        walk(name, getattr(cfg, name))
    return "\n".join(lines)
