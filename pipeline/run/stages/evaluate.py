"""Evaluate: student top-1 / top-5 on the real val shards, the run summary and its protocol."""

from __future__ import annotations

import json
from typing import Any

from manifests.store import STAGE_RECORD, atomic_write_text
from pipeline.run.base import RunContext, Stage, Unit, UnitResult
from pipeline.run.graph import pipeline_graph, register_stage
from pipeline.run.stages.common import Cell, data_spec, matrix, real_meta, student_path

SUMMARY = "results/summary.json"


def protocol(ctx: RunContext, cell: Cell | None = None) -> dict[str, Any]:
    """A cell's student protocol as run (effective values: top_k resolved from the class count); default: the
    primary cell's."""
    from pipeline.run.stages.recover import method_config
    from pipeline.run.stages.relabel import top_k

    cell = cell or matrix(ctx.config)[0]
    c, t = ctx.config, ctx.config.train
    if cell.protocol in ("hard", "own"):
        from pipeline.run.stages.train import hard_spec, learned_values, set_label_files

        h = hard_spec(ctx, cell.student, cell.protocol)
        own = cell.protocol == "own"
        loss = "cross-entropy on hard labels"
        if own:
            loss = ("cross-entropy against the softmax of the set's learned labels" if set_label_files(ctx) else
                    "cross-entropy on hard labels (the set has no learned labels)")
        return {"name": cell.protocol, "teacher": c.squeeze.arch, "student": h.arch, "resolution": c.data.resolution,
                "mean": list(c.data.mean), "std": list(c.data.std), "epochs": h.epochs, "batch_size": h.batch_size,
                "optimizer": f"sgd (momentum {h.momentum})", "lr": h.lr, "lr_schedule": "x0.1 at half the epochs",
                "weight_decay": h.weight_decay, "loss": loss,
                "lr_source": "learned by the set (syn_lr)" if "syn_lr" in learned_values(ctx) and
                             c.train.hard_lr_from_set else "train.hard_lr",
                "augmentation": f"DSA {h.dsa_strategy} (per image)" if h.dsa_strategy else "none",
                "relabel_mode": None, "top_k": None,
                "recover_iterations": getattr(method_config(ctx), "iterations", None)}
    return {"name": "kd", "teacher": c.squeeze.arch, "student": cell.student, "resolution": c.data.resolution,
            "mean": list(c.data.mean), "std": list(c.data.std),
            "epochs": t.epochs, "batch_size": t.batch_size, "optimizer": t.optimizer, "lr": t.lr,
            "weight_decay": t.weight_decay, "decay_1d": t.decay_1d, "warmup_epochs": t.warmup_epochs,
            "temperature": t.temperature, "loss": "KL(teacher || student)" + (" * T^2" if t.loss_t2 else ""),
            "augmentation": f"random-resized-crop(scale {t.crop_scale_min}-1) + flip + {t.mix}"
                            + (f"(alpha {t.mix_alpha})" if t.mix != "none" else ""),
            "relabel_mode": c.relabel.mode, "top_k": top_k(ctx) if c.relabel.mode == "stored" else None,
            "recover_iterations": getattr(method_config(ctx), "iterations", None)}


class EvaluateStage(Stage):
    """One unit: every cell of the matrix scored on val (the final epoch's weights; with eval.select =
    best-holdout also the weights of the epoch best on the holdout slice), the baselines' cells, the fairness
    metrics and the run's cost, written to results/summary.json."""

    name = "evaluate"
    depends_on = ("train", "baseline")
    sections = ("seed", "eval")

    def plan(self, ctx: RunContext) -> list[Unit]:
        return [Unit("job")]

    def open_worker(self, ctx: RunContext) -> EvaluateWorker:
        return EvaluateWorker(ctx)

    def finalize(self, ctx: RunContext) -> dict[str, Any]:
        return {"summary": SUMMARY}


def score_cell(ctx: RunContext, cell: Cell, device: Any) -> dict[str, Any]:
    """One cell's row of the summary: val top-1 / top-5 of its final weights, its holdout top-1, and its training
    cost (from its train record); with eval.select = best-holdout, the same for the best epoch's weights."""
    from pipeline.data.holdout import holdout_top1
    from pipeline.models import build_model
    from pipeline.run.stages.train import best_path, holdout_spec
    from pipeline.train.trainloop import evaluate, load_weights, val_loader

    c = ctx.config
    data = data_spec(ctx)
    hold = holdout_spec(ctx)
    model = build_model(cell.student, data.num_classes, c.data.resolution).to(device)

    def score(weights: str) -> dict[str, Any]:
        model.load_state_dict(load_weights(ctx.path(weights)))
        m = evaluate(model, val_loader(data, 0, 1, device), device, c.train.amp)
        h = holdout_top1(model, hold, c.data.resolution, c.data.mean, c.data.std, device) if hold else None
        return {"top1": m["top1"], "top5": m["top5"], "val_images": m["n"], "holdout_top1": h}

    train = ctx.store.load("train", cell.key)
    tm = train.metrics if train else {}
    row = {**cell.as_dict(), **score(student_path(cell)), "epoch": tm.get("epochs"), "epochs": tm.get("epochs"),
           **{k: tm.get(k) for k in ("wall_s", "device_s", "peak_memory_bytes", "images_per_s", "device")}}
    if c.eval.select == "best-holdout":
        history = [h for h in tm.get("history", []) if h.get("holdout_top1") is not None]
        if history and ctx.path(best_path(cell)).is_file():
            best = max(history, key=lambda h: (h["holdout_top1"], -h["epoch"]))
            row["best_holdout"] = {"epoch": best["epoch"], **score(best_path(cell))}
    return row


class EvaluateWorker:
    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def run(self, unit: Unit) -> UnitResult:
        import time

        from manifests.fairness import fairness_rows
        from pipeline.run.cost import run_cost, stage_cost
        from pipeline.run.stages.baseline import RANDOM_REAL, baseline_results
        from pipeline.train import ddp

        ctx, c = self.ctx, self.ctx.config
        t0 = time.time()
        device = ddp.device_for_rank()
        cells = [score_cell(ctx, cell, device) for cell in matrix(c)]
        primary = cells[0]
        store = ctx.store
        squeeze = store.load("squeeze", "import") or store.load("squeeze", "train")
        train = store.load("train", matrix(c)[0].key)
        baselines = baseline_results(ctx)
        if c.recover.method == RANDOM_REAL and RANDOM_REAL in c.eval.baselines:
            baselines[RANDOM_REAL] = {"cells": cells, "run_dir": "."}  # its own baseline: IOR 0 by definition
        wall, costs = {}, {}
        for stage in (ctx.graph or pipeline_graph()).names:  # the stages before this one, in run order
            if stage == EvaluateStage.name:
                break
            rec = store.load(stage, STAGE_RECORD)
            if rec is not None:
                wall[stage] = rec.metrics.get("wall_s")
                units = [r.metrics for r in store.records(stage) if r.unit != STAGE_RECORD
                         and r.config_hash == ctx.hashes[stage]]
                costs[stage] = stage_cost(units)
        wall[EvaluateStage.name] = round(time.time() - t0, 3)
        costs[EvaluateStage.name] = stage_cost([{"wall_s": wall[EvaluateStage.name], "device": device.type,
                                                 "device_s": wall[EvaluateStage.name]}])
        relabel = store.load("relabel", STAGE_RECORD)
        from pipeline.run.stages.train import learned_values, set_label_files

        summary = {
            "run_id": ctx.run_id, "dataset": c.data.dataset, "method": c.recover.method, "ipc": c.recover.ipc,
            "num_classes": real_meta(ctx)["num_classes"],
            "class_names": real_meta(ctx).get("class_names") or real_meta(ctx)["classes"], "num_images": train.metrics.get("num_images") if train else None,
            "teacher": c.squeeze.arch, "student": primary["student"],
            "teacher_top1": squeeze.metrics.get("teacher_top1") if squeeze else None,
            "top1": primary["top1"], "top5": primary["top5"], "val_images": primary["val_images"],
            "holdout_top1": primary["holdout_top1"], "select": c.eval.select,
            "epochs": primary["epochs"] if primary["epochs"] is not None else c.train.epochs,
            "relabel_mode": None if primary["protocol"] in ("hard", "own") else c.relabel.mode, "seed": c.seed, "wall_s": wall,
            "soft_label_bytes": relabel.metrics.get("soft_label_bytes") if relabel else None,
            "full_logit_bytes": relabel.metrics.get("full_logit_bytes") if relabel else None,
            "protocol": protocol(ctx),
            "learned": learned_values(ctx), "learned_labels": bool(set_label_files(ctx)),
            "protocols": {p: protocol(ctx, next(x for x in matrix(c) if x.protocol == p))
                          for p in dict.fromkeys(x.protocol for x in matrix(c))},
            "cells": cells, "baselines": baselines, "fairness": fairness_rows(cells, baselines),
            "cost": run_cost(costs),
        }
        path = ctx.path(SUMMARY)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(summary, indent=1))
        return UnitResult(outputs=[ctx.ref(path)], metrics=summary)

    def close(self) -> None:
        pass


STAGE = register_stage(EvaluateStage())
