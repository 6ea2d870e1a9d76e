"""Loading and checking a configuration: mappings and `--set` overrides applied with type checks, legacy keys
mapped, values range-checked, and `describe()` for --help. Unknown sections or keys and wrongly typed values
raise `ConfigError` naming the key, the closest valid key and the expected type."""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from pipeline.config.sections import (
    LEGACY_KEYS,
    LEGACY_RECOVER_KEYS,
    SECTIONS,
    Config,
    ConfigError,
)

log = logging.getLogger(__name__)

_CHOICES: dict[str, tuple[str, ...]] = {
    "data.loader": ("auto", "pil", "dali"),
    "squeeze.optimizer": ("sgd", "sgd-nesterov", "adamw"),
    "train.optimizer": ("adamw", "sgd", "sgd-nesterov"),
    "recover.amp": ("bf16", "none"),
    "recover.compile": ("auto", "on", "off"),
    "relabel.mode": ("stored", "online"),
    "train.mix": ("cutmix", "mixup", "none"),
    "train.protocol": ("kd", "hard", "own"),
    "experts.schedule": ("auto", "none", "pad"),
    "experts.difficulty": ("el2n", "teacher-loss"),
    "train.views_on_device": ("auto", "on", "off"),
    "train.hard_augment": ("auto", "dsa", "none"),
    "executor.kind": ("auto", "local", "ray"),
    "eval.select": ("final", "best-holdout"),
}
_LIST_CHOICES: dict[str, tuple[str, ...]] = {
    "eval.protocols": ("kd", "hard", "own"),
    "eval.baselines": ("random-real", "full-real"),
}
_POSITIVE = (
    "data.resolution", "data.shard_size", "squeeze.epochs", "squeeze.batch_size", "recover.ipc",
    "recover.ipc_per_unit",
    "executor.max_attempts", "executor.cpus_per_worker", "relabel.images_per_unit", "relabel.batch_size",
    "train.epochs", "train.batch_size", "eval.batch_size", "eval.seeds", "eval.gpus_per_student",
    "squeeze.lr", "squeeze.stats_window", "train.lr", "train.temperature", "train.mix_alpha", "train.hard_batch_size", "train.hard_lr",
    "train.own_batch_size",
    "experts.num", "experts.epochs", "experts.lr", "experts.batch_size", "experts.cache", "experts.el2n_networks",
    "experts.el2n_epoch",
)
# Counts where 0 has a meaning ("auto", "all", "never") but a negative value has none.
_NON_NEGATIVE = (
    "squeeze.weight_decay", "train.weight_decay", "train.hard_weight_decay", "train.hard_epochs",
    "recover.classes_per_shard", "recover.batches_per_forward", "relabel.top_k", "eval.every", "eval.full_real_epochs",
    "experts.momentum", "experts.weight_decay", "data.num_workers", "squeeze.workers", "train.workers", "executor.num_workers", "executor.num_cpus",
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
    if expected is float and isinstance(value, str):
        # PyYAML (YAML 1.1) reads `1e-3` as a string (it wants `1.0e-3`): accept what Python reads as a float.
        try:
            return float(value.strip())
        except ValueError:
            pass
    if expected is str and isinstance(value, bool) and key in _CHOICES and "on" in _CHOICES[key]:
        return "on" if value else "off"  # YAML 1.1 reads on / off as booleans
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


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """YAML as `yaml.safe_load` reads it, except that a duplicate key in a mapping is a `yaml.YAMLError` naming the
    key and its line."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


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
    # The chosen method's section (and that of the selection named by recover.init) passes its own checks.
    # Per-sample statistics exist only for a teacher trained here with squeeze.sample_stats on.
    init = cfg.recover.init.removeprefix("real-")
    for user in [name] + ([init] if init in methods and init != name else []):
        m = methods[user]
        sec = getattr(cfg.recover, m.config_key, None) if m.config_cls else None
        if sec is not None and hasattr(sec, "validate"):
            try:
                sec.validate()
            except ValueError as exc:
                raise ConfigError(f"config section 'recover.{m.config_key}': {exc}") from None
        if sec is not None and hasattr(sec, "validate_run"):  # checks against the rest of the run (e.g. experts)
            try:
                sec.validate_run(cfg)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        needs = sec.needs_squeeze_stats() if hasattr(sec, "needs_squeeze_stats") else m.needs.squeeze_stats
        what = f"recover.method={name}" if user == name else f"recover.init={cfg.recover.init}"
        if needs and cfg.squeeze.weights:
            extra = " or set recover.loss_score.source=final" if user == "loss-score" else ""
            raise ConfigError(f"{what} ranks images by statistics recorded while the squeeze stage trains the "
                              f"teacher, and this run imports its teacher (squeeze.weights={cfg.squeeze.weights}), "
                              f"which has none: train the teacher here (squeeze.weights=''){extra}")
        if needs and not cfg.squeeze.sample_stats:
            raise ConfigError(f"{what} needs the per-sample statistics of the teacher's training: set "
                              "squeeze.sample_stats=true")


def _choices() -> dict[str, tuple[str, ...]]:
    """`_CHOICES`, with those the registries decide: `recover.init` (auto, noise and `init_kinds()`)."""
    from pipeline.methods import init_kinds

    return {**_CHOICES, "recover.init": ("auto", "noise", *init_kinds())}


def validate(cfg: Config) -> Config:
    """Value checks that types alone cannot express."""
    for dotted, choices in _choices().items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise ConfigError(f"config key '{dotted}': '{value}' is not one of {', '.join(choices)}")
    for dotted, choices in _LIST_CHOICES.items():
        section, key = dotted.split(".")
        values = getattr(getattr(cfg, section), key)
        bad = [v for v in values if v not in choices]
        if bad or len(set(values)) != len(values):
            raise ConfigError(f"config key '{dotted}': {values} must be distinct values of {', '.join(choices)}")
    if not 0.0 <= cfg.eval.holdout_fraction < 0.5:
        raise ConfigError(f"config key 'eval.holdout_fraction' must be in [0, 0.5), got {cfg.eval.holdout_fraction}")
    if cfg.eval.select == "best-holdout" and not (cfg.eval.every and cfg.eval.holdout_fraction):
        raise ConfigError("config key 'eval.select=best-holdout' needs eval.every > 0 (how often the holdout slice "
                          "is scored) and eval.holdout_fraction > 0")
    if len(set(cfg.eval.students)) != len(cfg.eval.students):
        raise ConfigError(f"config key 'eval.students': {cfg.eval.students} names a student twice")
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
    from pipeline.data.sources import FORMATS

    if cfg.data.format not in FORMATS:
        raise ConfigError(f"config key 'data.format' must be one of {', '.join(FORMATS)}, got {cfg.data.format!r}")
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
    from pipeline.augment.dsa import parse_strategy
    from pipeline.models import check_arch  # local import: models pulls in torch

    for dotted, strategy in (("train.hard_dsa_strategy", cfg.train.hard_dsa_strategy),
                             ("experts.dsa_strategy", cfg.experts.dsa_strategy)):
        if strategy == "auto" and dotted.startswith("train."):
            continue
        try:
            parse_strategy(strategy)
        except ValueError as exc:
            raise ConfigError(f"config key '{dotted}': {exc}") from None
    _check_experts(cfg)
    archs = [(d, getattr(getattr(cfg, d.split(".")[0]), d.split(".")[1]))
             for d in ("squeeze.arch", "train.arch", "train.hard_arch", "experts.arch")]
    archs += [(f"eval.students[{i}]", v) for i, v in enumerate(cfg.eval.students)]
    for dotted, value in archs:
        try:
            check_arch(value)
        except ValueError as exc:
            raise ConfigError(f"config key '{dotted}': {exc}") from None
    _check_resolution(cfg, dict.fromkeys(value for _, value in archs))
    return cfg


def _check_experts(cfg: Config) -> None:
    """`experts.schedule=auto` resolved (pad for recover.method=pad, else none: the value is what is hashed and
    saved); the pad schedule's shares and epochs make sense."""
    e = cfg.experts
    if e.schedule == "auto":
        e.schedule = "pad" if cfg.recover.method == "pad" else "none"
    from pipeline.methods import get_method

    if e.schedule == "pad" and e.difficulty == "teacher-loss" and \
            "trajectories" in get_method(cfg.recover.method).needs.artifact_names():
        why = (f"this run imports its teacher (squeeze.weights={cfg.squeeze.weights})" if cfg.squeeze.weights else
               "squeeze.sample_stats is off" if not cfg.squeeze.sample_stats else "")
        if why:
            raise ConfigError(f"config key 'experts.difficulty=teacher-loss' orders the experts' data by the per-sample "
                              f"losses recorded while the squeeze stage trains the teacher, and {why}: train the "
                              "teacher here with squeeze.sample_stats=true, or set experts.difficulty=el2n")
    if not 0.0 < e.pad_init_ratio <= 1.0:
        raise ConfigError(f"config key 'experts.pad_init_ratio' must be in (0, 1], got {e.pad_init_ratio}")
    if e.pad_add_end_epoch < 0:
        raise ConfigError(f"config key 'experts.pad_add_end_epoch' must be >= 0, got {e.pad_add_end_epoch}")
    if len(e.pad_remove_epochs) != 2 or len(e.pad_remove_ratios) != 2:
        raise ConfigError("config keys 'experts.pad_remove_epochs' and 'experts.pad_remove_ratios' take two values "
                          f"each, got {e.pad_remove_epochs} and {e.pad_remove_ratios}")
    if not 0 <= e.pad_remove_epochs[0] <= e.pad_remove_epochs[1]:
        raise ConfigError(f"config key 'experts.pad_remove_epochs' must be two epochs in order, got "
                          f"{e.pad_remove_epochs}")
    if not all(0.0 <= r < 1.0 for r in e.pad_remove_ratios):
        raise ConfigError(f"config key 'experts.pad_remove_ratios' must be shares in [0, 1), got {e.pad_remove_ratios}")


def _check_resolution(cfg: Config, archs: dict[str, None]) -> None:
    """Every architecture of the run must be buildable at `data.resolution` (a ConvNet of depth 3 needs 8 px,
    LeNet 16, some torchvision models more): built on the meta device (shapes only, no memory), so a bad
    resolution stops the load instead of the squeeze stage."""
    import torch

    from pipeline.models import build_model

    for arch in archs:
        try:
            with torch.device("meta"):
                build_model(arch, 2, cfg.data.resolution)
        except (ValueError, RuntimeError) as exc:
            raise ConfigError(f"config key 'data.resolution' ({cfg.data.resolution}) does not suit the "
                              f"architecture '{arch}': {exc}") from None


def config_from_json(path: Path) -> Config:
    """Read a resolved config.json written by a run."""
    data = json.loads(Path(path).read_text())
    return validate(apply_dict(Config(), data, source=str(path)))


def describe() -> str:
    """Every key with its type, default and documentation, for --help and docs/configuration.md."""
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
