"""The error every layer raises for bad input: the CLI turns it into one line and exit code 2."""


class ConfigError(ValueError):
    """A configuration or usage error (exit code 2): a bad key or value, a missing or damaged input file, a run
    directory that cannot be used. The message names the file, key or class and what to do."""


class RunDirInUse(ConfigError):
    """The run directory is locked by another live driver (exit code 2 like any ConfigError). Callers that share a
    run directory on purpose (the random-real baseline, the sanity table's teachers) pass `run_pipeline` an
    `on_busy` and wait for the lock instead."""
