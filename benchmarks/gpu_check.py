"""The GPU check: one prepared script that measures the project's GPU paths on a lent GPU, in at most 8 minutes.

    python benchmarks/gpu_check.py --out gpu-out                         # on a GPU: the whole check
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gc    # the smoke run CI keeps (< 1 min)

Needs only torch, torchvision and the project's own code (`pipeline` with the local executor; no Ray, no DALI) plus
what `pipeline` itself imports (webdataset, pyarrow, pillow, pyyaml, tqdm). Parts, each in its own process with its
own time limit, so one slow or failing part cannot lose the others' figures (each part writes its JSON after every
item; a part stopped at its limit keeps what it wrote):

- env: the device, torch and CUDA versions, and the two ceilings measured here: a bf16 matrix product
  (8192^3 on a GPU) and a device-to-device copy;
- tests: `pytest -m gpu tests/test_gpu.py` (CUDA against CPU: a recover unit of SRe2L and DWA, bf16 against fp32
  losses, the batched view renderer, a student step), with the differences each test measured (`record_property`);
- bench: the rows of `distill bench` for ResNet-18 at 224 px (recover image-iterations/s of SRe2L and DWA: the
  fp32 eager loop against bf16 + channels_last, SRe2L's merged forward, relabel views/s, views, student images/s,
  peak memory), the FLOPs of one recover step counted from the model (`torch.utils.flop_counter` over the teacher's
  forward and the backward to the pixels: the teacher's weights are frozen, so no weight gradients), the achieved
  fraction of the GPU's dense bf16 peak (datasheet and measured), and the matching methods' rows at 32 px;
- e2e: a miniature pipeline on the device with the local executor (a generated image folder, every stage, one
  class shard), its summary checked;
- variants: SRe2L's recover step under each speed feature alone and together (bf16, channels_last,
  `torch.compile`, a unit's batches in one forward; DWA eager and compiled), against the fp32 eager loop, with
  each compile time apart, and the GPU-hours the pipeline's GPU defaults project for ImageNet-1K IPC 10 / 50
  (SRe2L 4000, DWA 2000 iterations); last because compiling is the slowest part.

Writes `gpu_check.json` (everything), `gpu_check.txt` (the short table it also prints) and `parts/<part>.json`
under `--out`. Exit status 0 when every part that ran passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARTS = ("env", "tests", "bench", "e2e", "variants")
# seconds per part: the full check sums to 450 s (inside the 8 minutes with start-up)
LIMITS = {"env": 30, "tests": 120, "bench": 100, "e2e": 60, "variants": 170}
QUICK_LIMITS = {"env": 20, "tests": 40, "bench": 60, "e2e": 60, "variants": 40}  # safety limits: ~40 s idle
# dense bf16 tensor-core peaks (TFLOP/s, datasheets, without sparsity) by a name fragment of the device
BF16_PEAK_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0), ("L40S", 362.1),
                    ("L4", 121.0), ("RTX 4090", 165.2), ("A10", 125.0))


class Recorder:
    """A part's JSON, rewritten atomically after every item, so a part stopped at its limit keeps what it did."""

    def __init__(self, path: Path, part: str) -> None:
        self.path, self.t0 = path, time.time()
        self.data: dict[str, Any] = {"part": part, "status": "running", "items": {}}
        self.save()

    def put(self, key: str, value: Any) -> None:
        self.data["items"][key] = value
        self.save()

    def save(self) -> None:
        self.data["seconds"] = round(time.time() - self.t0, 2)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


# ---------------------------------------------------------------------------------------------------------- parts


def part_env(a: argparse.Namespace, rec: Recorder) -> None:
    import platform

    import torch

    dev = torch.device(a.device)
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda_runtime": torch.version.cuda, "device": a.device,
                            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    try:
        info["commit"] = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                                        text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info.update(name=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1),
                    bf16_peak_tflops_datasheet=next((v for k, v in BF16_PEAK_TFLOPS if k in p.name), None))
    else:
        info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                    bf16_peak_tflops_datasheet=None)
    rec.put("device", info)
    n = 2048 if a.quick or dev.type == "cpu" else 8192
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(n, n, device=dev, dtype=dtype, generator=g)  # random data: zeros run faster than real data
    y = torch.randn(n, n, device=dev, dtype=dtype, generator=g)
    secs = _timed(lambda: x @ y, dev, warmup=3, reps=3 if dev.type == "cpu" else 10)
    rec.put("matmul", {"n": n, "dtype": str(dtype).replace("torch.", ""), "seconds_median": secs,
                       "tflops": round(2 * n**3 / secs / 1e12, 2)})
    src = torch.randn(256 * 2**20 if dev.type == "cuda" else 16 * 2**20, device=dev)  # 1 GiB fp32 on a GPU
    dst = torch.empty_like(src)
    secs = _timed(lambda: dst.copy_(src), dev, warmup=2, reps=10)
    rec.put("copy", {"bytes_moved": 2 * src.numel() * 4, "seconds_median": secs,
                     "tb_per_s": round(2 * src.numel() * 4 / secs / 1e12, 3)})


def _timed(fn: Any, dev: Any, warmup: int, reps: int) -> float:
    """Median seconds of `fn` (device events on a GPU, the host clock after a sync otherwise)."""
    import statistics

    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def part_tests(a: argparse.Namespace, rec: Recorder) -> None:
    import tempfile
    import xml.etree.ElementTree as ET

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        xml = Path(tmp) / "tests.xml"
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))
        if a.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider",
               "-o", "addopts=", "-rfEs", f"--junitxml={xml}", f"--basetemp={tmp}/t"]
        rec.put("command", " ".join(cmd[1:]))
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        rec.put("returncode", proc.returncode)
        rec.put("output_tail", (proc.stdout + proc.stderr)[-3000:])
        cases = []
        if xml.exists():
            for case in ET.parse(xml).getroot().iter("testcase"):
                outcome = "passed"
                for tag in ("failure", "error", "skipped"):
                    node = case.find(tag)
                    if node is not None:
                        outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                        msg = (node.get("message") or "")[:400]
                        break
                else:
                    msg = ""
                props = {p.get("name"): _num(p.get("value")) for p in case.iter("property")}
                cases.append({"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)),
                              "measured": props, "message": msg})
        rec.put("cases", cases)
    failed = [c["test"] for c in cases if c["outcome"] in ("failed", "error")]
    if proc.returncode not in (0, 5) or failed or not cases:
        raise RuntimeError(f"gpu tests: return code {proc.returncode}, failed {failed or 'none'}"
                           + ("" if cases else ", no test ran"))


def _num(v: Any) -> Any:
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def bench_args(a: argparse.Namespace, *extra: str) -> argparse.Namespace:
    """`distill bench`'s arguments: ResNet-18 at 224 px with a recover batch of 100 (the ImageNet setting) on a GPU,
    the bundled ConvNet at 32 px in --quick."""
    from pipeline.commands.bench import parser

    size = (["--model", "convnet", "--resolution", "32", "--classes", "10", "--batch", "10", "--student-batch", "8",
             "--iterations", "2", "--rounds", "1", "--merge", "2"] if a.quick else
            ["--model", "resnet18", "--resolution", "224", "--classes", "1000", "--batch", "100",
             "--student-batch", "128", "--iterations", "20", "--rounds", "3", "--merge", "4"])
    return parser().parse_args(["--device", a.device, "--no-compile", *size, *extra])


def recover_step_flops(b: argparse.Namespace) -> int:
    """FLOPs of one SRe2L iteration of a batch, counted from the model: the teacher's forward and the backward to
    the pixels only (its weights are frozen: no weight gradients), as `torch.utils.flop_counter` counts them
    (convolutions and matrix products; elementwise work is not counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.commands.bench_rows import bench_teacher

    teacher = bench_teacher(b.model, b.classes, b.resolution, torch.device("cpu"))
    for p in teacher.parameters():
        p.requires_grad_(False)
    x = torch.zeros(b.batch, 3, b.resolution, b.resolution, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        teacher(x).sum().backward()
    return int(counter.get_total_flops())


def part_bench(a: argparse.Namespace, rec: Recorder) -> None:
    from dataclasses import asdict

    import torch

    from pipeline.commands.bench import bench_relabel, bench_train, bench_views
    from pipeline.commands.bench_rows import (
        bench_recover_matching,
        bench_recover_merged,
        bench_recover_synthesis,
    )

    dev = torch.device(a.device)
    b = bench_args(a)
    rec.put("command", f"distill bench --device {a.device} --model {b.model} --resolution {b.resolution} "
                       f"--classes {b.classes} --batch {b.batch} --student-batch {b.student_batch} --iterations "
                       f"{b.iterations} --rounds {b.rounds} --merge {b.merge} --no-compile --what "
                       "recover,relabel,views,train --methods sre2l,dwa")
    flops = recover_step_flops(b)
    rec.put("recover_step_flops", {"per_batch_iteration": flops, "per_image_iteration": flops // b.batch,
                                   "how": "torch.utils.flop_counter: teacher forward + backward to the pixels"})
    rows = {}
    for name, fn in (("recover/sre2l", lambda: bench_recover_synthesis("sre2l", b, dev)),
                     ("recover/dwa", lambda: bench_recover_synthesis("dwa", b, dev)),
                     ("recover/sre2l-merged", lambda: bench_recover_merged(b, dev)),
                     ("relabel", lambda: bench_relabel(b, dev)),
                     ("views", lambda: bench_views(b, dev)),
                     ("train", lambda: bench_train(b, dev))):
        rows[name] = asdict(fn())
        rec.put("rows", rows)
        if name.startswith("recover/"):
            rec.put("achieved", achieved(rows, flops // b.batch, a))
    small = bench_args(a, "--model", "convnet", "--resolution", "32", "--classes", "10", "--batch", "10")
    for m in () if a.quick else ("dm", "datadam", "dc", "dsa"):  # `distill bench`'s own test runs them on a CPU
        rows[f"recover/{m} (convnet 32 px)"] = asdict(bench_recover_matching(m, small, dev))
        rec.put("rows", rows)


def achieved(rows: dict[str, dict[str, Any]], flops_per_image_it: int, a: argparse.Namespace) -> dict[str, Any]:
    """Model FLOP/s of the recover rows' optimized side over the dense bf16 peak (datasheet, and the matrix product
    measured by the env part)."""
    env = _read_part(a.out, "env")
    items = env.get("items", {})
    peak = (items.get("device") or {}).get("bf16_peak_tflops_datasheet")
    measured = (items.get("matmul") or {}).get("tflops") if items.get("matmul", {}).get("dtype") == "bfloat16" else None
    out = {}
    for name, r in rows.items():
        if not name.startswith("recover/") or "merged" in name or not r.get("optimized"):
            continue
        for side in ("baseline", "optimized"):
            tflops = flops_per_image_it * r[side] / 1e12
            out[f"{name} {side}"] = {"model_tflops": float(f"{tflops:.4g}"),
                                     "of_datasheet_bf16_peak": float(f"{tflops / peak:.3g}") if peak else None,
                                     "of_measured_bf16_matmul": float(f"{tflops / measured:.3g}") if measured else None}
    return out


def projection(merged_rate: float, single_rate: float, dwa_extra_s: float, batch: int,
               flops: dict[str, Any] | None = None) -> dict[str, Any]:
    """GPU-hours of ImageNet-1K recover (1000 classes x IPC images, each `iterations` iterations) at measured rates:
    SRe2L at `merged_rate` (its GPU default shares a forward among a unit's batches), DWA at `single_rate` (one
    batch per forward) plus `dwa_extra_s` of weight perturbation per batch of `batch` images."""
    out: dict[str, Any] = {"sre2l_image_iterations_per_s": merged_rate, "dwa_image_iterations_per_s": single_rate,
                           "dwa_perturbation_s_per_batch": round(dwa_extra_s, 3)}
    if flops:
        out["sre2l_model_tflops"] = round(flops["per_image_iteration"] * merged_rate / 1e12, 2)
    for method, iters in (("sre2l", 4000), ("dwa", 2000)):
        for ipc in (10, 50):
            images = 1000 * ipc
            secs = (images * iters / merged_rate if method == "sre2l" else
                    images * iters / single_rate + (images / batch) * dwa_extra_s)
            out[f"{method} IPC {ipc} ({iters} it)"] = {"gpu_hours": round(secs / 3600, 2)}
    return out


def part_e2e(a: argparse.Namespace, rec: Recorder) -> None:
    import tempfile

    import numpy as np
    import torch
    from PIL import Image

    from manifests.store import ManifestStore
    from pipeline.commands.recipes import load_config
    from pipeline.run.runner import run_pipeline

    classes, per_class, val, size = 4, 24, 8, 32
    with tempfile.TemporaryDirectory(prefix="gpu-check-e2e-") as tmp:
        root = Path(tmp) / "data"
        rng = np.random.default_rng(0)
        for split, n in (("train", per_class), ("val", val)):
            for c in range(classes):
                d = root / split / f"n{c:08d}"
                d.mkdir(parents=True)
                for i in range(n):  # class = dominant colour and a stripe position: learnable in a few epochs
                    arr = rng.integers(0, 70, size=(size, size, 3), dtype=np.uint8)
                    arr[..., c % 3] += 140
                    arr[(c * 8):(c * 8 + 6), :, :] = 255
                    Image.fromarray(arr).save(d / f"img_{i:03d}.png")
        epochs = 2 if a.quick else 20
        # on a GPU the whole matrix is seconds: both protocols and both baselines
        matrix = (["eval.protocols=[]", "eval.baselines=[random-real]"] if a.quick else
                  ["eval.protocols=[kd,hard]", "eval.baselines=[random-real,full-real]"])
        overrides = [f"data.source={root}", "data.num_workers=0", "executor.kind=local", "recover.method=sre2l",
                     "recover.ipc=2", "recover.ipc_per_unit=2", f"recover.classes_per_shard={classes}",
                     f"recover.sre2l.iterations={5 if a.quick else 100}", f"squeeze.epochs={2 if a.quick else 10}",
                     f"train.epochs={epochs}", "train.batch_size=8", *matrix,
                     f"eval.full_real_epochs={1 if a.quick else 5}"]
        rec.put("overrides", overrides)
        cfg = load_config("demo", overrides=overrides)
        run_dir = Path(tmp) / "run"
        t0 = time.time()
        run_pipeline(cfg, run_dir, progress=False)
        rec.put("wall_s", round(time.time() - t0, 2))
        summary = json.loads((run_dir / "results" / "summary.json").read_text())
        rec.put("summary", {k: summary.get(k) for k in ("method", "ipc", "num_images", "num_classes", "teacher_top1",
                                                      "top1", "wall_s", "cells", "fairness")})
        store = ManifestStore(run_dir)
        recover = store.records("recover")
        units = [r for r in recover if r.metrics.get("images")]
        want = "cuda" if a.device == "cuda" else "cpu"
        checks = {
            "every stage has its record": sorted(s for s in ("ingest", "squeeze", "recover", "relabel", "train",
                                                           "evaluate") if not store.records(s)) == [],
            "one class shard": len(units) == 1,
            f"recover ran on {want}": bool(units) and all(r.metrics.get("device") == want for r in units),
            "8 images": summary.get("num_images") == classes * 2,
            "top-1 in [0, 100]": isinstance(summary.get("top1"), int | float) and 0 <= summary["top1"] <= 100,
            "teacher top-1 above chance": (summary.get("teacher_top1") or 0) > 100 / classes,
        }
        if want == "cuda":
            checks["cuda used"] = torch.cuda.max_memory_allocated() > 0
        rec.put("recover_unit", {k: units[0].metrics.get(k) for k in ("device", "seconds", "image_iterations_per_s",
                                                                     "batches_per_forward", "loss_ce", "loss_bn")}
                if units else None)
        rec.put("checks", checks)
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise RuntimeError(f"e2e checks failed: {', '.join(bad)}")


def part_variants(a: argparse.Namespace, rec: Recorder) -> None:
    """SRe2L's recover step under each speed feature alone and together, against the fp32 eager loop, in one
    process: which of the defaults pay on this device. Each variant's first call (compilation, cuDNN's choices) is
    timed apart as `setup_s`; the rate is the median of three calls after it. With --quick (CPU) only the eager
    variants run (compiling takes 20-40 s there)."""
    import contextlib
    import statistics

    import torch

    from pipeline.commands.bench_rows import bench_teacher, sync_device
    from pipeline.methods.synthesis import DWAParams, RecoverParams, TeacherObjective, draw_augment, synthesize_batch

    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    b = bench_args(a)
    n, res, merge = b.batch, b.resolution, 2 if a.quick else 10
    params = RecoverParams(iterations=b.iterations, jitter=4 if res <= 64 else 32)
    gen = torch.Generator().manual_seed(1)
    inits = [torch.randn(n, 3, res, res, generator=gen) for _ in range(merge)]
    targets = torch.arange(n) % b.classes
    real = (torch.randn(n, 3, res, res, generator=gen).to(dev), targets.to(dev))
    draws = [[draw_augment(gen, res, res, params.crop_scale, params.jitter, params.flip, params.crop)
              for _ in range(params.iterations)] for _ in range(merge)]
    # name: (bf16, channels_last, compile, batches per forward, DWA, TF32 off)
    variants = {
        "fp32 eager (baseline)": (False, False, False, 1, False, False),
        "fp32 eager, TF32 off": (False, False, False, 1, False, True),
        "bf16 eager": (True, False, False, 1, False, False),
        "channels_last eager": (False, True, False, 1, False, False),
        "bf16 + channels_last eager": (True, True, False, 1, False, False),
        "fp32 compiled": (False, False, True, 1, False, False),
        "bf16 compiled": (True, False, True, 1, False, False),
        "bf16 + channels_last compiled": (True, True, True, 1, False, False),
        f"bf16 + channels_last compiled, {merge} batches per forward": (True, True, True, merge, False, False),
        "DWA fp32 eager": (False, False, False, 1, True, False),
        "DWA bf16 + channels_last compiled": (True, True, True, 1, True, False),
    }
    if not cuda:  # the smoke run: no channels_last or TF32 on a CPU, compiling takes 20-40 s, CPU bf16 is slow
        variants = {k: v for k, v in variants.items() if not any(v[:3]) and not v[5]}
    rec.put("setting", f"{b.model} at {res} px, batch {n}, {params.iterations} iterations per call, {b.classes} "
                       "classes; DWA: K = 12 ascent steps per call")
    out: dict[str, dict[str, Any]] = {}
    for name, (bf16, cl, comp, groups, dwa, ieee) in variants.items():
        teacher = bench_teacher(b.model, b.classes, res, dev)
        if cl:
            teacher = teacher.to(memory_format=torch.channels_last)
        amp = torch.bfloat16 if bf16 else None
        objective = TeacherObjective(teacher, params.r_var, params.first_bn_multiplier, amp, compile=comp,
                                     groups=groups)
        x0 = torch.cat(inits[:groups]).to(dev)
        if cl:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        tg = targets.repeat(groups).to(dev)
        kw: dict[str, Any] = dict(autocast_dtype=amp, channels_last=cl, objective=objective,
                                  draws=draws[:groups] if groups > 1 else None)
        if dwa:
            kw.update(dwa_batch=real, dwa=DWAParams(steps=12))

        def call(tg: Any = tg, x0: Any = x0, kw: dict[str, Any] = kw, teacher: Any = teacher) -> float:
            sync_device(dev)
            t0 = time.perf_counter()
            synthesize_batch(teacher, tg, x0, params, torch.Generator().manual_seed(2), **kw)
            sync_device(dev)
            return time.perf_counter() - t0

        saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        with contextlib.ExitStack() as stack:
            if ieee:
                torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
                stack.callback(setattr, torch.backends.cudnn, "allow_tf32", saved[0])
                stack.callback(setattr, torch.backends.cuda.matmul, "allow_tf32", saved[1])
            if cuda:
                torch.cuda.reset_peak_memory_stats(dev)
            setup = call()
            secs = statistics.median(call() for _ in range(3))
        objective.close()
        rate = n * groups * params.iterations / secs
        base = out.get("fp32 eager (baseline)", {}).get("image_iterations_per_s") or rate
        out[name] = {"image_iterations_per_s": round(rate, 1), "vs_fp32_eager": round(rate / base, 3),
                     "seconds_per_call": round(secs, 4), "setup_s": round(setup, 2),
                     "peak_memory_bytes": int(torch.cuda.max_memory_allocated(dev)) if cuda else None}
        rec.put("variants", out)
    single = out.get("bf16 + channels_last compiled") or out["fp32 eager (baseline)"]
    merged = out.get(f"bf16 + channels_last compiled, {merge} batches per forward", single)
    dwa_row = out.get("DWA bf16 + channels_last compiled") or out["DWA fp32 eager"]
    extra = max(0.0, dwa_row["seconds_per_call"] - single["seconds_per_call"])
    rec.put("projection", projection(merged["image_iterations_per_s"], single["image_iterations_per_s"], extra,
                                     n, flops=_read_part(a.out, "bench").get("items", {}).get("recover_step_flops")))


PART_FNS = {"env": part_env, "tests": part_tests, "bench": part_bench, "e2e": part_e2e, "variants": part_variants}


# --------------------------------------------------------------------------------------------------------- driver


def _read_part(out: str | Path, part: str) -> dict[str, Any]:
    path = Path(out) / "parts" / f"{part}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def run_part(a: argparse.Namespace) -> int:
    """One part in this process (the driver runs each so): its JSON records `ok` or the error."""
    import traceback

    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: --device cuda, but torch sees no CUDA device")
    rec = Recorder(Path(a.out) / "parts" / f"{a.part}.json", a.part)
    try:
        PART_FNS[a.part](a, rec)
        rec.data["status"] = "ok"
        return 0
    except Exception as exc:  # noqa: BLE001 - recorded, then the driver goes on with the next part
        rec.data["status"] = "failed"
        rec.data["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        rec.data["traceback"] = traceback.format_exc()[-4000:]
        return 1
    finally:
        rec.save()


def drive(a: argparse.Namespace) -> int:
    out = Path(a.out)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    limits = dict(QUICK_LIMITS if a.quick else LIMITS)
    for item in a.limit:
        name, _, secs = item.partition("=")
        if name not in PARTS or not secs.replace(".", "", 1).isdigit():
            raise SystemExit(f"gpu_check: --limit takes PART=SECONDS with a part of {', '.join(PARTS)}, got {item!r}")
        limits[name] = float(secs)
    chosen = [p for p in a.parts.split(",") if p]
    unknown = sorted(set(chosen) - set(PARTS))
    if unknown:
        raise SystemExit(f"gpu_check: unknown part(s) {', '.join(unknown)}; parts: {', '.join(PARTS)}")
    t_start = time.time()
    report: dict[str, Any] = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "device": a.device,
                              "quick": a.quick, "budget_s": a.budget, "parts": {}}
    for part in [p for p in PARTS if p in chosen]:
        left = a.budget - (time.time() - t_start)
        limit = min(limits[part], left)
        if limits[part] <= 0 or left < 5:
            report["parts"][part] = {"status": "skipped", "why": "no time left in the budget" if limits[part] > 0
                                     else "not run with --quick" if a.quick else "its limit is 0"}
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--out", str(out), "--device", a.device,
               *(["--quick"] if a.quick else [])]
        env = dict(os.environ)
        if a.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU paths, also on a machine with a GPU
        t0 = time.time()
        print(f"gpu_check: {part} (limit {limit:.0f} s) ...", flush=True)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the part and anything it started (pytest, DDP ranks)
            log, _ = proc.communicate()
            timed_out = True
        data = _read_part(out, part) or {"part": part, "items": {}}
        if timed_out:
            data["status"] = "timed out"
            data["error"] = f"stopped at its limit of {limit:.0f} s; the items above were done"
        elif proc.returncode != 0 and data.get("status") in (None, "running"):
            data["status"] = "failed"
            data["error"] = f"exit status {proc.returncode}"
        data["wall_s"] = round(time.time() - t0, 2)
        data["log_tail"] = (log or "")[-2500:]
        (out / "parts" / f"{part}.json").write_text(json.dumps(data, indent=1, default=str))
        report["parts"][part] = data
        print(f"gpu_check: {part} {data.get('status')} in {data['wall_s']:.1f} s", flush=True)
    report["wall_s"] = round(time.time() - t_start, 2)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    text = table(report)
    (out / "gpu_check.txt").write_text(text)
    print(text)
    ran = [p for p in report["parts"].values() if p.get("status") != "skipped"]
    return 0 if ran and all(p.get("status") == "ok" for p in ran) else 1


def table(report: dict[str, Any]) -> str:
    """The short text table: per part its status and the figures that matter."""
    parts = report["parts"]
    lines = [f"gpu_check on {report['device']}{' (quick)' if report['quick'] else ''}: {report['wall_s']:.0f} s"]
    env = parts.get("env", {}).get("items", {})
    if env.get("device"):
        d = env["device"]
        lines.append(f"  device {d.get('name')}, torch {d.get('torch')}, CUDA {d.get('cuda_runtime')}, "
                     f"commit {d.get('commit')}")
    if env.get("matmul"):
        m, c = env["matmul"], env.get("copy", {})
        lines.append(f"  ceilings: {m['dtype']} matmul {m['n']}^3 {m['tflops']} TFLOP/s, copy {c.get('tb_per_s')} TB/s")
    for name, p in parts.items():
        lines.append(f"[{name}] {p.get('status')}" + (f": {p['error']}" if p.get("error") else "")
                     + (f" ({p['why']})" if p.get("why") else ""))
        items = p.get("items", {})
        for case in items.get("cases", []):
            figs = ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}"
                             for k, v in case["measured"].items())
            lines.append(f"  {case['outcome']:<7} {case['test']} {figs}".rstrip())
        for what, r in (items.get("rows") or {}).items():
            mib = "-" if r.get("peak_memory_bytes") is None else f"{r['peak_memory_bytes'] / 2**20:.0f}"
            lines.append(f"  {what:<30} {r['unit']:<19} {r['baseline']} -> {r['optimized']} (x{r['ratio']}), "
                         f"setup {r['setup_s']} s, peak {mib} MiB")
        for what, v in (items.get("variants") or {}).items():
            lines.append(f"  {what:<52} {v['image_iterations_per_s']:>9} image-it/s  x{v['vs_fp32_eager']:<6} "
                         f"setup {v['setup_s']} s")
        for what, v in (items.get("achieved") or {}).items():
            lines.append(f"  {what}: {v['model_tflops']} TFLOP/s, {v['of_datasheet_bf16_peak']} of the datasheet "
                         f"bf16 peak, {v['of_measured_bf16_matmul']} of the measured matmul")
        for what, v in (items.get("projection") or {}).items():
            if isinstance(v, dict):
                lines.append(f"  ImageNet-1K {what}: {v['gpu_hours']} GPU-hours")
        if items.get("checks"):
            lines.append("  checks: " + ", ".join(f"{k} {'ok' if ok else 'FAILED'}" for k, ok in items["checks"].items()))
            lines.append(f"  e2e wall {items.get('wall_s')} s, top-1 {(items.get('summary') or {}).get('top1')}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.txt and parts/")
    p.add_argument("--device", default="auto", help="cuda | cpu | auto (cuda when torch sees one)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: the CPU smoke run CI keeps (< 1 min)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for all parts together (default 450, --quick 60); parts past it are skipped")
    p.add_argument("--limit", action="append", default=[], metavar="PART=SECONDS",
                   help="another time limit for a part (repeatable); a part past its limit is stopped, and the "
                        "items it finished are kept")
    p.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # one part in this process (the driver's child)
    a = p.parse_args(argv)
    if a.device == "auto":
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.budget is None:
        a.budget = sum((QUICK_LIMITS if a.quick else LIMITS).values())
    return run_part(a) if a.part else drive(a)


if __name__ == "__main__":
    sys.exit(main())
