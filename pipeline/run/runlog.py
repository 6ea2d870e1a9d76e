"""The run's own log file (RUN_DIR/logs/driver.log), written whatever logging the caller configured."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

PROJECT_LOGGERS = ("distill", "pipeline", "workers", "manifests")


class _PassOn(logging.Handler):
    """Hands a project record to the root logger's handlers (or Python's last-resort stderr handler): what the
    caller's logging would have shown had the project's loggers not been lowered to INFO for the run's file."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger().handle(record)


def log_to_file(path: Path) -> Callable[[], None]:
    """Copy the driver's log into `path` (RUN_DIR/logs/driver.log) for the duration of a run; returns the undo.

    A caller whose logging passes INFO (the CLI) gets a handler on the root logger: everything it logs. A caller that
    configured none (root at WARNING: a script calling run_pipeline) would get an empty file that way; there the
    project's loggers log INFO to the file and pass on to the caller's handlers only what its level lets through."""
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    if any(isinstance(h, logging.FileHandler) and h.baseFilename == str(path.resolve()) for h in root.handlers):
        return lambda: None
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if root.getEffectiveLevel() <= logging.INFO:
        root.addHandler(handler)
        return lambda: (root.removeHandler(handler), handler.close())
    saved = []
    for name in PROJECT_LOGGERS:
        lg = logging.getLogger(name)
        added = [handler]
        if not any(isinstance(h, _PassOn) for h in lg.handlers):  # a nested run (the baseline's) passes on once
            added.append(_PassOn(root.getEffectiveLevel()))
        saved.append((lg, lg.level, lg.propagate, added))
        if lg.level == logging.NOTSET:
            lg.setLevel(logging.INFO)
        lg.propagate = False
        for h in added:
            lg.addHandler(h)

    def undo() -> None:
        for lg, level, propagate, added in reversed(saved):
            for h in added:
                lg.removeHandler(h)
            lg.setLevel(level)
            lg.propagate = propagate
        handler.close()
    return undo
