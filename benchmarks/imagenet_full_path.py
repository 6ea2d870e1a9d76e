"""The full-size ImageNet-1K path on a CPU: every stage of an ImageNet recipe on a generated 1000-class folder of
224-px-and-up JPEGs, with an imported ResNet-18 state_dict, IPC 1 and one iteration; each stage's wall time and
peak memory.

    python benchmarks/imagenet_full_path.py --work runs/in1k-path                      # dwa, 2 train + 1 val / class
    python benchmarks/imagenet_full_path.py --work runs/in1k-path --method rded --format parquet
    python benchmarks/imagenet_full_path.py --work runs/in1k-path --format webdataset --stages ingest

The folder (`<work>/data-<format>`) holds `--train`/`--val` JPEGs per class of `--height` x `--width` noise (ImageNet's
typical 375 x 500 by default), in the layout `--format` names (imagefolder, ilsvrc, webdataset, parquet: the same
images, see tests/test_sources.py), made once. The teacher is torchvision's ResNet-18 with seeded random weights
saved as a state_dict file (`squeeze.weights`: the import path; no download), so what is measured is the pipeline,
not accuracy. Each stage runs as its own `distill run --stages S` process; its peak resident memory is the
`ru_maxrss` of that process tree (os.wait4), its wall time the process's. The schedule is cut to the minimum that
runs every stage: IPC 1 in units of 100 classes, one recover iteration, a 1-epoch student under kd, random-real
only (the recipe's other settings, including DWA's 15 ascent steps on a real subset per unit, stay). A markdown
table goes to stdout and `<work>/<method>-<format>.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHORT = ("recover.ipc=1", "recover.ipc_per_unit=1", "recover.dwa.iterations=1", "recover.sre2l.iterations=1",
         "train.epochs=1", "eval.every=1", "eval.protocols=[kd]", "eval.baselines=[random-real]",
         "executor.kind=local", "data.num_workers=2", "relabel.mode=online")


def make_folder(root: Path, classes: int, train: int, val: int, height: int, width: int) -> Path:
    """train/<synset>/*.JPEG and val/<synset>/*.JPEG of smooth noise (JPEG quality 90), made once."""
    import numpy as np
    from PIL import Image

    done = root / ".complete"
    if done.exists():
        return root
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"n{1440764 + 7919 * c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                small = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
                img = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
                img.save(folder / f"{folder.name}_{i}.JPEG", format="JPEG", quality=90)
    done.touch()
    return root


def convert(folder: Path, fmt: str, out: Path) -> Path:
    """The folder in another layout (the test-suite's makers, which keep the JPEG bytes)."""
    if fmt == "imagefolder":
        return folder
    if (out / ".complete").exists():
        return out
    import tests.test_sources as ts

    ts.CLASSES = sorted(p.name for p in (folder / "train").iterdir())
    ts.NAMES = [f"class {i}" for i in range(len(ts.CLASSES))]
    maker = {"ilsvrc": ts.make_ilsvrc, "webdataset": ts.make_wds, "parquet": ts.make_parquet}[fmt]
    maker(folder, out)
    (out / ".complete").touch()
    return out


def teacher_file(work: Path, classes: int) -> Path:
    import torch
    import torchvision

    path = work / f"resnet18-random-{classes}.pt"
    if not path.exists():
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18(num_classes=classes).state_dict(), path)
    return path


# Linux keeps a process's peak RSS across exec, so a child forked from this (torch-sized) process would report this
# process's memory: a small interpreter forks the stage instead and reports its wait4 figures on its last line.
MEASURE = """import json, os, subprocess, sys, time
t0 = time.time()
proc = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(proc.pid, 0)
print(json.dumps([os.waitstatus_to_exitcode(status), time.time() - t0, usage.ru_maxrss / 1024]))"""


def run_stage(argv: list[str], log: Path) -> tuple[int, float, float]:
    """(exit code, wall s, peak RSS in MiB of the process tree) of one `distill run`."""
    with log.open("a") as fh:
        out = subprocess.run([sys.executable, "-c", MEASURE, *argv], stdout=subprocess.PIPE, stderr=fh, text=True)
    rc, wall, rss = json.loads(out.stdout.strip().splitlines()[-1])
    return int(rc), float(wall), float(rss)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/in1k-path")
    p.add_argument("--method", default="dwa", help="recover method of the imagenet1k-rn18-ipc10-<method> recipe")
    p.add_argument("--format", default="imagefolder", choices=("imagefolder", "ilsvrc", "webdataset", "parquet"))
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--train", type=int, default=2, help="train images per class")
    p.add_argument("--val", type=int, default=1, help="val images per class")
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--stages", default="", help="comma-separated stages to run (default: all), e.g. ingest")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = p.parse_args(argv)
    import pipeline.run.stages  # noqa: F401 - registers the built-in stages
    from pipeline.run.graph import stage_order

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    folder = make_folder(work / "data-imagefolder", args.classes, args.train, args.val, args.height, args.width)
    data = convert(folder, args.format, work / f"data-{args.format}")
    made = time.time() - t0
    run_dir = work / f"run-{args.method}-{args.format}"
    recipe = f"imagenet1k-rn18-ipc10-{args.method}"
    base = [sys.executable, "-m", "workers.cli", "run", "--recipe", recipe, "--data-dir", str(data),
            "--run-dir", str(run_dir), "--no-progress"]
    for item in (*SHORT, f"squeeze.weights={teacher_file(work, args.classes)}", *args.extra):
        base += ["--set", item]
    rows = []
    for stage in args.stages.split(",") if args.stages else stage_order():
        rc, wall, rss = run_stage([*base, "--stages", stage], work / f"{args.method}-{args.format}.log")
        rows.append((stage, rc, wall, rss))
        print(f"{stage}: exit {rc}, {wall:.1f} s, peak {rss:.0f} MiB", flush=True)
        if rc:
            break
    summary_path = run_dir / "results" / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    lines = [f"ImageNet-shaped full path: recipe {recipe}, --format {args.format}, {args.classes} classes x "
             f"({args.train} train + {args.val} val) JPEGs of {args.width} x {args.height} (made in {made:.0f} s), "
             f"{os.cpu_count()} CPUs, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}", "",
             "| stage | exit | wall s | peak RSS MiB |", "|---|---:|---:|---:|"]
    lines += [f"| {s} | {rc} | {w:.1f} | {m:.0f} |" for s, rc, w, m in rows]
    lines += ["", f"total {sum(r[2] for r in rows):.0f} s; summary top-1 {summary.get('top1')} "
              f"({summary.get('num_classes')} classes)"]
    text = "\n".join(lines)
    print(text)
    (work / f"{args.method}-{args.format}.md").write_text(text + "\n")
    return max((r[1] for r in rows), default=0)


if __name__ == "__main__":
    raise SystemExit(main())
