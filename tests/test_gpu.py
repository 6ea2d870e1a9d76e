"""The CUDA paths compute what the CPU paths compute, within stated tolerances (marked `gpu`; skipped without CUDA).

`benchmarks/gpu_check.py` runs these on a lent GPU and reads the differences each test measured back from pytest's
JUnit XML (`record_property`), so the figures are kept even when a tolerance fails.

The tolerances, and why (calibrated on the CPU; what an H200 measured: `docs/benchmarks.md`, "GPU figures"):
- fp32 on CUDA against the CPU (TF32 off, so both sides do IEEE fp32 and differ only in the order of the sums):
  SRe2L / DWA are Adam on pixels, and Adam's first steps are about sign(gradient) x lr, so a pixel whose gradient
  is near 0 can step the other way after a rounding difference: the largest pixel difference is not a stable
  figure (a 1e-6 relative change of the initial images moved one pixel by 0.27 after 20 iterations on the CPU).
  The checks are on the mean pixel difference (< 1/255: one 8-bit level; 1.4e-4 measured for that 1e-6 change), the
  share of pixels more than 1/255 apart (< 2 %), and the unit's loss summaries (relative 1e-3; 6e-6 measured).
- bf16 autocast against fp32 (the recover default on GPU): the images follow other paths, so only the losses are
  compared: each loss summary of the unit within 3 % relative (bf16 keeps 8 bits of mantissa: 0.4 % per rounding;
  CPU autocast gave 1e-3 over 100 iterations).
- The batched view renderer on CUDA against the per-view loop on the CPU: 1e-4 on [0, 1] pixels, 1/40 of an 8-bit
  level (the CPU's batched call agrees to 2 float32 ulps; on an H200 the CUDA call differed by 2.7e-7 at 32 px and
  3.8e-5 at 224 px from 256, where the first tolerance, 1e-5, failed: the GPU rounds the bilinear source positions
  and blends in another order; the views then go through bf16, whose spacing near 1 is 4e-3).
- A student step (views, forward, KD loss, backward, AdamW) on CUDA against the CPU in fp32: loss and gradient
  (norm of the difference over the norm) relative 1e-4 (AdamW's first step is about sign(gradient) x lr, so the
  updated weights are not compared); in bf16 the loss within 2 % of fp32 and the weights finite.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import clone_run, fast_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
LEVEL = 1.0 / 255.0


@pytest.fixture
def ieee_fp32() -> Iterator[None]:
    """TF32 off for convolutions and matrix products (torch's default lets cuDNN convolutions use TF32), so that
    CUDA's fp32 is the CPU's fp32 up to the order of the sums."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _unit(run_dir: Path, method: str, device: torch.device, *extra: str) -> Any:
    """One recover unit (classes 0-4, IPC indices 0-1) of `method` on `device`, through the method plug-in and
    its environment as the recover stage opens them."""
    from pipeline.core.seeding import generator
    from pipeline.methods import get_method
    from pipeline.run.runner import open_context
    from pipeline.run.stages.recover import method_config, open_env

    cfg = fast_config(f"recover.method={method}", f"recover.{method}.iterations=20", "recover.compile=off", *extra)
    ctx = open_context(cfg, run_dir)
    env = open_env(ctx, device)
    impl = get_method(method).open(env, method_config(ctx))
    key = "gpu-check-unit"
    return impl.run(range(0, 5), range(0, 2), generator(cfg.seed, "recover", key), key)


def _pixels(a: Any, b: Any, record: Any, prefix: str) -> tuple[float, float]:
    x = torch.stack([t.float().cpu() for t in a.images])
    y = torch.stack([t.float().cpu() for t in b.images])
    d = (x - y).abs()
    mean, share = float(d.mean()), float((d > LEVEL).float().mean())
    record(f"{prefix}_pixel_mean_abs", mean)
    record(f"{prefix}_pixel_share_over_1_255", share)
    record(f"{prefix}_pixel_max_abs", float(d.max()))
    return mean, share


def _losses(a: Any, b: Any, record: Any, prefix: str) -> float:
    keys = sorted(k for k in a.metrics if k.startswith("loss_"))
    assert keys, f"no loss summaries in {sorted(a.metrics)}"
    worst = 0.0
    for k in keys:
        rel = abs(a.metrics[k] - b.metrics[k]) / max(abs(a.metrics[k]), 1e-8)
        record(f"{prefix}_{k}_rel", rel)
        worst = max(worst, rel)
    return worst


@pytest.mark.parametrize("method", ["sre2l", "dwa"])
def test_recover_unit_on_cuda_matches_the_cpu_unit(teacher_run, tmp_path, record_property, ieee_fp32, method):
    """The same unit (same seed, same draws) in fp32 on CUDA and on the CPU: the same images up to rounding."""
    run_dir = clone_run(teacher_run, tmp_path / "run")
    fp32 = ("recover.amp=none", "recover.channels_last=false")
    on_cpu = _unit(run_dir, method, CPU, *fp32)
    on_gpu = _unit(run_dir, method, CUDA, *fp32)
    assert on_gpu.classes == on_cpu.classes and on_gpu.ipc_index == on_cpu.ipc_index
    assert all(t.device.type == "cpu" or t.is_cuda for t in on_gpu.images)
    mean, share = _pixels(on_cpu, on_gpu, record_property, "fp32")
    worst = _losses(on_cpu, on_gpu, record_property, "fp32")
    record_property("batches_per_forward_cuda", on_gpu.metrics.get("batches_per_forward"))
    assert mean < LEVEL and share < 0.02, f"{method}: mean |cpu - cuda| {mean:.2e}, share over 1/255 {share:.3f}"
    assert worst < 1e-3, f"{method}: loss summaries differ by {worst:.2e} relative"
    if method == "dwa":
        assert on_gpu.metrics["dwa_radius_ratio"] == pytest.approx(on_cpu.metrics["dwa_radius_ratio"], rel=1e-3)


@pytest.mark.parametrize("method", ["sre2l", "dwa"])
def test_bf16_recover_losses_stay_near_fp32(teacher_run, tmp_path, record_property, ieee_fp32, method):
    """The GPU default (bf16 autocast, channels_last) against fp32 on CUDA: the unit's losses within 3 %."""
    run_dir = clone_run(teacher_run, tmp_path / "run")
    fp32 = _unit(run_dir, method, CUDA, "recover.amp=none", "recover.channels_last=false")
    bf16 = _unit(run_dir, method, CUDA, "recover.amp=bf16", "recover.channels_last=true")
    _pixels(fp32, bf16, record_property, "bf16")
    worst = _losses(fp32, bf16, record_property, "bf16")
    assert all(torch.isfinite(t).all() for t in bf16.images)
    assert worst < 0.03, f"{method}: bf16 loss summaries differ from fp32 by {worst:.2e} relative"


@pytest.mark.parametrize("resolution, source", [(32, 32), (224, 256)])
def test_batched_views_on_cuda_match_the_cpu_loop(record_property, resolution, source):
    """`train.views_on_device` renders on the GPU what the per-view loop renders on the CPU (CutMix, crops,
    flips), over three epochs of views."""
    from pipeline.augment.views import ViewConfig
    from pipeline.train.student import render_views

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, 3, source, source), dtype=torch.uint8, generator=g)
    held = images.to(CUDA)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    worst = 0.0
    for mix in ("cutmix", "mixup", "none"):
        cfg = ViewConfig(resolution=resolution, mix=mix)
        for epoch in range(3):
            ids = list(range(0, 24, 1 + epoch))
            loop = render_views(images, ids, 7, epoch, cfg, mean, std)
            batched = render_views(held, ids, 7, epoch, cfg, mean, std, batched=True)
            assert batched.is_cuda and batched.shape == loop.shape
            # back to [0, 1] pixels: the normalization divides by std
            err = float(((batched.cpu() - loop).abs() * torch.tensor(std).view(1, 3, 1, 1)).max())
            worst = max(worst, err)
    record_property(f"views_{resolution}_max_abs", worst)
    assert worst < 1e-4, f"batched views on CUDA differ from the CPU loop by {worst:.2e}"


def _student_step(device: torch.device, amp: bool) -> tuple[float, torch.Tensor, list[torch.Tensor]]:
    """One student step as `train_student` takes it: views, forward (bf16 autocast when `amp`), KD loss at T 20,
    backward, AdamW (no weight decay on 1-D tensors)."""
    from pipeline.augment.views import ViewConfig
    from pipeline.models import build_model
    from pipeline.softlabels.targets import full_target, kd_loss
    from pipeline.train.optim import make_optimizer
    from pipeline.train.student import render_views
    from pipeline.train.trainloop import autocast

    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=g)
    teacher_logits = torch.randn(32, 10, generator=g) * 3
    torch.manual_seed(2)
    model = build_model("convnet", 10, 32).to(device).train()
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.01)
    ids = list(range(32))
    x = render_views(images.to(device), ids, 0, 0, ViewConfig(resolution=32), batched=device.type == "cuda")
    target = full_target(teacher_logits.to(device), 20.0)
    with autocast(device, amp):
        out = model(x).float()
    loss = kd_loss(out, target, 20.0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grads = torch.cat([p.grad.detach().float().cpu().reshape(-1) for p in model.parameters()])
    opt.step()
    return float(loss.detach()), grads, [v.detach().float().cpu() for v in model.state_dict().values()]


def test_student_step_on_cuda_matches_the_cpu(record_property, ieee_fp32):
    cpu_loss, cpu_g, _ = _student_step(CPU, amp=False)
    gpu_loss, gpu_g, _ = _student_step(CUDA, amp=False)
    bf16_loss, _, bf16_w = _student_step(CUDA, amp=True)
    rel = abs(gpu_loss - cpu_loss) / abs(cpu_loss)
    grad_rel = float((gpu_g - cpu_g).norm() / cpu_g.norm())
    bf16_rel = abs(bf16_loss - gpu_loss) / abs(gpu_loss)
    record_property("student_fp32_loss_rel", rel)
    record_property("student_fp32_grad_rel", grad_rel)
    record_property("student_bf16_loss_rel", bf16_rel)
    assert rel < 1e-4 and grad_rel < 1e-4, f"fp32 student step: loss rel {rel:.2e}, gradient rel {grad_rel:.2e}"
    assert bf16_rel < 0.02 and all(torch.isfinite(v).all() for v in bf16_w)
