"""Ingest throughput (images/s) on the demo digits and on a generated folder of 224-px JPEGs.

Prints figures; asserts nothing. The generated folder (100 classes x --per-class train images + 2 val
each, smooth random content so JPEG sizes are realistic) is cached under /tmp/bench_ingest.

    python benchmarks/bench_ingest.py [--per-class 20] [--classes 100]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.commands.recipes import load_config
from pipeline.run.runner import run_pipeline


def make_folder(root: Path, classes: int, per_class: int, size: int = 224) -> int:
    marker = root / f".done-{classes}-{per_class}"
    n = classes * (per_class + 2)
    if marker.exists():
        return n
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 2)):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                small = rng.integers(0, 255, size=(14, 14, 3), dtype=np.uint8)
                img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
                img.save(d / f"img_{i:04d}.JPEG", quality=90)
    marker.touch()
    return n


def timed(cfg, run_dir: Path) -> float:
    t0 = time.perf_counter()
    run_pipeline(cfg, run_dir, stages=["ingest"], progress=False)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--per-class", type=int, default=20)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = timed(load_config("demo", overrides=["executor.kind=local"]), Path(tmp) / "demo")
        print(f"demo digits (1797 images, 32 px PNG, rendered + encoded): {1797 / t:8.1f} images/s ({t:.2f}s)")
        folder = Path("/tmp/bench_ingest")
        n = make_folder(folder, a.classes, a.per_class)
        cfg = load_config("demo", overrides=[f"data.source={folder}", "data.shard_size=500", "executor.kind=local"])
        t = timed(cfg, Path(tmp) / "jpeg")
        print(f"{a.classes}-class folder of 224-px JPEGs ({n} images, verified + copied): {n / t:8.1f} images/s "
              f"({t:.2f}s, one process)")


if __name__ == "__main__":
    main()
