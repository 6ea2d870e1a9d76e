"""Shared fixtures: tiny generated image folders and a demo run directory (helpers: tests/helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import fast_config, make_image_folder

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data", corrupt=1, non_image=2)


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory) -> Path:
    """A demo run directory with ingest and squeeze done under FAST (do not modify: clone it)."""
    from pipeline.run.runner import run_pipeline

    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    run_pipeline(fast_config(), run_dir, stages=["ingest", "squeeze"], progress=False)
    return run_dir
