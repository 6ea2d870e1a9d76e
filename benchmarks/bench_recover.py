"""Synthesis throughput benchmark (prints figures; never asserts on time).

Measures image-iterations per second (images in a batch x optimisation iterations / seconds) of
SRe2L and DWA recover on this machine:
  1. demo settings: ConvNet teacher, 32 px, batch of 10 classes, 1000 iterations (DWA K=12, B=10);
  2. ResNet-18 at 224 px, batch 10 (CPU unless --device cuda), a short run; the DWA/SRe2L ratio at
     1000 iterations is extrapolated from the measured per-iteration time and the measured cost of
     the K ascent steps (both are printed);
  3. the recover stage of the demo through the Ray executor with one actor and with two actors.

    python benchmarks/bench_recover.py [--device cpu|cuda] [--iterations 1000] [--rn18-iterations 5] [--skip-ray]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from pipeline.methods.synthesis import DWAParams, RecoverParams, dwa_perturb, restore_parameters, synthesize_batch
from pipeline.models import build_model


def _teacher(arch: str, classes: int, res: int, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(arch, classes, res)
    with torch.no_grad():  # non-trivial BN statistics without training
        model.train()
        for _ in range(3):
            model(torch.randn(16, 3, res, res))
    return model.to(device).eval()


def timed_synthesis(teacher, res, batch, iterations, device, dwa_steps=None, dwa_batch=None, amp=None,
                    channels_last=False) -> tuple[float, float]:
    """Returns (seconds for synthesize_batch, seconds of the DWA perturbation alone)."""
    targets = torch.arange(batch, device=device) % 1000
    init = torch.randn(batch, 3, res, res, device=device)
    gen = torch.Generator().manual_seed(0)
    params = RecoverParams(iterations=iterations, jitter=4 if res <= 64 else 32, r_var=2.0)
    subset = None
    dwa_batch = dwa_batch or batch  # the pipeline's default: B = the synthesis batch size
    if dwa_steps:  # one real subset for all K steps, as the recover stage draws it
        subset = (torch.randn(dwa_batch, 3, res, res, device=device),
                  torch.randint(0, targets.max().item() + 1, (dwa_batch,), device=device))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t_dwa = 0.0
    if subset is not None:
        sync()
        t0 = time.perf_counter()
        saved = dwa_perturb(teacher, subset, DWAParams(steps=dwa_steps))
        sync()
        t_dwa = time.perf_counter() - t0
        restore_parameters(teacher, saved)
    sync()
    t0 = time.perf_counter()
    synthesize_batch(teacher, targets, init, params, gen, dwa_batch=subset,
                     dwa=DWAParams(steps=dwa_steps) if dwa_steps else None, autocast_dtype=amp,
                     channels_last=channels_last)
    sync()
    return time.perf_counter() - t0, t_dwa


def bench_demo(device: str, iterations: int) -> None:
    teacher = _teacher("convnet", 10, 32, device)
    t_s, _ = timed_synthesis(teacher, 32, 10, iterations, device)
    t_d, t_p = timed_synthesis(teacher, 32, 10, iterations, device, dwa_steps=12)
    print(f"[demo convnet 32px batch 10, {iterations} it] SRe2L {10 * iterations / t_s:8.1f} img-it/s  "
          f"DWA {10 * iterations / t_d:8.1f} img-it/s  DWA/SRe2L time {t_d / t_s:.3f} "
          f"(of which K=12 ascent steps {t_p:.2f}s)")


def bench_rn18(device: str, iterations: int, amp: bool) -> None:
    teacher = _teacher("resnet18", 1000, 224, device)
    dtype = torch.bfloat16 if (amp and device == "cuda") else None
    t_s, _ = timed_synthesis(teacher, 224, 10, iterations, device, amp=dtype, channels_last=device == "cuda")
    per_it = t_s / iterations
    t_d, t_p = timed_synthesis(teacher, 224, 10, iterations, device, dwa_steps=15, amp=dtype,
                               channels_last=device == "cuda")
    ratio_1000 = (t_p + 1000 * per_it) / (1000 * per_it)
    print(f"[resnet18 224px batch 10, {device}{' bf16' if dtype else ' fp32'}, {iterations} it] "
          f"SRe2L {10 / per_it:7.1f} img-it/s ({per_it * 1000:.0f} ms/it)  DWA {10 * iterations / t_d:7.1f} img-it/s  "
          f"K=15 ascent on B=10: {t_p:.2f}s  -> DWA/SRe2L at 1000 it (extrapolated): {ratio_1000:.3f}")


def bench_actors() -> None:
    from pipeline.commands.recipes import load_config
    from pipeline.run.runner import run_pipeline, run_stage
    from workers.ray_executor import RayExecutor

    with tempfile.TemporaryDirectory() as tmp:
        base = ["squeeze.epochs=2", "recover.dwa.iterations=200", "recover.ipc=4", "recover.ipc_per_unit=1",
                "executor.kind=ray", "executor.num_cpus=2"]
        # the setup stages run in this process; only the recover stage is timed on Ray actors
        cfg = load_config("demo", overrides=[*base, "executor.kind=local"])
        ctx = run_pipeline(cfg, Path(tmp) / "run", stages=["ingest", "squeeze"], progress=False)
        times = {}
        for n in (1, 2):
            cfg_n = load_config("demo", overrides=[*base, f"executor.num_workers={n}"])
            ctx.config = cfg_n
            ctx.store.clear("recover")
            ex = RayExecutor(cfg_n)
            try:
                t0 = time.perf_counter()
                run_stage(ctx, "recover", ex, progress=False)
                times[n] = time.perf_counter() - t0
            finally:
                ex.close()
        imgs = 4 * 10 * 200
        print(f"[recover stage, demo, 4 units x 10 images x 200 it] 1 actor {imgs / times[1]:.1f} img-it/s, "
              f"2 actors {imgs / times[2]:.1f} img-it/s, speed-up {times[1] / times[2]:.2f}x (2 cores)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iterations", type=int, default=1000, help="demo-setting iterations")
    p.add_argument("--rn18-iterations", type=int, default=5)
    p.add_argument("--no-amp", action="store_true")
    p.add_argument("--skip-ray", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"torch {torch.__version__}, device {a.device}, threads {torch.get_num_threads()}")
    bench_demo(a.device, a.iterations)
    bench_rn18(a.device, a.rn18_iterations, not a.no_amp)
    if not a.skip_ray:
        bench_actors()


if __name__ == "__main__":
    main()
