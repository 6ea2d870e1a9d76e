"""Baseline: the same evaluation for random real images and for all real images, in the same run.

- `random-real`: a run of its own (recover with `random-real` at the same IPC, relabel with the same teacher,
  the same student matrix, evaluate) in a folder under `eval.baseline_dir` (default RUN_DIR/baselines). Its
  ingest and squeeze are this run's: the folder links `real/` and the teacher files and carries copies of
  their records, refreshed on every run, so its own runner verifies them like any inputs. The folder's name is
  a key of everything its results depend on (its stage hashes, the shards' and the teacher's digests), so runs
  of different methods on the same data and teacher share one when they share `eval.baseline_dir`; two drivers
  wanting the same folder take turns (its run lock).
- `full-real`: per hard cell of the matrix (student, seed), a student trained on all real training images
  (less the holdout slice) under the hard protocol (`pipeline.train.full_real`), cached by key in
  `eval.baseline_dir/full-real`.

The units run in the driver: the random-real run sends its own units through this run's executor. Their
records hold the baselines' cells (what the evaluate stage reads); the files live in the baseline folders,
which have their own manifests.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from manifests.store import STAGE_RECORD
from pipeline.run.base import RunContext, Stage, Unit, UnitResult
from pipeline.run.graph import pipeline_graph, register_stage
from pipeline.run.stages.common import SAMPLE_STATS, TEACHER, Cell, data_spec, digest_of, matrix, outputs_digest

log = logging.getLogger(__name__)

RANDOM_REAL = "random-real"
FULL_REAL = "full-real"
CHILD_STAGES = ("recover", "relabel", "train", "baseline", "evaluate")  # its baseline stage: no units
SHARED_STAGES = ("ingest", "squeeze")  # whose records and files the random-real run takes from this run


def baseline_root(ctx: RunContext) -> Path:
    return Path(ctx.config.eval.baseline_dir).expanduser() if ctx.config.eval.baseline_dir else ctx.path("baselines")


def random_real_config(ctx: RunContext) -> Any:
    """This run's config with recover.method = random-real and no baselines of its own. Its hard-label students get
    the augmentation the method's own get (`train.hard_augment=auto` resolved for the method, and its DSA strategy):
    random real images under the same protocol, not under random-real's `auto` (none)."""
    from pipeline.run.stages.train import hard_spec

    cfg = ctx.config
    train = cfg.train
    spec = hard_spec(ctx, from_set=False)
    if cfg.train.hard_augment == "auto" and spec.dsa_strategy:  # else random-real's own auto (none) is the same
        train = dataclasses.replace(train, hard_augment="dsa", hard_dsa_strategy=spec.dsa_strategy)
    return dataclasses.replace(cfg, recover=dataclasses.replace(cfg.recover, method=RANDOM_REAL),
                               eval=dataclasses.replace(cfg.eval, baselines=[]), train=train)


def random_real_dir(ctx: RunContext) -> Path:
    hashes = pipeline_graph().hashes(random_real_config(ctx))
    key = digest_of({"hashes": {s: hashes[s] for s in CHILD_STAGES},
                   "inputs": {s: outputs_digest(ctx, s) for s in SHARED_STAGES}})
    return baseline_root(ctx) / f"{RANDOM_REAL}-{key}"


def _link(target: Path, link: Path) -> None:
    """`link` -> `target` (absolute), replacing whatever is there."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)
    link.symlink_to(target.resolve())


def share_upstream(ctx: RunContext, child: Path) -> None:
    """Give the random-real run this run's ingest and squeeze: links to the files, copies of the records."""
    _link(ctx.path("real"), child / "real")
    for rel in (TEACHER, SAMPLE_STATS):
        if ctx.path(rel).is_file():
            _link(ctx.path(rel), child / rel)
    for stage in SHARED_STAGES:
        src, dst = ctx.store.root / stage, child / "manifests" / stage
        shutil.rmtree(dst, ignore_errors=True)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.failed.json", "*.tmp*"))


def full_real_cells(ctx: RunContext) -> list[Cell]:
    """The matrix's hard cells: the full-real reference is trained for each (student, seed)."""
    return [c for c in matrix(ctx.config) if c.protocol == "hard"]


def full_real_job(ctx: RunContext, cell: Cell) -> Any:
    from pipeline.data.holdout import HoldoutSpec
    from pipeline.run.stages.train import hard_spec, holdout_spec
    from pipeline.train.full_real import FullRealJob
    from pipeline.train.jobs import cell_seed

    spec = hard_spec(ctx, cell.student, from_set=False)
    if ctx.config.eval.full_real_epochs:
        spec = dataclasses.replace(spec, epochs=ctx.config.eval.full_real_epochs)
    holdout = holdout_spec(ctx) or HoldoutSpec(str(ctx.path("real")), (), 0.0, 0)
    if not holdout.index_paths:  # no slice: the index is still needed to read the images
        from pipeline.run.stages.common import real_meta

        names = real_meta(ctx)["shards"]["train"]
        holdout = dataclasses.replace(holdout, index_paths=tuple(str(ctx.path("real", f"{n}.parquet")) for n in names))
    job = FullRealJob(data=data_spec(ctx), holdout=holdout, hard=spec, seed=cell_seed(ctx.config.seed, cell.seed),
                      folder="")
    portable = {**job.key_payload(), "holdout": [holdout.fraction, holdout.seed]}
    key = digest_of({"job": portable, "shards": outputs_digest(ctx, "ingest")})
    return dataclasses.replace(job, folder=str(baseline_root(ctx) / FULL_REAL / f"{cell.student}-s{cell.seed}-{key}"))


class BaselineStage(Stage):
    name = "baseline"
    depends_on = ("squeeze",)
    # what the random-real run and the full-real students depend on besides the upstream stages
    sections = ("seed", "recover.ipc", "recover.classes_per_shard", "recover.ipc_per_unit", "relabel", "train",
                "eval.every", "eval.protocols", "eval.students", "eval.seeds", "eval.holdout_fraction", "eval.select",
                "eval.baselines", "eval.full_real_epochs", "data.shuffle_seed")

    def plan(self, ctx: RunContext) -> list[Unit]:
        wanted = ctx.config.eval.baselines
        units = []
        if RANDOM_REAL in wanted and ctx.config.recover.method != RANDOM_REAL:
            units.append(Unit(RANDOM_REAL))
        if FULL_REAL in wanted:
            units += [Unit(f"{FULL_REAL}-{c.student}-s{c.seed}", c.as_dict()) for c in full_real_cells(ctx)]
        return units

    def open_worker(self, ctx: RunContext) -> BaselineWorker:
        return BaselineWorker(ctx)


class BaselineWorker:
    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def run(self, unit: Unit) -> UnitResult:
        if unit.key == RANDOM_REAL:
            return UnitResult(metrics=self._random_real())
        from pipeline.train.full_real import train_full_real

        cell = Cell(**unit.payload)
        result = train_full_real(full_real_job(self.ctx, cell))
        return UnitResult(metrics={"cells": [{**cell.as_dict(), **{k: result.get(k) for k in (
            "top1", "top5", "epochs", "num_images", "images_per_s", "cached")}}]})

    def _random_real(self) -> dict[str, Any]:
        ctx = self.ctx
        run_pipeline = ctx.run_pipeline
        if run_pipeline is None:
            raise RuntimeError("the random-real baseline runs a pipeline of its own: run it through the runner, "
                               "which hands the stage `run_pipeline`")
        child = random_real_dir(ctx)
        child.mkdir(parents=True, exist_ok=True)
        share_upstream(ctx, child)
        run_pipeline(random_real_config(ctx), child, stages=list(CHILD_STAGES), executor=ctx.executor,
                     progress=False, on_busy=lambda who: log.info(
                         "baseline random-real: %s is busy (another run is making it: %s); waiting", child, who))
        summary = json.loads((child / "results" / "summary.json").read_text())
        try:
            where = os.path.relpath(child, ctx.run_dir)
        except ValueError:  # another drive (Windows)
            where = str(child)
        return {"run_dir": where, "cells": summary.get("cells", []), "cost": summary.get("cost"),
                "recover_wall_s": (summary.get("wall_s") or {}).get("recover")}

    def close(self) -> None:
        pass


def baseline_results(ctx: RunContext) -> dict[str, Any]:
    """The summary's `baselines`: {"random-real": {"cells", "run_dir"}, "full-real": {"cells"}} from this stage's
    current records (a method that is random-real is its own random-real baseline: the caller fills that in)."""
    out: dict[str, Any] = {}
    h = ctx.hashes.get(BaselineStage.name)
    for rec in ctx.store.records(BaselineStage.name):
        if rec.unit == STAGE_RECORD or rec.config_hash != h or rec.status != "done":
            continue
        if rec.unit == RANDOM_REAL:
            out[RANDOM_REAL] = {k: rec.metrics.get(k) for k in ("cells", "run_dir", "cost")}
        else:
            out.setdefault(FULL_REAL, {"cells": []})["cells"].extend(rec.metrics.get("cells", []))
    if FULL_REAL in out:
        out[FULL_REAL]["cells"].sort(key=lambda c: (c["student"], c["seed"]))
    return out


STAGE = register_stage(BaselineStage())
