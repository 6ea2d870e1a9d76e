"""Project ImageNet-1K recover on many GPUs: wall time, GPU-hours, queue tail and storage, from stated inputs.

    python benchmarks/scale_projection.py                                  # DWA, 2000 iterations (docs/benchmarks.md)
    python benchmarks/scale_projection.py --iterations 4000 --throughput 14912   # SRe2L
    python benchmarks/scale_projection.py --throughput 4000 --overhead 0.5  # with your own measured figures

The default throughput is measured, not published: `benchmarks/gpu_check.py` on one NVIDIA H200 (torch 2.11,
docs/benchmarks.md "GPU figures"), ResNet-18 at 224 px, batches of 100 classes, the pipeline's GPU defaults (bf16
autocast, channels_last, the compiled objective). DWA runs one batch per forward at 10,160 image-iterations/s plus
0.185 s of weight perturbation per batch: 100 x 2000 / (100 x 2000 / 10,160 + 0.185) = 10,065 image-iterations/s
over a 2000-iteration batch. SRe2L shares one forward among a unit's 10 batches: 14,912. (The official SRe2L code
in fp32 on an RTX 4090, the figure used before: about 1,900.)

The work queue hands out units of `--classes-per-unit` classes x `--ipc-per-unit` images per class, each
`--iterations` iterations; a unit takes images x iterations / throughput seconds plus the queue's per-unit
overhead (scheduling, writing its shard and record: measure it with `--measure-overhead`, which runs the
recover stage of random-real units, whose compute is negligible, on a local Ray cluster). Units are equal, so
the queue runs in waves: wall = ceil(units / GPUs) unit-times, and the last wave leaves GPUs idle when
units % GPUs != 0 (`busy` = units / (waves x GPUs)). GPU-hours = GPUs x wall (what a reservation pays).

Storage: the synthetic images as PNG (`--png-bytes` per 224-px image) and the stored soft labels (one view
per image and student epoch, `--label-bytes` per view: all C = 1000 classes at fp16 plus the log-partition,
the measured 1703.8 bytes per view of the relabel section).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def project(ipc: int, gpus: int, a: argparse.Namespace) -> dict[str, float]:
    shards = math.ceil(a.num_classes / a.classes_per_unit)
    slices = math.ceil(ipc / a.ipc_per_unit)
    units = shards * slices
    unit_s = a.classes_per_unit * a.ipc_per_unit * a.iterations / a.throughput + a.overhead
    waves = math.ceil(units / gpus)
    wall_s = waves * unit_s
    images = a.num_classes * ipc
    return {"units": units, "unit_min": unit_s / 60, "waves": waves, "busy": units / (waves * gpus),
            "wall_h": wall_s / 3600, "gpu_h": gpus * wall_s / 3600, "images_gb": images * a.png_bytes / 1e9,
            "labels_gb": images * a.epochs * a.label_bytes / 1e9}


def measure_overhead(units: int) -> float:
    """Seconds per unit of the recover stage's queue on a local Ray cluster (random-real units of 1 class x
    1 image of the demo): (wall x actors - sum of unit compute) / units."""
    import tempfile

    from manifests.store import ManifestStore
    from pipeline.commands.recipes import load_config
    from pipeline.run.runner import run_pipeline
    from workers.cli import make_executor

    base = ["data.num_workers=0", "eval.baselines=[]", "eval.protocols=[]", "executor.kind=ray",
            "executor.num_workers=2", "squeeze.epochs=1"]
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        run = Path(tmp) / "run"
        cfg = load_config("demo", overrides=base)
        run_pipeline(cfg, run, stages=["ingest", "squeeze"], executor=make_executor(cfg), progress=False)
        ipc = max(1, units // 10)
        cfg = load_config("demo", overrides=[*base, "recover.method=random-real", f"recover.ipc={ipc}",
                                             "recover.ipc_per_unit=1", "recover.classes_per_shard=1"])
        ex = make_executor(cfg)
        t0 = time.perf_counter()
        run_pipeline(cfg, run, stages=["recover"], executor=ex, progress=False)
        wall = time.perf_counter() - t0
        recs = ManifestStore(run).records("recover")
        compute = sum(r.metrics.get("seconds", 0.0) for r in recs)
        n = len(recs)
        per = (wall * 2 - compute) / n
        print(f"{n} random-real units on 2 Ray CPU actors: stage wall {wall:.1f} s (cluster start included), unit "
              f"compute {compute:.1f} s in all -> {per:.3f} s of queue overhead per unit (an upper bound)")
        return per


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--throughput", type=float, default=10065.0,
                   help="recover image-iterations/s per GPU (default: DWA at the pipeline's GPU defaults, ResNet-18 at "
                        "224 px, batches of 100, measured by benchmarks/gpu_check.py on one H200, its weight "
                        "perturbation included; SRe2L at its defaults: 14912)")
    p.add_argument("--overhead", type=float, default=1.0, help="queue seconds per unit")
    p.add_argument("--measure-overhead", type=int, default=0, metavar="UNITS",
                   help="first measure the per-unit overhead on a local Ray cluster with this many units")
    p.add_argument("--iterations", type=int, default=2000, help="recover iterations per batch")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--classes-per-unit", type=int, default=100)
    p.add_argument("--ipc-per-unit", type=int, default=10)
    p.add_argument("--ipcs", default="10,50,100")
    p.add_argument("--gpus", default="8,32,64")
    p.add_argument("--epochs", type=int, default=300, help="student epochs = stored views per image")
    p.add_argument("--png-bytes", type=float, default=150e3, help="bytes of one 224-px synthetic PNG")
    p.add_argument("--label-bytes", type=float, default=1703.8, help="stored soft-label bytes per view")
    a = p.parse_args(argv)
    if a.measure_overhead:
        a.overhead = measure_overhead(a.measure_overhead)
    print(f"throughput {a.throughput:g} image-it/s per GPU, {a.iterations} iterations, units of "
          f"{a.classes_per_unit} classes x {a.ipc_per_unit} IPC, {a.overhead:.2f} s queue overhead per unit\n")
    print("| IPC | GPUs | units | min / unit | waves | GPUs busy | wall (h) | GPU-hours | images (GB) | "
          "soft labels (GB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for ipc in [int(i) for i in a.ipcs.split(",")]:
        for gpus in [int(g) for g in a.gpus.split(",")]:
            r = project(ipc, gpus, a)
            print(f"| {ipc} | {gpus} | {r['units']} | {r['unit_min']:.1f} | {r['waves']} | {r['busy']:.0%} | "
                  f"{r['wall_h']:.2f} | {r['gpu_h']:.1f} | {r['images_gb']:.1f} | {r['labels_gb']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
