"""Helpers shared by the stages: real-data metadata, the real-data job spec, job launching."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline.config import Config, ConfigError
from pipeline.run.base import RunContext

if TYPE_CHECKING:
    from pipeline.train.trainloop import DataSpec

JobSpec = TypeVar("JobSpec")

TEACHER = "checkpoints/teacher.pt"
STUDENTS = "checkpoints/students"  # one state_dict per cell of the evaluation matrix: <cell key>.pt
SAMPLE_STATS = "checkpoints/teacher-samples.parquet"  # per-sample statistics of the teacher's training


@dataclass(frozen=True)
class Cell:
    """One cell of the evaluation matrix: a student architecture trained under a protocol with a student seed.

    Student seed 0 is the run seed's student (model init and batch order from the run seed, as a run without a
    matrix); seed s > 0 draws its init and order (and, under hard, its DSA draws) from (run seed, "student", s).
    The views of the kd protocol stay those of the run seed, so every seed reads the same stored soft labels.
    """

    protocol: str
    student: str
    seed: int = 0

    @property
    def key(self) -> str:
        return f"{self.protocol}-{self.student}-s{self.seed}"

    @classmethod
    def from_key(cls, key: str) -> Cell:
        protocol, rest = key.split("-", 1)
        student, seed = rest.rsplit("-s", 1)
        return cls(protocol, student, int(seed))

    def as_dict(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "student": self.student, "seed": self.seed}


def eval_protocols(cfg: Config) -> list[str]:
    """The protocols of the matrix: `eval.protocols`, or `train.protocol` alone when it is empty."""
    return list(cfg.eval.protocols) or [cfg.train.protocol]


def students_of(cfg: Config, protocol: str) -> list[str]:
    """The student architectures of a protocol: `eval.students`, or the protocol's own student."""
    return list(cfg.eval.students) or [cfg.train.arch if protocol == "kd" else cfg.train.hard_arch]


def matrix(cfg: Config) -> list[Cell]:
    """Every (protocol, student, seed) cell, protocol-major; the first is the run's primary cell."""
    return [Cell(p, s, k) for p in eval_protocols(cfg) for s in students_of(cfg, p) for k in range(cfg.eval.seeds)]


def student_path(cell: Cell) -> str:
    """The cell's final state_dict, relative to the run directory."""
    return f"{STUDENTS}/{cell.key}.pt"


def real_meta(ctx: RunContext) -> dict[str, Any]:
    """The ingest stage's class map (`real/classes.json`); a clear error when ingest has not run."""
    from pipeline.data.classmap import read_class_map

    return read_class_map(ctx.path("real"))


def real_shards(ctx: RunContext, split: str) -> list[str]:
    return [str(ctx.path("real", f"{name}.tar")) for name in real_meta(ctx)["shards"][split]]


def data_spec(ctx: RunContext) -> DataSpec:
    """The real-data part of every job spec (squeeze, train, evaluate)."""
    from pipeline.train.trainloop import DataSpec

    cfg = ctx.config
    meta = real_meta(ctx)
    return DataSpec(
        num_classes=meta["num_classes"], resolution=cfg.data.resolution, seed=cfg.seed,
        train_shards=tuple(real_shards(ctx, "train")), val_shards=tuple(real_shards(ctx, "val")),
        num_train=meta["counts"]["train"], loader=cfg.data.loader, num_workers=cfg.data.num_workers,
        eval_batch_size=cfg.eval.batch_size, mean=tuple(cfg.data.mean), std=tuple(cfg.data.std),
    )


def launch(ctx: RunContext, fn: Callable[[JobSpec], dict[str, Any]], spec: JobSpec, workers: int) -> dict[str, Any]:
    """Run the DDP job `fn(spec)` on `workers` ranks (0 = one per GPU) through the run's executor.

    The executor decides how (Ray Train on a Ray cluster, local processes otherwise). A context without
    one (a stage worker used directly, outside the runner) gets the local launcher, like `run_pipeline`.
    """
    from pipeline.run.executors import LocalExecutor

    executor = ctx.executor if ctx.executor is not None else LocalExecutor()
    return executor.launch_ddp(fn, spec, workers)


def run_teacher(ctx: RunContext, device: Any) -> Any:
    """The teacher written by this run's squeeze stage, frozen on `device`."""
    from pipeline.train.trainloop import load_teacher

    return load_teacher(ctx.config.squeeze.arch, real_meta(ctx)["num_classes"], ctx.config.data.resolution,
                        ctx.path(TEACHER), device)


def recover_index_paths(ctx: RunContext) -> list[str]:
    """The synthetic set's parquet indexes in image-id order (`pipeline.data.synthetic.synthetic_index_paths`)."""
    from pipeline.data.synthetic import synthetic_index_paths

    return [str(p) for p in synthetic_index_paths(ctx.run_dir, ctx.store.records("recover"))]


def check_file(path: Path, what: str) -> None:
    if not Path(path).is_file():
        raise ConfigError(f"{what} not found: {path}")


def digest_of(payload: Any) -> str:
    """16 hex digits of the sha256 of `payload` as sorted JSON: the key of a shared cache folder."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def outputs_digest(ctx: RunContext, stage: str) -> str:
    """A digest of the sha256 of every file the stage's current records name (the shards, the teacher)."""
    shas = sorted(o.sha256 for r in ctx.store.records(stage) if r.config_hash == ctx.hashes[stage] for o in r.outputs)
    return digest_of(shas)


def expert_spec(ctx: RunContext) -> Any:
    """How each expert is trained (`pipeline.train.experts.ExpertSpec`), from the experts section."""
    from pipeline.train.experts import ExpertSpec, PadSchedule

    e, meta = ctx.config.experts, real_meta(ctx)
    pad = None
    if e.schedule == "pad":
        pad = PadSchedule(init_ratio=e.pad_init_ratio, add_end_epoch=e.pad_add_end_epoch,
                          remove_start_epoch=e.pad_remove_epochs[0], remove_ratio_1=e.pad_remove_ratios[0],
                          remove_second_epoch=e.pad_remove_epochs[1], remove_ratio_2=e.pad_remove_ratios[1])
    return ExpertSpec(arch=e.arch, num_classes=meta["num_classes"], resolution=ctx.config.data.resolution,
                      epochs=e.epochs, batch_size=e.batch_size, lr=e.lr, momentum=e.momentum,
                      weight_decay=e.weight_decay, dsa_strategy="" if e.dsa_strategy == "none" else e.dsa_strategy,
                      seed=e.seed, pad=pad)


def train_split(ctx: RunContext, device: Any) -> tuple[Any, Any, list[int]]:
    """The real training split less the holdout slice: normalized images [N, 3, R, R] on `device`, labels [N] and
    the index row of each image."""
    from pipeline.core.imageops import normalize
    from pipeline.data.holdout import HoldoutSpec
    from pipeline.train.full_real import load_train_split

    names = real_meta(ctx)["shards"]["train"]
    holdout = HoldoutSpec(str(ctx.path("real")), tuple(str(ctx.path("real", f"{n}.parquet")) for n in names),
                          ctx.config.eval.holdout_fraction, ctx.config.data.shuffle_seed)
    raw, labels, rows = load_train_split(holdout, ctx.config.data.resolution)
    x = normalize(raw.float().div_(255.0), ctx.config.data.mean, ctx.config.data.std).to(device)
    return x, labels, rows
