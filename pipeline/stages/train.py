"""Train: the student from scratch on the synthetic set with soft labels (DDP, resumable per epoch)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.data.synthetic import SYNTHETIC_DIR
from pipeline.stages.base import RunContext, Stage, Unit, UnitResult
from pipeline.stages.common import STUDENT, TEACHER, data_spec, launch, recover_index_paths
from pipeline.stages.relabel import num_synthetic, top_k, view_spec

if TYPE_CHECKING:
    from pipeline.hardlabel import HardSpec
    from pipeline.student import StudentJob


def student_arch(ctx: RunContext) -> str:
    """The student architecture of the run's protocol (`train.hard_arch` under `hard`, else `train.arch`)."""
    t = ctx.config.train
    return t.hard_arch if t.protocol == "hard" else t.arch


def hard_spec(ctx: RunContext) -> HardSpec:
    """The hard-label protocol with every `auto` resolved: augmentation from the recover method's paper
    (DSA for dsa / dm / datadam sets), the DSA strategy from the method's config (e.g. the digits strategy
    without flip), the epochs from whether it augments (1000 with DSA, 300 without: DSA/DM vs DC)."""
    from pipeline.dsa import STRATEGY
    from pipeline.hardlabel import DSA_EPOCHS, PLAIN_EPOCHS, HardSpec
    from pipeline.methods import get_method
    from pipeline.stages.recover import method_config

    t = ctx.config.train
    augment = t.hard_augment if t.hard_augment != "auto" else get_method(ctx.config.recover.method).hard_augment
    strategy = ""
    if augment == "dsa":
        strategy = t.hard_dsa_strategy
        if strategy == "auto":
            strategy = getattr(method_config(ctx), "strategy", "") or STRATEGY
    epochs = t.hard_epochs or (DSA_EPOCHS if strategy else PLAIN_EPOCHS)
    return HardSpec(arch=t.hard_arch, epochs=epochs, batch_size=t.hard_batch_size, lr=t.hard_lr, momentum=0.9,
                    weight_decay=t.hard_weight_decay, dsa_strategy=strategy)


def student_job(ctx: RunContext) -> StudentJob:
    """The student job of this run (also what `python -m pipeline.torchrun --job train` runs)."""
    from pipeline.student import StudentJob

    t, cfg = ctx.config.train, ctx.config
    hard = t.protocol == "hard"
    soft = [] if hard else sorted(str(ctx.path(o.uri)) for r in ctx.store.records("relabel") for o in r.outputs)
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
        protocol=t.protocol, hard=hard_spec(ctx) if hard else None,
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

        job = student_job(self.ctx)
        if job.protocol == "hard":  # one process (see pipeline.hardlabel)
            metrics = train_student(job)
        else:
            metrics = launch(self.ctx, train_student, job, self.ctx.config.train.workers)
        return UnitResult(outputs=[self.ctx.ref(self.ctx.path(STUDENT))], metrics=metrics)

    def close(self) -> None:
        pass


STAGE = TrainStage()
