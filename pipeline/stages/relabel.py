"""relabel stage (work in progress)."""

from __future__ import annotations

from pipeline.stages.base import Stage


class _S(Stage):
    name = "relabel"
    depends_on = ("recover",)
    sections = ("seed", "relabel","train")


STAGE = _S()
