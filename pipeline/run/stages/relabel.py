"""Relabel: teacher soft labels for every (epoch, synthetic image) view of the student.

Stored mode writes one parquet file per chunk of images (all epochs), keyed by image id and epoch: the
top-k fp16 logits and logZ of each view (format and target: ``pipeline.softlabels``). Each unit also
measures what the stored targets lose against the full target softmax(z_fp16 / T) on a fixed sample of its
views, and ``finalize`` reports the view-weighted means (``soft_label_tv``, ``soft_label_kl``,
``soft_label_residual_mass``). Online mode stores nothing (the train stage runs the teacher on the same views
and uses the full target, so those metrics are 0).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from manifests.store import atomic_path
from pipeline.augment.views import ViewConfig
from pipeline.data.synthetic import SYNTHETIC_DIR, load_images
from pipeline.run.base import RunContext, Stage, Unit, UnitResult
from pipeline.run.graph import register_stage
from pipeline.run.stages.common import eval_protocols, real_meta, recover_index_paths, run_teacher

SOFT_DIR = "soft_labels"


# Views per unit on which the stored targets are compared with the full ones (every stride-th row).
METRIC_VIEWS = 256
ERROR_METRICS = ("soft_label_tv", "soft_label_kl", "soft_label_residual_mass")


def top_k(ctx: RunContext) -> int:
    """Classes kept per view: ``relabel.top_k`` clipped to C; 0 (the default) means all C classes.

    Why all C: measured with ``benchmarks/bench_softlabels.py`` at T = 20, no k < C keeps the target close
    at a small cost. The tempered softmax is nearly flat, so what a target says is spread over all classes:
    for C = 1000 and logits spread like a trained ResNet-18's (std 2.5, top 15) the target is only
    KL 8.2e-3 nats (TV 0.051) from uniform, and keeping the top 100 classes with the rest spread evenly still
    leaves KL 4.7e-3 (TV 0.037), more than half of it. The error shrinks only as k nears C (k = 500: KL
    1.1e-3; 900: 7.7e-5) while the bytes grow about linearly in k (100: ~230 B a view; 500: ~920 B), so
    there is no knee to pick. All C classes cost ~1.7 kB a view at C = 1000, still below SRe2L's full-logit
    format (2029 B), and ~25 B at the demo's C = 10 (the demo teacher at k = 3 would lose TV 0.037 of its
    0.093 from uniform). Set ``relabel.top_k`` to trade fidelity for space; the relabel stage record
    reports what a given k loses (``soft_label_tv``, ``soft_label_kl``, ``soft_label_residual_mass``).
    """
    c = real_meta(ctx)["num_classes"]
    return min(ctx.config.relabel.top_k or c, c)


def num_synthetic(ctx: RunContext) -> int:
    return sum(int(r.metrics.get("images", 0)) for r in ctx.store.records("recover"))


def view_spec(ctx: RunContext) -> ViewConfig:
    """How the student's views are drawn; relabel labels exactly these views."""
    t = ctx.config.train
    return ViewConfig(resolution=ctx.config.data.resolution, crop_scale=(t.crop_scale_min, 1.0), mix=t.mix,
                      mix_alpha=t.mix_alpha)


class RelabelStage(Stage):
    name = "relabel"
    depends_on = ("recover", "squeeze")
    sections = ("seed", "relabel", "train", "eval.protocols")
    distributed = True
    needs_gpu = True
    output_dirs = (SOFT_DIR,)

    def dependencies(self, cfg: Any) -> tuple[str, ...]:
        """Recover, and the teacher that labels: its hash comes in through recover's when recover's method uses the
        teacher too, and is named here when it does not (a DM set relabelled by a retrained teacher is relabelled)."""
        from pipeline.run.stages.recover import STAGE as RECOVER

        return ("recover",) if "squeeze" in RECOVER.dependencies(cfg) else ("recover", "squeeze")

    def plan(self, ctx: RunContext) -> list[Unit]:
        if ctx.config.relabel.mode == "online" or "kd" not in eval_protocols(ctx.config):
            return []  # online: the student runs the teacher; hard: the student learns the images' own labels
        n, step = num_synthetic(ctx), ctx.config.relabel.images_per_unit
        return [Unit(f"img{a:07d}-{min(a + step, n) - 1:07d}", {"ids": [a, min(a + step, n)]}) for a in range(0, n, step)]

    def open_worker(self, ctx: RunContext) -> RelabelWorker:
        return RelabelWorker(ctx)

    def finalize(self, ctx: RunContext) -> dict[str, Any]:
        from pipeline.softlabels import full_logit_bytes

        if "kd" not in eval_protocols(ctx.config):
            return {"mode": "skipped: no kd protocol in the matrix (hard students learn hard labels)",
                    "soft_label_bytes": 0}
        n, c, epochs = num_synthetic(ctx), real_meta(ctx)["num_classes"], ctx.config.train.epochs
        records = ctx.store.records(self.name)
        stored = sum(o.bytes for r in records for o in r.outputs)
        full = full_logit_bytes(n, epochs, c)
        online = ctx.config.relabel.mode == "online"
        return {"mode": ctx.config.relabel.mode, "top_k": c if online else top_k(ctx), "soft_label_bytes": stored,
                "full_logit_bytes": full, "ratio": round(full / stored, 2) if stored else None,
                **({m: 0.0 for m in ERROR_METRICS} if online else error_means(records))}


def error_means(records: list[Any]) -> dict[str, float | None]:
    """Means of the units' target-error metrics, each unit weighted by its number of views (rows)."""
    measured = [r.metrics for r in records if all(m in r.metrics for m in ERROR_METRICS)]
    views = sum(int(m["rows"]) for m in measured)
    return {name: (sum(float(m[name]) * int(m["rows"]) for m in measured) / views if views else None)
            for name in ERROR_METRICS}


class RelabelWorker:
    def __init__(self, ctx: RunContext) -> None:
        from pipeline.data.shards import read_index

        self.ctx = ctx
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.images, _ = load_images(ctx.path(SYNTHETIC_DIR), read_index([Path(p) for p in recover_index_paths(ctx)]))
        self.teacher = run_teacher(ctx, self.device)
        from pipeline.train.student import views_on_device

        # the synthetic set (uint8) held on the device, when its views are rendered there in one call per batch
        self.batched = views_on_device(ctx.config.train.views_on_device, self.device)
        if self.batched:
            self.images = self.images.to(self.device)

    @torch.no_grad()
    def run(self, unit: Unit) -> UnitResult:
        from pipeline.augment.views import draw_views
        from pipeline.softlabels import (
            SoftLabelWriter,
            ViewSource,
            encode_soft_labels,
            full_target,
            target_error,
            teacher_probs,
        )
        from pipeline.train.student import render_views

        ctx = self.ctx
        a, b = unit.payload["ids"]
        cfg = view_spec(ctx)
        k, seed, bs = top_k(ctx), ctx.config.seed, ctx.config.relabel.batch_size
        c, temp, epochs = real_meta(ctx)["num_classes"], ctx.config.train.temperature, ctx.config.train.epochs
        amp = self.device.type == "cuda" and ctx.config.train.amp
        # The metric sample: every stride-th row of the unit (rows are epoch-major), at most METRIC_VIEWS.
        stride = max(1, math.ceil((b - a) * epochs / METRIC_VIEWS))
        # on the device, read once at the end (no host sync per batch)
        errors = {name: torch.zeros((), dtype=torch.float64, device=self.device) for name in ("tv", "kl", "residual")}
        measured = 0
        path = ctx.path(SOFT_DIR, f"{unit.key}.parquet")
        views = ViewSource(seed, len(self.images), cfg)
        # Streamed epoch by epoch: memory stays at one epoch of the unit's labels even with every class kept.
        with atomic_path(path) as tmp, SoftLabelWriter(str(tmp), c, k, temp, views,
                                                       metadata={"teacher_arch": ctx.config.squeeze.arch}) as out:
            for epoch in range(epochs):
                for s in range(a, b, bs):
                    ids = list(range(s, min(s + bs, b)))
                    x = render_views(self.images, ids, seed, epoch, cfg, ctx.config.data.mean,
                                     ctx.config.data.std, batched=self.batched).to(self.device)
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
                        logits = self.teacher(x).float()
                    labels = encode_soft_labels(logits, k, temp)
                    pick = [j for j in range(len(ids)) if (out.rows + j) % stride == 0]
                    if pick:
                        sel = torch.tensor(pick, device=self.device)
                        kept = labels.indices[sel]
                        stored = teacher_probs(kept, labels.values[sel], c, temp, labels.log_z[sel])
                        for name, v in target_error(full_target(logits[sel], temp), stored, kept).items():
                            errors[name] += v.double().sum()
                        measured += len(pick)
                    out.write(ids, [epoch] * len(ids), draw_views(seed, epoch, ids, len(self.images), cfg), labels)
        metrics: dict[str, Any] = {"rows": out.rows, "images": b - a, "measured_views": measured}
        for name, key in zip(("tv", "kl", "residual"), ERROR_METRICS, strict=True):
            metrics[key] = float(errors[name]) / measured if measured else None
        return UnitResult(outputs=[ctx.ref(path)], metrics=metrics)

    def close(self) -> None:
        self.teacher = None


STAGE = register_stage(RelabelStage())
