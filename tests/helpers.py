"""Helpers shared by the tests (a plain module: import it; fixtures live in conftest.py)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from pipeline.config import Config


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


# Small settings for stage tests: every stage runs in seconds on 2 cores.
FAST = [
    "squeeze.epochs=1", "recover.dwa.iterations=4", "recover.sre2l.iterations=4", "recover.ipc=2", "recover.ipc_per_unit=1",
    "recover.classes_per_shard=5", "train.epochs=2", "train.batch_size=8", "relabel.images_per_unit=10",
    "data.num_workers=0", "executor.kind=local", "eval.baselines=[]", "eval.protocols=[]",
]


def fast_config(*extra: str) -> Config:
    """The demo recipe under FAST, then `extra` overrides."""
    from pipeline.commands.recipes import load_config

    return load_config("demo", overrides=[*FAST, *extra])


def clone_run(src: Path, dst: Path) -> Path:
    """Copy a run directory (cheap: the demo is small)."""
    shutil.copytree(src, dst)
    return dst


def sigkill_when(cmd: list[str], cwd: Path, done: Callable[[], bool], log_path: Path | None = None,
                 timeout: float = 180.0) -> None:
    """Start the driver `cmd`, SIGKILL it as soon as `done()` holds (checked every 20 ms), and reap it.

    Fails when the driver exits first or `done()` does not hold within `timeout` seconds (the driver's output
    is in `log_path`, when given, for the message)."""
    import signal
    import subprocess
    import time

    out = open(log_path, "wb") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115 - closed below
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + timeout
            while not done():
                said = log_path.read_text(errors="replace")[-3000:] if log_path is not None else ""
                assert proc.poll() is None, f"the driver exited ({proc.returncode}) early:\n{said}"
                assert time.monotonic() < deadline, f"the moment to kill did not come in {timeout:.0f} s:\n{said}"
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if log_path is not None:
            out.close()
