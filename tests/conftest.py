"""Shared fixtures: tiny generated image folders and a demo run directory."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def make_image_folder(root: Path, classes: int = 3, per_class: int = 6, size: int = 40, val_per_class: int = 2,
                      corrupt: int = 0, non_image: int = 0, seed: int = 0) -> Path:
    """ImageNet layout with coloured JPEGs (class = dominant colour), optional corrupt and non-image files."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
                arr[..., c % 3] += 150
                Image.fromarray(arr).save(d / f"img_{i:03d}.JPEG", format="JPEG", quality=90)
    train0 = root / "train" / "n00000000"
    for i in range(corrupt):
        good = (train0 / "img_000.JPEG").read_bytes()
        (train0 / f"bad_{i}.JPEG").write_bytes(good[: len(good) // 3])  # truncated JPEG
    for i in range(non_image):
        (train0 / f"notes_{i}.txt").write_text("not an image")
    return root


def jpeg_bytes(size: int = 32, colour: int = 0) -> bytes:
    arr = np.zeros((size, size, 3), dtype=np.uint8)
    arr[..., colour] = 200
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data", corrupt=1, non_image=2)


# Small settings for stage tests: every stage runs in seconds on 2 cores.
FAST = [
    "squeeze.epochs=1", "recover.dwa.iterations=4", "recover.sre2l.iterations=4", "recover.ipc=2", "recover.ipc_per_unit=1",
    "recover.classes_per_shard=5", "train.epochs=2", "train.batch_size=8", "relabel.images_per_unit=10",
    "data.num_workers=0", "executor.kind=local",
]


def fast_config(*extra: str):
    from pipeline.recipes import load_config

    return load_config("demo", overrides=[*FAST, *extra])


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory) -> Path:
    """A demo run directory with ingest and squeeze done under FAST (do not modify: clone it)."""
    from pipeline.runner import run_pipeline

    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    run_pipeline(fast_config(), run_dir, stages=["ingest", "squeeze"], progress=False)
    return run_dir


def clone_run(src: Path, dst: Path) -> Path:
    """Copy a run directory (cheap: the demo is small)."""
    import shutil

    shutil.copytree(src, dst)
    return dst
