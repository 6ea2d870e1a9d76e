"""evaluate stage (work in progress)."""

from __future__ import annotations

from pipeline.stages.base import Stage


class _S(Stage):
    name = "evaluate"
    depends_on = ("train",)
    sections = ("seed", "eval")


STAGE = _S()
