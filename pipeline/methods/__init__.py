"""Recover methods, one file each, registered by name (see `base.py` for the protocol).

Importing this package registers the built-in methods. Adding a method = one file here that calls
`@register(...)`, one import line below, and one test file.
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
    random_real,
    sre2l,
)
from pipeline.methods.base import Method, MethodOutput, MethodWorker, Needs, get_method, register, registry

__all__ = ["Method", "MethodOutput", "MethodWorker", "Needs", "get_method", "register", "registry"]
