"""The measuring half of `distill bench` (`pipeline.commands.bench`): a row's record, the alternating timer, a
teacher with trained-looking BN statistics, and the recover rows (SRe2L / DWA synthesis, SRe2L's merged forward,
SRe2L's CDA crop schedule, the matching methods, RDED)."""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

RECOVER_METHODS = ("sre2l", "dwa", "dm", "datadam", "dc", "dsa", "rded", "cda")


@dataclass
class Row:
    what: str
    unit: str
    baseline: float | None
    optimized: float | None
    ratio: float | None
    peak_memory_bytes: int | None
    setup_s: float = 0.0  # one-off cost of the optimized side (compilation), not in `optimized`
    ratio_per_unit: float | None = None  # over one unit of work, the one-off cost included
    note: str = ""


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_pair(base: Callable[[], float], opt: Callable[[], float], rounds: int, device: torch.device
          ) -> tuple[float, float]:
    """Median throughput of each side over `rounds` alternating calls; each call returns the work it did."""
    b, o = [], []
    for _ in range(rounds):
        for fn, out in ((base, b), (opt, o)):
            sync_device(device)
            t0 = time.perf_counter()
            work = fn()
            sync_device(device)
            out.append(work / (time.perf_counter() - t0))
    return statistics.median(b), statistics.median(o)


def make_row(what: str, unit: str, base: float, opt: float, device: torch.device, *, setup_s: float = 0.0,
         unit_work: float | None = None, note: str = "") -> Row:
    per_unit = None
    if unit_work:
        per_unit = round((unit_work / base) / (setup_s + unit_work / opt), 3)
    return Row(what, unit, rate_digits(base), rate_digits(opt), round(opt / base, 3), peak_memory(device),
               round(setup_s, 2), per_unit, note)


SIG_DIGITS_BELOW = 1.0
"""Rates below this are kept (and printed) to 3 significant digits instead of 2 decimals."""


def rate_digits(v: float) -> float:
    """A rate kept to 2 decimals, or to 3 significant digits below `SIG_DIGITS_BELOW` (a 224-px matching row runs
    at 0.06 image-iterations/s, where 2 decimals would leave a 15 % step)."""
    return round(v, 2) if abs(v) >= SIG_DIGITS_BELOW else float(f"{v:.3g}")


def bench_teacher(arch: str, classes: int, resolution: int, device: torch.device) -> torch.nn.Module:
    from pipeline.models import build_model

    model = build_model(arch, classes, resolution).to(device).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # running statistics away from (0, 1), as a trained teacher's are
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def bench_recover_synthesis(method: str, a: argparse.Namespace, device: torch.device) -> Row:
    """SRe2L / DWA: the eager fp32 loop against the compiled objective (+ bf16, channels_last on CUDA)."""
    from pipeline.methods.synthesis import DWAParams, RecoverParams, TeacherObjective, synthesize_batch

    teacher = bench_teacher(a.model, a.classes, a.resolution, device)
    n = a.batch
    targets = torch.arange(n, device=device) % a.classes
    gen = torch.Generator().manual_seed(1)
    init = torch.randn(n, 3, a.resolution, a.resolution, generator=gen).to(device)
    params = RecoverParams(iterations=a.iterations, jitter=4 if a.resolution <= 64 else 32)
    dwa = dict(dwa_batch=(torch.randn(n, 3, a.resolution, a.resolution, generator=gen).to(device), targets),
               dwa=DWAParams(steps=12)) if method == "dwa" else {}
    cuda = device.type == "cuda"
    amp = torch.bfloat16 if cuda else None
    opt_teacher = bench_teacher(a.model, a.classes, a.resolution, device)
    if cuda:
        opt_teacher = opt_teacher.to(memory_format=torch.channels_last)
    objective = TeacherObjective(opt_teacher, params.r_var, params.first_bn_multiplier, amp, compile=not a.no_compile)
    opt_init = init.contiguous(memory_format=torch.channels_last) if cuda else init

    def base() -> float:
        synthesize_batch(teacher, targets, init, params, torch.Generator().manual_seed(2), **dwa)
        return n * a.iterations

    def opt() -> float:
        synthesize_batch(opt_teacher, targets, opt_init, params, torch.Generator().manual_seed(2), **dwa,
                         autocast_dtype=amp, channels_last=cuda, objective=objective)
        return n * a.iterations

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    one = RecoverParams(iterations=1, jitter=params.jitter)  # the first call compiles
    synthesize_batch(opt_teacher, targets, opt_init, one, torch.Generator().manual_seed(2), **dwa,
                     autocast_dtype=amp, channels_last=cuda, objective=objective)
    sync_device(device)
    setup = time.perf_counter() - t0
    b, o = timed_pair(base, opt, a.rounds, device)
    objective.close()
    feats = ([] if a.no_compile else ["compile"]) + (["bf16", "channels_last"] if cuda else [])
    return make_row(f"recover/{method}", "image-iterations/s", b, o, device, setup_s=setup,
                unit_work=a.unit_iterations * n, note="optimized: " + (", ".join(feats) or "nothing (--no-compile)"))


def bench_recover_merged(a: argparse.Namespace, device: torch.device) -> Row:
    """SRe2L: `--merge` batches one after the other against the same batches in one forward
    (`recover.batches_per_forward`), both eager with the device's precision (bf16 and channels_last on CUDA)."""
    from pipeline.methods.synthesis import RecoverParams, draw_augment, synthesize_batch

    teacher = bench_teacher(a.model, a.classes, a.resolution, device)
    cuda = device.type == "cuda"
    amp = torch.bfloat16 if cuda else None
    if cuda:
        teacher = teacher.to(memory_format=torch.channels_last)
    n, groups = a.batch, a.merge
    targets = torch.arange(n, device=device) % a.classes
    gen = torch.Generator().manual_seed(1)
    params = RecoverParams(iterations=a.iterations, jitter=4 if a.resolution <= 64 else 32)
    inits = [torch.randn(n, 3, a.resolution, a.resolution, generator=gen).to(device) for _ in range(groups)]
    draws = [[draw_augment(gen, a.resolution, a.resolution, params.crop_scale, params.jitter, params.flip,
                           params.crop) for _ in range(params.iterations)] for _ in range(groups)]
    kw = dict(autocast_dtype=amp, channels_last=cuda)

    def base() -> float:
        for init, d in zip(inits, draws, strict=True):
            synthesize_batch(teacher, targets, init, params, gen, draws=[d], **kw)
        return groups * n * a.iterations

    def opt() -> float:
        synthesize_batch(teacher, targets.repeat(groups), torch.cat(inits), params, gen, draws=draws, **kw)
        return groups * n * a.iterations

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    b, o = timed_pair(base, opt, a.rounds, device)
    return make_row("recover/sre2l-merged", "image-iterations/s", b, o, device,
                note=f"baseline: {groups} batches of {n} one per forward; optimized: in one forward (both eager"
                     f"{', bf16, channels_last' if cuda else ''})")


def bench_recover_matching(method: str, a: argparse.Namespace, device: torch.device) -> Row:
    """DM / DataDAM / DC / DSA with their official defaults but few iterations; bf16 autocast (DM, DataDAM) is the
    only speed feature, on CUDA, so on CPU both sides are the same loop."""
    from pipeline.methods.matching import (
        AttentionSpec,
        DistributionMatching,
        GradientMatching,
        NetSpec,
        RealImages,
        dc_loops,
        distribution_matching,
        gradient_matching,
    )

    classes, ipc = a.classes, 1
    g = torch.Generator().manual_seed(3)
    real = RealImages([torch.randint(0, 256, (64, 3, a.resolution, a.resolution), dtype=torch.uint8,
                                     generator=g).to(device) for _ in range(classes)], (0.5,) * 3, (0.25,) * 3)
    spec = NetSpec(num_classes=classes, resolution=a.resolution)
    syn = torch.randn(classes * ipc, 3, a.resolution, a.resolution, generator=g).to(device)
    cuda = device.type == "cuda"
    iters = max(1, a.iterations // 10)  # a DM / DataDAM iteration is a whole class-by-class pass
    if method in ("dm", "datadam"):
        cfg = DistributionMatching(iterations=iters, batch_real=32,
                                   attention=AttentionSpec() if method == "datadam" else None)

        def run(amp: torch.dtype | None) -> float:
            distribution_matching(syn, ipc, real, spec, torch.Generator().manual_seed(4), cfg, amp=amp)
            return classes * ipc * iters

        fns = (lambda: run(None), lambda: run(torch.bfloat16 if cuda else None))
        note = "optimized: bf16" if cuda else "no speed feature on CPU: both sides are the same loop"
    else:
        outer, inner = dc_loops(ipc)
        cfg = GradientMatching(iterations=1, outer_loop=outer, inner_loop=inner, batch_real=32, batch_train=64,
                               strategy="color_crop_cutout_flip_scale_rotate" if method == "dsa" else None)

        def run_gm() -> float:
            gradient_matching(syn, ipc, real, spec, torch.Generator().manual_seed(4), cfg)
            return classes * ipc * outer

        fns = (run_gm, run_gm)
        note = "fp32 second-order loop on every device: both sides are the same loop"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    b, o = timed_pair(*fns, a.rounds, device)
    return make_row(f"recover/{method}", "image-iterations/s", b, o, device, note=note)


def bench_recover_cda(a: argparse.Namespace, device: torch.device) -> Row:
    """SRe2L with its fixed crop scale (0.08-1) against CDA's cosine schedule (`recover.sre2l.crop_schedule=cda`,
    milestone 1: from the whole image down to 0.08 over the iterations), both eager with the device's precision:
    the schedule moves only the range each iteration's window is drawn from, so the ratio should be about 1."""
    import dataclasses

    from pipeline.methods.synthesis import RecoverParams, synthesize_batch

    teacher = bench_teacher(a.model, a.classes, a.resolution, device)
    cuda = device.type == "cuda"
    amp = torch.bfloat16 if cuda else None
    if cuda:
        teacher = teacher.to(memory_format=torch.channels_last)
    n = a.batch
    targets = torch.arange(n, device=device) % a.classes
    init = torch.randn(n, 3, a.resolution, a.resolution, generator=torch.Generator().manual_seed(1)).to(device)
    plain = RecoverParams(iterations=a.iterations, jitter=4 if a.resolution <= 64 else 32)
    cda = dataclasses.replace(plain, crop_schedule="cda", cda_milestone=1.0, cda_mode="cosine", cda_scale_start=1.0)

    def run(params: RecoverParams) -> float:
        synthesize_batch(teacher, targets, init, params, torch.Generator().manual_seed(2), autocast_dtype=amp,
                         channels_last=cuda)
        return n * a.iterations

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    b, o = timed_pair(lambda: run(plain), lambda: run(cda), a.rounds, device)
    return make_row("recover/sre2l-cda", "image-iterations/s", b, o, device,
                    note="baseline: SRe2L's fixed crop scale 0.08-1; optimized: CDA's cosine schedule 1 -> 0.08 "
                         f"(both eager{', bf16, channels_last' if cuda else ', fp32'})")


class _JpegPool:
    """The real pool's reading side for one class (`rows`, `decoded`), over JPEG bytes made here: smooth random
    images (noise upsampled, so they compress about as photographs do) decoded on every read by the pipeline's own
    `decode_rgb`, as `RealPool.decoded` does. Rows beyond the distinct images repeat them."""

    def __init__(self, count: int, width: int, height: int, distinct: int = 24) -> None:
        import io

        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(0)
        self.count, self.blobs = count, []
        for _ in range(min(count, distinct)):
            small = rng.integers(0, 256, size=(max(1, height // 24), max(1, width // 24), 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            self.blobs.append(buf.getvalue())

    def rows(self, cls: int) -> list[int]:
        return list(range(self.count))

    def decoded(self, rows: list[int]) -> list:
        from pipeline.data.synthetic import decode_rgb

        return [decode_rgb(self.blobs[r % len(self.blobs)]) for r in rows]


def rded_source_size(spec: str, resolution: int) -> tuple[int, int]:
    """`--rded-source`: WxH, or auto = the data resolution at 64 px and below (CIFAR, Tiny-ImageNet and the digits
    are stored at their size) and 500x375 above (a typical ImageNet JPEG)."""
    if spec == "auto":
        return (resolution, resolution) if resolution <= 64 else (500, 375)
    w, _, h = spec.lower().partition("x")
    return int(w), int(h)


def bench_recover_rded(a: argparse.Namespace, device: torch.device) -> list[Row]:
    """RDED's worker on one class: `--rded-candidates` JPEGs decoded, `--rded-crops` crops of each scored by the
    teacher, the best kept and stitched into `--rded-ipc` images (factor auto: 2 from 128 px). Baseline: the
    official shape (fp32, eager); optimized: the pipeline's defaults on the device (bf16 autocast and channels_last
    on CUDA; on CPU nothing changes, so both sides are the same code). Two rows: images/s, and the teacher's
    forwards per image counted by the worker (candidates x crops / IPC), which is the same on both sides."""
    from pipeline.methods.env import RecoverEnv
    from pipeline.methods.rded import RdedConfig, RdedWorker

    cuda = device.type == "cuda"
    width, height = rded_source_size(a.rded_source, a.resolution)
    pool = _JpegPool(a.rded_candidates, width, height)
    cfg = RdedConfig(candidates=a.rded_candidates, crops=a.rded_crops)
    ipc = a.rded_ipc
    metrics: dict = {}

    def worker(fast: bool) -> RdedWorker:
        teacher = bench_teacher(a.model, a.classes, a.resolution, device)
        if fast and cuda:
            teacher = teacher.to(memory_format=torch.channels_last)
        env = RecoverEnv(seed=0, device=device, resolution=a.resolution, mean=(0.485, 0.456, 0.406),
                         std=(0.229, 0.224, 0.225), init="real", amp=torch.bfloat16 if fast and cuda else None,
                         channels_last=fast and cuda, teacher=teacher, real=pool)  # type: ignore[arg-type]
        return RdedWorker(env, cfg)

    plain, fast = worker(False), worker(True)

    def run(w: RdedWorker) -> float:
        out = w.run(range(1), range(ipc), torch.Generator().manual_seed(3), "bench")
        metrics.update(out.metrics)
        return len(out.images)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    b, o = timed_pair(lambda: run(plain), lambda: run(fast), a.rounds, device)
    shape = (f"{a.rded_candidates} candidates of {width}x{height} x {a.rded_crops} crops, IPC {ipc}, factor "
             f"{metrics['factor']}")
    images = make_row("recover/rded", "images/s", b, o, device,
                      note=f"{shape}; decode {metrics['decode_seconds']:.2f} s, crop {metrics['crop_seconds']:.2f} s, "
                           f"score {metrics['score_seconds']:.2f} s in the last call; optimized: " +
                           ("bf16, channels_last" if cuda else "no speed feature on CPU: both sides are the same code"))
    images.baseline, images.optimized = round(b, 4), round(o, 4)  # under 1 image/s at 224 px on a CPU
    per = float(metrics["teacher_forwards_per_image"])
    forwards = Row("recover/rded-forwards", "teacher forwards/image", per, per, 1.0, peak_memory(device),
                   note=f"counted by the worker (candidates x crops / IPC), not timed; {shape}")
    return [images, forwards]
