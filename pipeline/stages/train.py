"""train stage (work in progress)."""

from __future__ import annotations

from pipeline.stages.base import Stage


class _S(Stage):
    name = "train"
    depends_on = ("relabel",)
    sections = ("seed", "train","eval")


STAGE = _S()
