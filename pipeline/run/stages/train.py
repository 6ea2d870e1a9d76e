"""Train: the student from scratch on the synthetic set with soft labels (DDP, resumable per epoch)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.data.synthetic import SYNTHETIC_DIR
from pipeline.run.base import RunContext, Stage, Unit, UnitResult
from pipeline.run.graph import register_stage
from pipeline.run.stages.common import (
    STUDENTS,
    TEACHER,
    Cell,
    data_spec,
    launch,
    matrix,
    real_meta,
    recover_index_paths,
    student_path,
)
from pipeline.run.stages.relabel import num_synthetic, top_k, view_spec

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.data.holdout import HoldoutSpec
    from pipeline.train.jobs import HardSpec, StudentJob


def hard_spec(ctx: RunContext, arch: str = "", protocol: str = "hard", from_set: bool = True) -> HardSpec:
    """The hard-label protocol (or `own`, the same loop on the set's learned labels) with every `auto` resolved:
    augmentation from the recover method's paper (DSA for dsa / dm / datadam / mtt / pad sets), the DSA strategy
    from the method's config (e.g. the digits strategy without flip), the epochs from whether it augments (1000
    with DSA, 300 without: DSA/DM vs DC), the lr the set learned when it has one (`train.hard_lr_from_set`)."""
    from pipeline.augment.dsa import STRATEGY
    from pipeline.methods import get_method
    from pipeline.run.stages.recover import method_config
    from pipeline.train.hardlabel import DSA_EPOCHS, PLAIN_EPOCHS
    from pipeline.train.jobs import HardSpec

    t = ctx.config.train
    augment = t.hard_augment if t.hard_augment != "auto" else get_method(ctx.config.recover.method).hard_augment
    strategy = ""
    if augment == "dsa":
        strategy = t.hard_dsa_strategy
        if strategy == "auto":
            strategy = getattr(method_config(ctx), "strategy", "") or STRATEGY
    epochs = t.hard_epochs or (DSA_EPOCHS if strategy else PLAIN_EPOCHS)
    lr = t.hard_lr
    if t.hard_lr_from_set and from_set:  # not for the full-real reference: it trains on real images
        lr = float(learned_values(ctx).get("syn_lr") or lr)
    return HardSpec(arch=arch or t.hard_arch, epochs=epochs, batch_size=t.own_batch_size if protocol == "own" else
                    t.hard_batch_size, lr=lr, momentum=0.9, weight_decay=t.hard_weight_decay, dsa_strategy=strategy)


def learned_values(ctx: RunContext) -> dict[str, Any]:
    """What the recover method learned for the whole set (e.g. mtt's `syn_lr`), from its current records."""
    from pipeline.data.synthetic import set_values

    h = ctx.hashes.get("recover")
    return set_values(r for r in ctx.store.records("recover") if r.config_hash == h and r.status == "done")


def set_label_files(ctx: RunContext) -> tuple[str, ...]:
    """The set's learned label files (protocol own), () when its method stored none."""
    from pipeline.data.synthetic import set_label_paths

    h = ctx.hashes.get("recover")
    recs = [r for r in ctx.store.records("recover") if r.config_hash == h and r.status == "done"]
    return tuple(str(p) for p in set_label_paths(ctx.run_dir, recs))


def holdout_spec(ctx: RunContext) -> HoldoutSpec | None:
    """The holdout slice of the run (None when `eval.holdout_fraction` is 0)."""
    from pipeline.data.holdout import HoldoutSpec

    fraction = ctx.config.eval.holdout_fraction
    if fraction <= 0:
        return None
    names = real_meta(ctx)["shards"]["train"]
    return HoldoutSpec(real_dir=str(ctx.path("real")), index_paths=tuple(str(ctx.path("real", f"{n}.parquet"))
                       for n in names), fraction=fraction, seed=ctx.config.data.shuffle_seed)


def resume_path(cell: Cell) -> str:
    """The cell's end-of-epoch checkpoint, relative to the run directory."""
    return f"checkpoints/train-{cell.key}-last.pt"


def best_path(cell: Cell) -> str:
    """The weights of the cell's epoch best on the holdout slice (eval.select = best-holdout)."""
    return f"{STUDENTS}/{cell.key}-best.pt"


def student_job(ctx: RunContext, cell: Cell | None = None) -> StudentJob:
    """The student job of a matrix cell (default: the primary cell; also what `python -m pipeline.torchrun --job
    train` runs)."""
    from pipeline.train.jobs import StudentJob

    cell = cell or matrix(ctx.config)[0]
    t, cfg = ctx.config.train, ctx.config
    hard = cell.protocol in ("hard", "own")
    soft = [] if hard else sorted(str(ctx.path(o.uri)) for r in ctx.store.records("relabel") for o in r.outputs)
    return StudentJob(
        data=data_spec(ctx), views=view_spec(ctx), arch=cell.student, epochs=t.epochs, batch_size=t.batch_size,
        optimizer=t.optimizer, lr=t.lr, weight_decay=t.weight_decay, decay_1d=t.decay_1d,
        warmup_epochs=t.warmup_epochs, temperature=t.temperature, loss_t2=t.loss_t2, amp=t.amp,
        relabel_mode=cfg.relabel.mode, top_k=top_k(ctx), soft_labels=tuple(soft),
        teacher=str(ctx.path(TEACHER)), teacher_arch=cfg.squeeze.arch,
        synthetic_dir=str(ctx.path(SYNTHETIC_DIR)), synthetic_index=tuple(recover_index_paths(ctx)),
        # rendering a small synthetic set in the main process beats starting worker processes every epoch
        view_workers=cfg.data.num_workers if num_synthetic(ctx) >= 5000 else 0,
        eval_every=cfg.eval.every, checkpoint=str(ctx.path(resume_path(cell))),
        output=str(ctx.path(student_path(cell))), config_hash=ctx.hashes["train"],
        protocol=cell.protocol, hard=hard_spec(ctx, cell.student, cell.protocol) if hard else None,
        student_seed=cell.seed, set_labels=set_label_files(ctx) if cell.protocol == "own" else (),
        holdout=holdout_spec(ctx),
        best_output=str(ctx.path(best_path(cell))) if cfg.eval.select == "best-holdout" else "",
        views_on_device=t.views_on_device,
    )


class TrainStage(Stage):
    """One unit per cell of the evaluation matrix (`pipeline.run.stages.common.matrix`), each resumable on its own.

    A matrix of one cell runs as before: a DDP job launched from the driver (Ray Train on a cluster). A larger
    matrix runs its cells as units through the executor, one process each, concurrently on Ray actors (CPU
    actors, or `eval.gpus_per_student` of a GPU each, so several small students share a GPU).
    """

    name = "train"
    depends_on = ("relabel",)
    # the matrix's shape and the holdout slice are in the hash; the baselines and report options are not
    sections = ("seed", "train", "eval.every", "eval.protocols", "eval.students", "eval.seeds",
                "eval.holdout_fraction", "eval.select")
    needs_gpu = True

    def is_distributed(self, ctx: RunContext) -> bool:
        return len(matrix(ctx.config)) > 1

    def gpus_per_actor(self, cfg: Config) -> float:
        return cfg.eval.gpus_per_student

    def resume_files(self, ctx: RunContext) -> tuple[str, ...]:
        return tuple(resume_path(c) for c in matrix(ctx.config))

    def plan(self, ctx: RunContext) -> list[Unit]:
        return [Unit(c.key, c.as_dict()) for c in matrix(ctx.config)]

    def open_worker(self, ctx: RunContext) -> TrainWorker:
        return TrainWorker(ctx)


class TrainWorker:
    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def run(self, unit: Unit) -> UnitResult:
        from pipeline.train.student import train_student

        cell = Cell(**unit.payload)
        job = student_job(self.ctx, cell)
        if job.protocol in ("hard", "own") or STAGE.is_distributed(self.ctx):  # one process (see pipeline.train.hardlabel)
            metrics = train_student(job)
        else:
            metrics = launch(self.ctx, train_student, job, self.ctx.config.train.workers)
        seconds = float(metrics.get("train_seconds") or 0.0)
        done = (metrics.get("epochs", 0) - (metrics.get("resumed_from_epoch") or 0)) * metrics.get("num_images", 0)
        metrics = {**metrics, **cell.as_dict(), "images_per_s": round(done / seconds, 2) if seconds > 0 else None}
        outputs = [self.ctx.ref(self.ctx.path(student_path(cell)))]
        if job.best_output and Path(job.best_output).is_file():
            outputs.append(self.ctx.ref(Path(job.best_output)))
        return UnitResult(outputs=outputs, metrics=metrics)

    def close(self) -> None:
        pass


STAGE = register_stage(TrainStage())
