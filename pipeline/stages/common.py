"""Helpers shared by the stages: real-data metadata, job launching, common job arguments."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError
from pipeline.stages.base import RunContext

TEACHER = "checkpoints/teacher.pt"
STUDENT = "checkpoints/student.pt"


def real_meta(ctx: RunContext) -> dict[str, Any]:
    path = ctx.path("real", "classes.json")
    if not path.exists():
        raise ConfigError(f"{path} is missing: run the ingest stage first")
    return json.loads(path.read_text())


def real_shards(ctx: RunContext, split: str) -> list[str]:
    return [str(ctx.path("real", f"{name}.tar")) for name in real_meta(ctx)["shards"][split]]


def data_args(ctx: RunContext) -> dict[str, Any]:
    """Arguments every DDP job needs for the real data (plain types: they cross process boundaries)."""
    cfg = ctx.config
    meta = real_meta(ctx)
    return {
        "num_classes": meta["num_classes"], "resolution": cfg.data.resolution, "seed": cfg.seed,
        "train_shards": real_shards(ctx, "train"), "val_shards": real_shards(ctx, "val"),
        "num_train": meta["counts"]["train"], "loader": cfg.data.loader, "num_workers": cfg.data.num_workers,
        "eval_batch_size": cfg.eval.batch_size, "mean": list(cfg.data.mean), "std": list(cfg.data.std),
    }


def launch(ctx: RunContext, fn: Any, args: dict[str, Any], workers: int) -> dict[str, Any]:
    """Run a DDP job function on `workers` ranks (Ray Train in a Ray run, local processes otherwise)."""
    from workers.ray_train import launch_ddp

    return launch_ddp(fn, args, workers, ctx.config)


def run_teacher(ctx: RunContext, device: Any) -> Any:
    """The teacher written by this run's squeeze stage, frozen on `device`."""
    from pipeline.trainloop import load_teacher

    return load_teacher(ctx.config.squeeze.arch, real_meta(ctx)["num_classes"], ctx.config.data.resolution,
                        ctx.path(TEACHER), device)


def recover_index_paths(ctx: RunContext) -> list[str]:
    recs = sorted(ctx.store.records("recover"), key=lambda r: r.unit)
    return [str(ctx.path(o.uri)) for r in recs for o in r.outputs if o.uri.endswith(".parquet")]


def check_file(path: Path, what: str) -> None:
    if not Path(path).is_file():
        raise ConfigError(f"{what} not found: {path}")
