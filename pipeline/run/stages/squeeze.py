"""Squeeze: the teacher. Trained on the real shards with DDP (resumable per epoch) or imported."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.errors import ConfigError
from pipeline.run.base import RunContext, Stage, Unit, UnitResult
from pipeline.run.graph import register_stage
from pipeline.run.stages.common import SAMPLE_STATS, TEACHER, data_spec, launch, real_meta

if TYPE_CHECKING:
    from pipeline.train.trainloop import TeacherJob


class SqueezeStage(Stage):
    name = "squeeze"
    depends_on = ("ingest",)
    sections = ("seed", "squeeze", "data.mean", "data.std")  # every later stage inherits these

    def validate(self, ctx: RunContext) -> None:
        w = ctx.config.squeeze.weights
        if w and (Path(w).suffix in (".pt", ".pth", ".bin", ".ckpt") or "/" in w) and not Path(w).is_file():
            raise ConfigError(f"squeeze.weights: file not found: {w}")

    def plan(self, ctx: RunContext) -> list[Unit]:
        return [Unit("import" if ctx.config.squeeze.weights else "train")]

    def open_worker(self, ctx: RunContext) -> SqueezeWorker:
        return SqueezeWorker(ctx)


def teacher_job(ctx: RunContext) -> TeacherJob:
    """The teacher job of this run (also what `python -m pipeline.torchrun --job squeeze` runs)."""
    from pipeline.train.trainloop import TeacherJob

    sq = ctx.config.squeeze
    return TeacherJob(
        data=data_spec(ctx), arch=sq.arch, epochs=sq.epochs, batch_size=sq.batch_size, optimizer=sq.optimizer,
        warmup_epochs=sq.warmup_epochs, lr=sq.lr, weight_decay=sq.weight_decay, amp=sq.amp, weights=sq.weights,
        checkpoint=str(ctx.path("checkpoints", "squeeze-last.pt")), output=str(ctx.path(TEACHER)),
        config_hash=ctx.hashes["squeeze"],
        sample_stats=str(ctx.path(SAMPLE_STATS)) if sq.sample_stats and not sq.weights else "",
        stats_window=sq.stats_window,
        train_index=tuple(str(ctx.path("real", f"{n}.parquet")) for n in real_meta(ctx)["shards"]["train"]),
    )


class SqueezeWorker:
    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def run(self, unit: Unit) -> UnitResult:
        from pipeline.train.trainloop import import_teacher, train_teacher

        ctx, sq = self.ctx, self.ctx.config.squeeze
        job = teacher_job(ctx)
        if unit.key == "import":
            try:
                metrics = import_teacher(job)
            except (ValueError, FileNotFoundError) as exc:
                raise ConfigError(str(exc)) from None
        else:
            metrics = launch(ctx, train_teacher, job, sq.workers)
        metrics["arch"] = sq.arch
        outputs = [ctx.ref(ctx.path(TEACHER))]
        if job.sample_stats:
            outputs.append(ctx.ref(Path(job.sample_stats)))
        return UnitResult(outputs=outputs, metrics=metrics)

    def close(self) -> None:
        pass


STAGE = register_stage(SqueezeStage())
