"""Typed configuration: one dataclass per stage section (`sections`), checked at load (`loading`).

A configuration comes from a named recipe or a YAML file, then `--set section.key=value` overrides (values
parsed as YAML scalars): `pipeline.commands.recipes.load_config` composes them. This module knows no recipe (recipes are
downstream of the config, so there is no import cycle). Unknown sections
or keys and wrongly typed values raise `ConfigError` naming the key, the closest valid
key and the expected type.

May import: `pipeline.core`, and, for the checks, `methods` (the registry: `recover.<method>` sections),
`models` (architecture names) and `augment.dsa` (strategy names); never `run` or `commands`.

Fields whose metadata has `hash=False` are operational (worker counts, loader choice):
changing them does not change what a stage computes, so they are left out of the stage
config hashes and never invalidate finished work.
"""

from pipeline.config.loading import (
    apply_dict,
    apply_overrides,
    config_from_json,
    describe,
    load_yaml,
    parse_override,
    validate,
)
from pipeline.config.sections import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LEGACY_KEYS,
    LEGACY_RECOVER_KEYS,
    SECTIONS,
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    ExecutorConfig,
    RecoverCommon,
    RecoverConfig,
    RelabelConfig,
    SqueezeConfig,
    TrainConfig,
)

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "LEGACY_KEYS", "LEGACY_RECOVER_KEYS", "SECTIONS", "Config", "ConfigError",
    "DataConfig", "EvalConfig", "ExecutorConfig", "RecoverCommon", "RecoverConfig", "RelabelConfig", "SqueezeConfig",
    "TrainConfig", "apply_dict", "apply_overrides", "config_from_json", "describe", "load_yaml", "parse_override",
    "validate",
]
