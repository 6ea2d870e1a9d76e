"""squeeze stage (work in progress)."""

from __future__ import annotations

from pipeline.stages.base import Stage


class _S(Stage):
    name = "squeeze"
    depends_on = ("ingest",)
    sections = ("seed", "squeeze","data")


STAGE = _S()
