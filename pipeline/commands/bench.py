"""`distill bench`: throughput of the project's recover, relabel, student and loader paths against a plain baseline.

Every row times two implementations of the same work in the same process, alternating them (`--rounds` pairs,
the median of each side), so the ratio holds on a loaded machine where the absolute figures do not:

- the *baseline* is the plain loop, the shape of the official code: fp32, one batch at a time, eager PyTorch
  (no autocast, no channels_last, no torch.compile);
- *optimized* is what the pipeline runs with its defaults on that device: on CPU the compiled SRe2L/DWA
  objective (`recover.compile`); on CUDA also bf16 autocast and channels_last (`recover.amp`,
  `recover.channels_last`, `train.amp`). Where no speed feature applies (the matching methods on CPU, the
  PIL loader) both sides run the same code and the ratio is about 1: that is a figure too.

Rows (`what`, `unit`): recover/<method> image-iterations/s (images of a batch x iterations; DC/DSA: images x
outer steps), recover/sre2l-merged (`--merge` batches one per forward against all in one forward,
`recover.batches_per_forward`), recover/sre2l-cda (`--methods cda`: SRe2L's fixed crop scale against CDA's
schedule, `recover.sre2l.crop_schedule=cda`), recover/rded images/s (one class: `--rded-candidates` JPEGs decoded,
`--rded-crops` crops of each scored by the teacher, stitched into `--rded-ipc` images) and recover/rded-forwards
(the teacher's forwards per image the worker counted, not timed), relabel views/s (views rendered and put
through the teacher), views views/s (one `F.interpolate` per view on the host against one batched call on the
device, `train.views_on_device`),
train images/s (`--iterations`/4 batches: views rendered, student forward + backward + step under the KD loss;
on CUDA the optimized side renders them on the device), loader/pil and loader/dali images/s over the bundled
digits' shards. One-off costs (compilation) are timed apart (`setup_s`) and folded into `ratio_per_unit`: the
ratio over one unit of `--unit-iterations` batch-iterations (default 1500, a demo recover unit: 300
iterations x 5 batches) including them. Peak memory is CUDA's `max_memory_allocated` per row, or on CPU the
process's peak RSS so far (a lifetime high-water mark, so an upper bound that never falls between rows).
Inputs are random tensors of the real shapes: throughput does not depend on the values (RDED's are smooth random
JPEGs, decoded on every read as the real pool does; which crops win depends on the values, the work does not).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline.commands.bench_rows import (
    RECOVER_METHODS,
    SIG_DIGITS_BELOW,
    Row,
    bench_recover_cda,
    bench_recover_matching,
    bench_recover_merged,
    bench_recover_rded,
    bench_recover_synthesis,
    bench_teacher,
    make_row,
    timed_pair,
)

ALL = ("recover", "relabel", "views", "train", "loader")


def _views(a: argparse.Namespace, images: torch.Tensor, ids: list[int], epoch: int,
           batched: bool = False) -> torch.Tensor:
    from pipeline.augment.views import ViewConfig
    from pipeline.train.student import render_views

    return render_views(images, ids, 0, epoch, ViewConfig(resolution=a.resolution), (0.5,) * 3, (0.25,) * 3,
                        batched=batched)


def bench_views(a: argparse.Namespace, device: torch.device) -> Row:
    """Student views (crop, resize, flip, CutMix): one `F.interpolate` per view on the host against one batched
    call on the device from the set held there (`train.views_on_device`)."""
    images = torch.randint(0, 256, (max(a.student_batch, 64), 3, a.resolution, a.resolution), dtype=torch.uint8)
    held = images.to(device)
    ids = list(range(a.student_batch))

    def base() -> float:
        for e in range(a.iterations):
            _views(a, images, ids, e).to(device)
        return a.iterations * len(ids)

    def opt() -> float:
        for e in range(a.iterations):
            _views(a, held, ids, e, batched=True)
        return a.iterations * len(ids)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    b, o = timed_pair(base, opt, a.rounds, device)
    return make_row("views", "views/s", b, o, device,
                note="optimized: batched on the device (train.views_on_device=auto uses it on GPU only)")


def bench_relabel(a: argparse.Namespace, device: torch.device) -> Row:
    """Views rendered on the host then the teacher's logits: fp32 eager against inference mode (+ bf16 and
    channels_last on CUDA)."""
    teacher = bench_teacher(a.model, a.classes, a.resolution, device)
    images = torch.randint(0, 256, (max(a.student_batch, 64), 3, a.resolution, a.resolution), dtype=torch.uint8)
    ids = list(range(a.student_batch))
    cuda = device.type == "cuda"
    # Module.to converts in place: the optimized side gets its own copy, so the baseline stays contiguous.
    opt_teacher = bench_teacher(a.model, a.classes, a.resolution, device).to(memory_format=torch.channels_last) \
        if cuda else teacher

    def base() -> float:
        with torch.no_grad():
            for e in range(a.iterations):
                teacher(_views(a, images, ids, e).to(device)).float().cpu()
        return a.iterations * len(ids)

    held = images.to(device) if cuda else images

    def opt() -> float:
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=cuda):
            for e in range(a.iterations):
                v = _views(a, held, ids, e, batched=cuda).to(device, non_blocking=True)
                opt_teacher(v.contiguous(memory_format=torch.channels_last) if cuda else v).float().cpu()
        return a.iterations * len(ids)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    b, o = timed_pair(base, opt, a.rounds, device)
    return make_row("relabel", "views/s", b, o, device,
                note="optimized: inference mode, bf16, channels_last, views batched on the device" if cuda
                else "optimized: inference mode")


def bench_train(a: argparse.Namespace, device: torch.device) -> Row:
    """One student step per batch: views rendered, forward, KD loss against soft targets, backward, AdamW."""
    import torch.nn.functional as F

    from pipeline.models import build_model
    from pipeline.softlabels.targets import kd_loss

    images = torch.randint(0, 256, (max(a.student_batch, 64), 3, a.resolution, a.resolution), dtype=torch.uint8)
    ids = list(range(a.student_batch))
    targets = F.softmax(torch.randn(len(ids), a.classes), dim=1).to(device)
    cuda = device.type == "cuda"

    def make(channels_last: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        s = build_model(a.model, a.classes, a.resolution).to(device).train()
        if channels_last:
            s = s.to(memory_format=torch.channels_last)
        return s, torch.optim.AdamW(s.parameters(), lr=1e-3)

    plain, plain_opt = make(False)
    fast, fast_opt = make(cuda)

    held = images.to(device) if cuda else images

    steps = max(1, a.iterations // 4)  # a student step costs several relabel batches: keep the row short

    def step(model: torch.nn.Module, optim: torch.optim.Optimizer, amp: bool, cl: bool) -> float:
        for e in range(steps):
            v = _views(a, held, ids, e, batched=True) if cl else _views(a, images, ids, e).to(device)
            if cl:
                v = v.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                loss = kd_loss(model(v).float(), targets, 20.0)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
        return steps * len(ids)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    b, o = timed_pair(lambda: step(plain, plain_opt, False, False), lambda: step(fast, fast_opt, cuda, cuda), a.rounds,
                 device)
    return make_row("train", "images/s", b, o, device, note="optimized: bf16, channels_last, views batched on the "
                "device" if cuda else
                "no speed feature on CPU: both sides are the same step")


def bench_loaders(a: argparse.Namespace, device: torch.device) -> list[Row]:
    """The training loaders over the bundled digits' train shards (ingested into a temporary run directory)."""
    from pipeline.commands.recipes import load_config
    from pipeline.data.loaders import dali_available, make_loader
    from pipeline.run.runner import run_pipeline

    with tempfile.TemporaryDirectory(prefix="distill-bench-") as tmp:
        cfg = load_config("demo", overrides=["executor.kind=local", "data.num_workers=0"])
        ctx = run_pipeline(cfg, Path(tmp) / "run", stages=["ingest"], progress=False)
        meta = json.loads((ctx.run_dir / "real" / "classes.json").read_text())
        shards = [ctx.run_dir / "real" / f"{n}.tar" for n in meta["shards"]["train"]]
        batches = max(4, a.iterations)

        def read(backend: str) -> Callable[[], float]:
            def go() -> float:
                loader = make_loader(shards, backend=backend, train=True, batch_size=a.student_batch,
                                     resolution=cfg.data.resolution, num_workers=a.loader_workers, device=device,
                                     num_samples=meta["counts"]["train"])
                seen = 0
                for i, (x, _) in enumerate(loader):
                    seen += len(x)
                    if i + 1 >= batches:
                        break
                return seen
            return go

        pil = read("pil")
        b, o = timed_pair(pil, pil, a.rounds, device)
        rows = [make_row("loader/pil", "images/s", b, o, device, note="the baseline loader: both sides are PIL")]
        if dali_available():
            b, o = timed_pair(pil, read("dali"), a.rounds, device)
            rows.append(make_row("loader/dali", "images/s", b, o, device, note="baseline: PIL"))
        else:
            rows.append(Row("loader/dali", "images/s", round(b, 2), None, None, None,
                            note="NVIDIA DALI is not installed (pip install nvidia-dali-cuda120): not measured"))
    return rows


def parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="distill bench")
    p.description = __doc__.split("\n\n")[0]
    p.epilog = __doc__
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (cuda when available)")
    p.add_argument("--what", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}")
    p.add_argument("--methods", default=",".join(RECOVER_METHODS), help="recover methods to time")
    p.add_argument("--model", default="convnet", help="teacher and student architecture (any `build_model` name)")
    p.add_argument("--resolution", type=int, default=32, help="image side in pixels")
    p.add_argument("--classes", type=int, default=10, help="classes (logits) of the models")
    p.add_argument("--batch", type=int, default=10, help="recover batch: one image per class of a unit")
    p.add_argument("--merge", type=int, default=5,
                   help="recover/sre2l-merged: batches in one forward against one per forward (0 or 1: no row)")
    p.add_argument("--rded-candidates", type=int, default=300, help="recover/rded: real images scored (official 300)")
    p.add_argument("--rded-crops", type=int, default=5, help="recover/rded: crops of each (official 5)")
    p.add_argument("--rded-ipc", type=int, default=10,
                   help="recover/rded: images made from them (candidates x crops / IPC = forwards per image)")
    p.add_argument("--rded-source", default="auto",
                   help="recover/rded: WxH of the JPEGs; auto = the resolution up to 64 px, else 500x375 (ImageNet)")
    p.add_argument("--student-batch", type=int, default=64, help="relabel / student / loader batch")
    p.add_argument("--iterations", type=int, default=20, help="timed iterations (batches) per call")
    p.add_argument("--rounds", type=int, default=3, help="alternating baseline / optimized calls per side")
    p.add_argument("--unit-iterations", type=int, default=1500,
                   help="batch-iterations of one unit for `ratio_per_unit` (demo: 300 iterations x 5 batches)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 = what a recover unit uses: `recover` runs one-thread units)")
    p.add_argument("--loader-workers", type=int, default=0, help="loader worker processes")
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out of the optimized side")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the rows as a JSON list")
    return p


def run_bench(a: argparse.Namespace, echo: Callable[[str], None] = print) -> list[Row]:
    from pipeline.core.errors import ConfigError
    from pipeline.core.seeding import torch_threads

    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("distill bench: --device cuda, but torch sees no CUDA device")
    device = torch.device(a.device)
    what = [w for w in a.what.split(",") if w]
    bad = sorted(set(what) - set(ALL)) + sorted(set(a.methods.split(",")) - set(RECOVER_METHODS) - {""})
    if bad:
        raise ConfigError(f"distill bench: unknown {', '.join(bad)}; --what takes {', '.join(ALL)}, --methods "
                         f"{', '.join(RECOVER_METHODS)}")
    rows: list[Row] = []
    echo(f"distill bench on {device} ({torch.get_num_threads() if device.type == 'cpu' else ''} threads -> "
         f"{a.threads}), {a.model} at {a.resolution} px, recover batch {a.batch}, student batch {a.student_batch}, "
         f"{a.iterations} iterations x {a.rounds} rounds per side")
    echo(f"{'what':<21} {'unit':<22} {'baseline':>10} {'optimized':>10} {'ratio':>6} {'setup s':>8} "
         f"{'per unit':>8} {'peak MiB':>9}  note")
    with torch_threads(a.threads):
        jobs: list[Callable[[], Row | list[Row]]] = []
        if "recover" in what:
            for m in [m for m in a.methods.split(",") if m]:
                if m in ("rded", "cda"):
                    jobs.append(lambda fn=bench_recover_rded if m == "rded" else bench_recover_cda: fn(a, device))
                    continue
                fn = bench_recover_synthesis if m in ("sre2l", "dwa") else bench_recover_matching
                jobs.append(lambda m=m, fn=fn: fn(m, a, device))
                if m == "sre2l" and a.merge > 1:
                    jobs.append(lambda: bench_recover_merged(a, device))
        if "relabel" in what:
            jobs.append(lambda: bench_relabel(a, device))
        if "views" in what:
            jobs.append(lambda: bench_views(a, device))
        if "train" in what:
            jobs.append(lambda: bench_train(a, device))
        if "loader" in what:
            jobs.append(lambda: bench_loaders(a, device))
        for job in jobs:
            out = job()
            for r in out if isinstance(out, list) else [out]:
                rows.append(r)
                echo(_fmt(r))
    if a.json:
        from manifests.store import atomic_write_bytes

        atomic_write_bytes(Path(a.json), json.dumps([asdict(r) for r in rows], indent=1).encode())
        echo(f"rows written to {a.json}")
    return rows


def _fmt(r: Row) -> str:
    def num(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    mib = "-" if r.peak_memory_bytes is None else f"{r.peak_memory_bytes / 2**20:.0f}"
    small = min(r.baseline or SIG_DIGITS_BELOW, r.optimized or SIG_DIGITS_BELOW) < SIG_DIGITS_BELOW
    rate = "10.3g" if small else "10.1f"
    return (f"{r.what:<21} {r.unit:<22} {num(r.baseline, rate)} {num(r.optimized, rate)} "
            f"{num(r.ratio, '6.2f')} {r.setup_s:8.1f} {num(r.ratio_per_unit, '8.2f')} {mib:>9}  {r.note}")


def main(argv: list[str] | None = None) -> int:
    run_bench(parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
