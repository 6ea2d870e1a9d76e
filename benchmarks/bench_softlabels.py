"""What the stored soft labels lose against the full target, and what they cost, as a function of top_k.

For each k prints, as means over the views: TV (total variation 0.5 * sum |p - q|) and KL(q || p) in nats
between the stored target p (top-k fp16 logits + logZ, the residual spread uniformly; see
``pipeline.softlabels``) and the full target q = softmax(z_fp16 / T); the residual mass outside the top k
(= the TV of the old format, which renormalised over the top k); the stored bytes per view (parquet column
chunks, zstd, as the relabel stage writes them); and the bytes per view of SRe2L's full-logit format
(2 * C + 29). Views:

- C = 1000: a torchvision ResNet-18 with random weights on random images; its logits are standardised per
  view and scaled to the spread of a trained ImageNet ResNet-18 (std --logit-std, 2.5 by default), the top
  class set to --top-logit (15). Also the plain synthetic case z = 3 * randn with one class at 15.
- C = 10: the demo teacher of --run-dir (``distill run --recipe demo --run-dir DIR --stages ingest,squeeze``)
  on the student's views (crop, flip, CutMix of the run's settings) of the synthetic images if recover ran,
  else of the real val images. Without a run dir, a random-weight ConvNet scaled the same way stands in.

    python benchmarks/bench_softlabels.py [--run-dir /tmp/sl-demo] [--views 512] [--temperature 20]

Runs in well under a minute on two CPU cores. Never asserts on the numbers, except that the stored format
is smaller than the full-logit one for every k printed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from pipeline.augment.views import ViewConfig, draw_views
from pipeline.softlabels import (
    FKD_METADATA_BYTES,
    ViewSource,
    encode_soft_labels,
    full_target,
    target_error,
    teacher_probs,
    write_soft_labels,
)


def scaled(logits: torch.Tensor, std: float, top: float) -> torch.Tensor:
    """Logits standardised per row, times ``std``, with the largest set to ``top`` (a trained net's shape)."""
    z = (logits - logits.mean(1, keepdim=True)) / logits.std(1, keepdim=True) * std
    return z.scatter(1, z.argmax(1, keepdim=True), top)


@torch.no_grad()
def resnet18_logits(views: int, res: int, std: float, top: float) -> torch.Tensor:
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=1000).eval()
    g = torch.Generator().manual_seed(1)
    # Smooth random images (noise upsampled) rather than white noise, so views differ as images do.
    x = torch.nn.functional.interpolate(torch.randn(views, 3, res // 8, res // 8, generator=g), size=(res, res),
                                        mode="bilinear", align_corners=False)
    out = torch.cat([model(x[s:s + 128]) for s in range(0, views, 128)])
    return scaled(out, std, top)


def gaussian_logits(views: int, classes: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    z = 3.0 * torch.randn(views, classes, generator=g)
    z[:, 0] = 15.0
    return z


@torch.no_grad()
def demo_logits(run_dir: Path | None, views: int, std: float, top: float) -> tuple[torch.Tensor, str]:
    """Logits of the demo teacher on student views, or of a random ConvNet when there is no run."""
    from pipeline.models import build_model

    if run_dir is None or not (run_dir / "checkpoints" / "teacher.pt").is_file():
        torch.manual_seed(0)
        model = build_model("convnet", 10, 32).eval()
        x = torch.randn(views, 3, 32, 32, generator=torch.Generator().manual_seed(3))
        return scaled(model(x), std, top), "random ConvNet (no --run-dir with a teacher), scaled"

    from pipeline.config import config_from_json
    from pipeline.data.shards import read_index
    from pipeline.data.synthetic import SYNTHETIC_DIR, load_images
    from pipeline.run.runner import open_context
    from pipeline.run.stages.common import real_meta, real_shards, recover_index_paths, run_teacher
    from pipeline.run.stages.relabel import view_spec
    from pipeline.train.student import render_views

    ctx = open_context(config_from_json(run_dir / "config.json"), run_dir)
    teacher = run_teacher(ctx, torch.device("cpu"))
    if ctx.store.records("recover"):
        images, _ = load_images(ctx.path(SYNTHETIC_DIR), read_index([Path(p) for p in recover_index_paths(ctx)]))
        what = "synthetic"
    else:
        index = read_index([Path(p).with_suffix(".parquet") for p in real_shards(ctx, "val")])
        images, _ = load_images(ctx.path("real"), index, ctx.config.data.resolution)
        what = "real val"
    cfg = view_spec(ctx)
    ids = list(range(len(images)))
    out, epoch = [], 0
    while sum(len(o) for o in out) < views:
        out.append(teacher(render_views(images, ids, ctx.config.seed, epoch, cfg)).float())
        epoch += 1
    logits = torch.cat(out)[:views]
    c = real_meta(ctx)["num_classes"]
    return logits, f"demo teacher ({c} classes) on student views of {len(images)} {what} images"


def column_bytes(path: Path) -> int:
    """Bytes of the column chunks (data and page headers), i.e. the file less its footer."""
    md = pq.ParquetFile(path).metadata
    return sum(md.row_group(r).column(c).total_compressed_size
               for r in range(md.num_row_groups) for c in range(md.num_columns))


def measure(logits: torch.Tensor, ks: list[int], temperature: float, per_epoch: int) -> list[dict[str, float]]:
    """Error and size per k; rows laid out as a relabel unit of ``per_epoch`` images writes them."""
    n, c = logits.shape
    full = full_target(logits, temperature)
    cfg = ViewConfig(resolution=32)
    # Epoch-major, image ids ascending within an epoch, one row group per epoch.
    per_epoch = min(n, per_epoch)
    ids = [i % per_epoch for i in range(n)]
    epochs = [i // per_epoch for i in range(n)]
    params = [p for e in sorted(set(epochs)) for p in draw_views(0, e, range(per_epoch), per_epoch, cfg)][:n]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in ks:
            labels = encode_soft_labels(logits, k, temperature)
            stored = teacher_probs(labels.indices, labels.values, c, temperature, labels.log_z)
            err = target_error(full, stored, labels.indices)
            path = Path(tmp) / f"k{k}.parquet"
            size = write_soft_labels(str(path), ids, epochs, params, labels, c, temperature,
                                     ViewSource(0, per_epoch, cfg))
            rows.append({"k": k, "tv": float(err["tv"].mean()), "kl": float(err["kl"].mean()),
                         "residual": float(err["residual"].mean()), "bytes": column_bytes(path) / n,
                         "footer": size - column_bytes(path), "groups": pq.ParquetFile(path).num_row_groups,
                         "full": 2 * c + FKD_METADATA_BYTES})
    return rows


def print_table(title: str, logits: torch.Tensor, ks: list[int], temperature: float, per_epoch: int) -> None:
    z = logits.half().float()
    c = z.shape[1]
    print(f"\n{title}\n  {len(z)} views, C = {c}, T = {temperature}; logits: std {float(z.std(1).mean()):.2f},"
          f" max {float(z.max(1).values.mean()):.1f}, min {float(z.min(1).values.mean()):.1f} (means over views)")
    # The scale of the signal: how far the target is from knowing nothing (uniform over C).
    q = full_target(logits, temperature)
    uniform = torch.full_like(q, 1.0 / c)
    ref = target_error(q, uniform, torch.zeros(len(q), 0, dtype=torch.long))
    print(f"  {'k':>5} {'TV':>9} {'KL (nats)':>10} {'residual':>9} {'bytes/view':>11} {'full B/view':>12}")
    print(f"  {'unif':>5} {float(ref['tv'].mean()):>9.5f} {float(ref['kl'].mean()):>10.2e} {1.0:>9.4f}"
          f" {'-':>11} {'-':>12}   (uniform over C: the scale of what a target says)")
    rows = measure(logits, ks, temperature, per_epoch)
    for r in rows:
        print(f"  {r['k']:>5} {r['tv']:>9.5f} {r['kl']:>10.2e} {r['residual']:>9.4f} {r['bytes']:>11.1f} "
              f"{r['full']:>12}")
        assert r["bytes"] < r["full"], r
    last = rows[-1]
    print(f"  bytes/view: column chunks at {min(per_epoch, len(z))} rows per row group (= images per relabel unit);"
          f" plus a footer of {last['footer'] / 1024:.1f} KiB for {last['groups']} row groups (one per epoch)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, default=None, help="a demo run with ingest and squeeze done")
    ap.add_argument("--views", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=20.0)
    ap.add_argument("--logit-std", type=float, default=2.5)
    ap.add_argument("--top-logit", type=float, default=15.0)
    ap.add_argument("--res", type=int, default=64, help="ResNet-18 input size (random weights: any size will do)")
    a = ap.parse_args()
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    t0 = time.time()
    ks_1000 = [1, 5, 10, 20, 50, 100, 200, 500, 900, 999, 1000]
    logits, what = demo_logits(a.run_dir, a.views, a.logit_std, a.top_logit)
    # the demo has 100 synthetic images, all in one relabel unit; ImageNet units hold 1000 images
    print_table(f"C = {logits.shape[1]}: {what}", logits, list(range(1, logits.shape[1] + 1)), a.temperature,
                per_epoch=100)
    print_table(f"C = 1000: ResNet-18, random weights, {a.res} px, logits scaled to std {a.logit_std}, "
                f"top {a.top_logit}", resnet18_logits(a.views, a.res, a.logit_std, a.top_logit), ks_1000,
                a.temperature, per_epoch=1000)
    print_table("C = 1000: z = 3 * randn, one class at 15", gaussian_logits(a.views, 1000), ks_1000, a.temperature,
                per_epoch=1000)
    print(f"\n{time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
