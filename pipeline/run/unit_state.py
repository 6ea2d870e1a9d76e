"""Checkpoints inside one recover unit, so a killed long unit resumes where it stopped instead of from scratch.

A matching unit (DM, DataDAM, DC, DSA) holds every class of its shard and every IPC image, and runs for hours at
the published schedules (DC's IPC 10 unit on the digits took 2 h on one CPU core with 1 % of the official
iterations). The loops in `pipeline.methods.matching` save their whole state at iteration boundaries through a
`LoopCheckpoint` (the protocol of `pipeline.methods.matching.common`: the images, the optimizer's momentum, the unit
generator's state, the loss history), and on the next run restore it, so the resumed unit gives the same bytes as
one that never stopped.

`UnitCheckpoint` is the file behind it: `<run>/checkpoints/recover-units/<unit key>.pt`, written whole through
a temporary file and a rename (a kill mid-write leaves the previous one), saved at the first iteration boundary
once `every_s` seconds have passed since the last save (`recover.checkpoint_every_s`; 0 = after every
iteration, negative = never), tagged with the recover stage's config hash and the unit key: a file from
another configuration is ignored, with a warning, and overwritten. The recover stage deletes it once the unit's
outputs are written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class UnitCheckpoint:
    """One unit's checkpoint file, a `LoopCheckpoint` (see the module docstring). `resumed_at` is the iteration the
    last `load` resumed from (0 = started afresh) and `prior_seconds` the compute time the unit had spent before it,
    so the unit record's seconds and rates cover the whole unit."""

    def __init__(self, path: Path, tag: str, every_s: float, label: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path, self.tag, self.every_s, self.label = Path(path), tag, float(every_s), label or Path(path).stem
        self.clock = clock
        self.started = self.last = clock()
        self.resumed_at, self.prior_seconds, self.saves = 0, 0.0, 0

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - an unreadable file means starting afresh, never a failed unit
            log.warning("recover %s: unreadable unit checkpoint %s (%s); starting the unit afresh", self.label,
                        self.path, exc)
            return None
        if not isinstance(state, dict) or state.get("tag") != self.tag:
            log.warning("recover %s: unit checkpoint %s was made under another configuration; starting the unit "
                        "afresh", self.label, self.path)
            return None
        self.resumed_at, self.prior_seconds = int(state["it"]), float(state.get("seconds", 0.0))
        log.info("recover %s: resuming at iteration %d of %d from %s", self.label, self.resumed_at,
                 int(state.get("iterations", 0)), self.path)
        return state

    def due(self) -> bool:
        return self.every_s >= 0 and self.clock() - self.last >= self.every_s

    def save(self, state: dict[str, Any]) -> None:
        from manifests.store import atomic_path

        now = self.clock()
        state = {**state, "tag": self.tag, "seconds": self.prior_seconds + (now - self.started)}
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)
        self.last, self.saves = now, self.saves + 1
        log.info("recover %s: iteration %d of %d, loss %.4g (unit checkpoint saved)", self.label, int(state["it"]),
                 int(state.get("iterations", 0)), float(state.get("loss", float("nan"))))

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
