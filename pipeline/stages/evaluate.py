"""Evaluate: student top-1 / top-5 on the real val shards, the run summary and its protocol."""

from __future__ import annotations

import json
from typing import Any

from manifests.store import STAGE_RECORD, atomic_write_text
from pipeline.stages.base import RunContext, Stage, Unit, UnitResult
from pipeline.stages.common import STUDENT, data_spec, real_meta

SUMMARY = "results/summary.json"


def protocol(ctx: RunContext) -> dict[str, Any]:
    """The student protocol as run (effective values: top_k resolved from the class count)."""
    from pipeline.stages.recover import method_config
    from pipeline.stages.relabel import top_k

    c, t = ctx.config, ctx.config.train
    if t.protocol == "hard":
        from pipeline.stages.train import hard_spec

        h = hard_spec(ctx)
        return {"name": "hard", "teacher": c.squeeze.arch, "student": h.arch, "resolution": c.data.resolution,
                "mean": list(c.data.mean), "std": list(c.data.std), "epochs": h.epochs, "batch_size": h.batch_size,
                "optimizer": f"sgd (momentum {h.momentum})", "lr": h.lr, "lr_schedule": "x0.1 at half the epochs",
                "weight_decay": h.weight_decay, "loss": "cross-entropy on hard labels",
                "augmentation": f"DSA {h.dsa_strategy} (per image)" if h.dsa_strategy else "none",
                "relabel_mode": None, "top_k": None,
                "recover_iterations": getattr(method_config(ctx), "iterations", None)}
    return {"name": "kd", "teacher": c.squeeze.arch, "student": t.arch, "resolution": c.data.resolution,
            "mean": list(c.data.mean), "std": list(c.data.std),
            "epochs": t.epochs, "batch_size": t.batch_size, "optimizer": t.optimizer, "lr": t.lr,
            "weight_decay": t.weight_decay, "decay_1d": t.decay_1d, "warmup_epochs": t.warmup_epochs,
            "temperature": t.temperature, "loss": "KL(teacher || student)" + (" * T^2" if t.loss_t2 else ""),
            "augmentation": f"random-resized-crop(scale {t.crop_scale_min}-1) + flip + {t.mix}"
                            + (f"(alpha {t.mix_alpha})" if t.mix != "none" else ""),
            "relabel_mode": c.relabel.mode, "top_k": top_k(ctx) if c.relabel.mode == "stored" else None,
            "recover_iterations": getattr(method_config(ctx), "iterations", None)}


class EvaluateStage(Stage):
    name = "evaluate"
    depends_on = ("train",)
    sections = ("seed", "eval")

    def plan(self, ctx: RunContext) -> list[Unit]:
        return [Unit("job")]

    def open_worker(self, ctx: RunContext) -> EvaluateWorker:
        return EvaluateWorker(ctx)

    def finalize(self, ctx: RunContext) -> dict[str, Any]:
        return {"summary": SUMMARY}


class EvaluateWorker:
    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def run(self, unit: Unit) -> UnitResult:
        import time

        from pipeline import ddp
        from pipeline.models import build_model
        from pipeline.trainloop import evaluate, load_weights, val_loader

        ctx, c = self.ctx, self.ctx.config
        t0 = time.time()
        data = data_spec(ctx)
        device = ddp.device_for_rank()
        from pipeline.stages.train import student_arch

        model = build_model(student_arch(ctx), data.num_classes, c.data.resolution)
        model.load_state_dict(load_weights(ctx.path(STUDENT)))
        m = evaluate(model.to(device), val_loader(data, 0, 1, device), device, c.train.amp)
        store = ctx.store
        squeeze = store.load("squeeze", "import") or store.load("squeeze", "train")
        train = store.load("train", "job")
        history = train.metrics.get("history", []) if train else []
        from pipeline.stages import stage_order

        wall = {}
        for stage in stage_order():  # the stages before this one, in run order
            if stage == EvaluateStage.name:
                break
            rec = store.load(stage, STAGE_RECORD)
            if rec is not None:
                wall[stage] = rec.metrics.get("wall_s")
        wall[EvaluateStage.name] = round(time.time() - t0, 3)
        relabel = store.load("relabel", STAGE_RECORD)
        summary = {
            "run_id": ctx.run_id, "dataset": c.data.dataset, "method": c.recover.method, "ipc": c.recover.ipc,
            "num_classes": real_meta(ctx)["num_classes"], "num_images": train.metrics.get("num_images") if train else None,
            "teacher": c.squeeze.arch, "student": student_arch(ctx),
            "teacher_top1": squeeze.metrics.get("teacher_top1") if squeeze else None,
            "top1": m["top1"], "top5": m["top5"], "val_images": m["n"],
            "best_top1": max([m["top1"]] + [h["top1"] for h in history]),
            "epochs": train.metrics.get("epochs", c.train.epochs) if train else c.train.epochs,
            "relabel_mode": None if c.train.protocol == "hard" else c.relabel.mode, "seed": c.seed, "wall_s": wall,
            "soft_label_bytes": relabel.metrics.get("soft_label_bytes") if relabel else None,
            "full_logit_bytes": relabel.metrics.get("full_logit_bytes") if relabel else None,
            "protocol": protocol(ctx),
        }
        path = ctx.path(SUMMARY)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(summary, indent=1))
        return UnitResult(outputs=[ctx.ref(path)], metrics=summary)

    def close(self) -> None:
        pass


STAGE = EvaluateStage()
