"""recover stage (work in progress)."""

from __future__ import annotations

from pipeline.stages.base import Stage


class _S(Stage):
    name = "recover"
    depends_on = ("squeeze",)
    sections = ("seed", "recover")


STAGE = _S()
