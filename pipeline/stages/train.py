"""Train: the student from scratch on the synthetic set with soft labels (DDP, resumable per epoch)."""

from __future__ import annotations

from typing import Any

from pipeline.data.synthetic import SYNTHETIC_DIR
from pipeline.stages.base import RunContext, Stage, Unit, UnitResult
from pipeline.stages.common import STUDENT, TEACHER, data_args, launch, recover_index_paths
from pipeline.stages.relabel import num_synthetic, top_k, view_args


def student_args(ctx: RunContext) -> dict[str, Any]:
    t, cfg = ctx.config.train, ctx.config
    soft = sorted(str(ctx.path(o.uri)) for r in ctx.store.records("relabel") for o in r.outputs)
    return {
        **data_args(ctx), **view_args(ctx), "arch": t.arch, "epochs": t.epochs, "batch_size": t.batch_size,
        "optimizer": t.optimizer, "lr": t.lr, "weight_decay": t.weight_decay, "decay_1d": t.decay_1d,
        "warmup_epochs": t.warmup_epochs, "temperature": t.temperature, "loss_t2": t.loss_t2, "amp": t.amp,
        "relabel_mode": cfg.relabel.mode, "top_k": top_k(ctx), "soft_labels": soft,
        "teacher": str(ctx.path(TEACHER)), "teacher_arch": cfg.squeeze.arch,
        "synthetic_dir": str(ctx.path(SYNTHETIC_DIR)), "synthetic_index": recover_index_paths(ctx),
        "eval_every": cfg.eval.every, "checkpoint": str(ctx.path("checkpoints", "train-last.pt")),
        "output": str(ctx.path(STUDENT)), "config_hash": ctx.hashes["train"],
        # rendering a small synthetic set in the main process beats starting worker processes every epoch
        "num_workers": cfg.data.num_workers if num_synthetic(ctx) >= 5000 else 0,
    }


class TrainStage(Stage):
    name = "train"
    depends_on = ("relabel",)
    sections = ("seed", "train", "eval")

    def plan(self, ctx: RunContext) -> list[Unit]:
        return [Unit("job")]

    def open_worker(self, ctx: RunContext) -> TrainWorker:
        return TrainWorker(ctx)


class TrainWorker:
    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def run(self, unit: Unit) -> UnitResult:
        from pipeline.student import train_student

        metrics = launch(self.ctx, train_student, student_args(self.ctx), self.ctx.config.train.workers)
        return UnitResult(outputs=[self.ctx.ref(self.ctx.path(STUDENT))], metrics=metrics)

    def close(self) -> None:
        pass


STAGE = TrainStage()
