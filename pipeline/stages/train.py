"""Train: the student from scratch on the synthetic set with soft labels (DDP, resumable per epoch)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.data.synthetic import SYNTHETIC_DIR
from pipeline.stages.base import RunContext, Stage, Unit, UnitResult
from pipeline.stages.common import STUDENT, TEACHER, data_spec, launch, recover_index_paths
from pipeline.stages.relabel import num_synthetic, top_k, view_spec

if TYPE_CHECKING:
    from pipeline.student import StudentJob


def student_job(ctx: RunContext) -> StudentJob:
    """The student job of this run (also what `python -m pipeline.torchrun --job train` runs)."""
    from pipeline.student import StudentJob

    t, cfg = ctx.config.train, ctx.config
    soft = sorted(str(ctx.path(o.uri)) for r in ctx.store.records("relabel") for o in r.outputs)
    return StudentJob(
        data=data_spec(ctx), views=view_spec(ctx), arch=t.arch, epochs=t.epochs, batch_size=t.batch_size,
        optimizer=t.optimizer, lr=t.lr, weight_decay=t.weight_decay, decay_1d=t.decay_1d,
        warmup_epochs=t.warmup_epochs, temperature=t.temperature, loss_t2=t.loss_t2, amp=t.amp,
        relabel_mode=cfg.relabel.mode, top_k=top_k(ctx), soft_labels=tuple(soft),
        teacher=str(ctx.path(TEACHER)), teacher_arch=cfg.squeeze.arch,
        synthetic_dir=str(ctx.path(SYNTHETIC_DIR)), synthetic_index=tuple(recover_index_paths(ctx)),
        # rendering a small synthetic set in the main process beats starting worker processes every epoch
        view_workers=cfg.data.num_workers if num_synthetic(ctx) >= 5000 else 0,
        eval_every=cfg.eval.every, checkpoint=str(ctx.path("checkpoints", "train-last.pt")),
        output=str(ctx.path(STUDENT)), config_hash=ctx.hashes["train"],
    )


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

        metrics = launch(self.ctx, train_student, student_job(self.ctx), self.ctx.config.train.workers)
        return UnitResult(outputs=[self.ctx.ref(self.ctx.path(STUDENT))], metrics=metrics)

    def close(self) -> None:
        pass


STAGE = TrainStage()
