"""Relabel: teacher top-k soft labels for every (epoch, synthetic image) view of the student.

Stored mode writes one parquet file per chunk of images (all epochs), keyed by image id and
epoch with named fields; online mode stores nothing (the train stage runs the teacher on the
same views).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from pipeline.data.synthetic import SYNTHETIC_DIR, load_images
from pipeline.stages.base import RunContext, Stage, Unit, UnitResult
from pipeline.stages.common import real_meta, recover_index_paths, run_teacher

SOFT_DIR = "soft_labels"


def top_k(ctx: RunContext) -> int:
    c = real_meta(ctx)["num_classes"]
    return min(ctx.config.relabel.top_k or min(100, c), c)


def num_synthetic(ctx: RunContext) -> int:
    return sum(int(r.metrics.get("images", 0)) for r in ctx.store.records("recover"))


def view_args(ctx: RunContext) -> dict[str, Any]:
    t = ctx.config.train
    return {"resolution": ctx.config.data.resolution, "crop_scale_min": t.crop_scale_min, "mix": t.mix,
            "mix_alpha": t.mix_alpha}


class RelabelStage(Stage):
    name = "relabel"
    depends_on = ("recover",)
    sections = ("seed", "relabel", "train")
    distributed = True
    needs_gpu = True
    output_dirs = (SOFT_DIR,)

    def plan(self, ctx: RunContext) -> list[Unit]:
        if ctx.config.relabel.mode == "online":
            return []
        n, step = num_synthetic(ctx), ctx.config.relabel.images_per_unit
        return [Unit(f"img{a:07d}-{min(a + step, n) - 1:07d}", {"ids": [a, min(a + step, n)]}) for a in range(0, n, step)]

    def open_worker(self, ctx: RunContext) -> RelabelWorker:
        return RelabelWorker(ctx)

    def finalize(self, ctx: RunContext) -> dict[str, Any]:
        from pipeline.softlabels import full_logit_bytes

        n, c, epochs = num_synthetic(ctx), real_meta(ctx)["num_classes"], ctx.config.train.epochs
        stored = sum(o.bytes for r in ctx.store.records(self.name) for o in r.outputs)
        full = full_logit_bytes(n, epochs, c)
        return {"mode": ctx.config.relabel.mode, "top_k": top_k(ctx), "soft_label_bytes": stored,
                "full_logit_bytes": full, "ratio": round(full / stored, 2) if stored else None}


class RelabelWorker:
    def __init__(self, ctx: RunContext) -> None:
        from pipeline.data.shards import read_index

        self.ctx = ctx
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.images, _ = load_images(ctx.path(SYNTHETIC_DIR), read_index([Path(p) for p in recover_index_paths(ctx)]))
        self.teacher = run_teacher(ctx, self.device)

    @torch.no_grad()
    def run(self, unit: Unit) -> UnitResult:
        from pipeline.augment import draw_views
        from pipeline.softlabels import topk_fp16, write_soft_labels
        from pipeline.student import render_views, view_config

        ctx = self.ctx
        a, b = unit.payload["ids"]
        cfg = view_config(view_args(ctx))
        k, seed, bs = top_k(ctx), ctx.config.seed, ctx.config.relabel.batch_size
        amp = self.device.type == "cuda" and ctx.config.train.amp
        ids_all, epochs_all, params_all, idx_all, val_all = [], [], [], [], []
        for epoch in range(ctx.config.train.epochs):
            for s in range(a, b, bs):
                ids = list(range(s, min(s + bs, b)))
                x = render_views(self.images, ids, seed, epoch, cfg).to(self.device)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
                    idx, vals = topk_fp16(self.teacher(x).float(), k)
                ids_all += ids
                epochs_all += [epoch] * len(ids)
                params_all += draw_views(seed, epoch, ids, len(self.images), cfg)
                idx_all.append(idx.cpu())
                val_all.append(vals.cpu())
        path = ctx.path(SOFT_DIR, f"{unit.key}.parquet")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        write_soft_labels(str(tmp), ids_all, epochs_all, params_all, torch.cat(idx_all), torch.cat(val_all),
                          metadata={"num_classes": str(real_meta(ctx)["num_classes"]), "top_k": str(k)})
        os.replace(tmp, path)
        return UnitResult(outputs=[ctx.ref(path)], metrics={"rows": len(ids_all), "images": b - a})

    def close(self) -> None:
        self.teacher = None


STAGE = RelabelStage()
