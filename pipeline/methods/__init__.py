"""Recover methods, one file each, registered by name (see `base.py` for the protocol), and the compute only they use.

Owns: `base` (the plug-in protocol and registry), `env` (what a worker hands a method: device, teacher, real pool,
seeds), `realpool` (the real training images), `selection` (herding, k-center, rankings), `synthesis/` (SRe2L /
DWA), `matching/` (DM, DataDAM, DC, DSA), and one plug-in module per method. Importing this package registers the
built-in methods. Adding a method = one file here that calls `@register(...)`, one import line below, and one test
file. May import: `pipeline.core`, `augment`, `models`, `data`, `train` (sample statistics); never `config`, `run`
or `commands` (the config builds its `recover` section from this registry).
"""

from pipeline.methods import (  # noqa: F401 - importing a method module registers it
    datadam,
    dc,
    dm,
    dwa,
    forgetting,
    herding,
    import_set,
    kcenter,
    loss_score,
    mtt,
    pad,
    random_real,
    rded,
    sre2l,
)
from pipeline.methods.base import (
    Method,
    MethodOutput,
    MethodWorker,
    Needs,
    get_method,
    init_artifacts,
    init_kinds,
    register,
    registry,
    selections,
)

__all__ = ["Method", "MethodOutput", "MethodWorker", "Needs", "get_method", "init_artifacts", "init_kinds", "register",
           "registry", "selections"]
