"""Experts: the trajectories of trajectory matching, `experts.num` networks trained from scratch on the real
training split (the holdout slice left out), their parameters kept at every epoch (`pipeline.train.experts`).

The stage runs only when the recover method needs trajectories (a method's `Needs(artifacts=("trajectories",))`):
for any other method it plans no unit and writes nothing. One unit per expert on the executor's actors (a CPU or
one GPU each). A unit saves its state after every epoch (`<key>/expert-NNNN.partial.pt`: the network, the
optimizer and the snapshots so far) and resumes from it; the finished trajectory is written atomically and the
partial file deleted. The files live in a folder keyed by everything they depend on (this stage's config hash,
which covers ingest's, and the digests of the shards; with the pad schedule the teacher's per-sample
statistics), under `experts.dir` (default RUN_DIR/experts): runs on the same data with the same expert settings
share them, whatever their method, IPC or run seed, and a unit whose file is already there and readable only
reads it back (`cached`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.core.errors import ConfigError
from pipeline.core.seeding import torch_threads
from pipeline.run.base import RunContext, Stage, Unit, UnitResult
from pipeline.run.graph import register_stage
from pipeline.run.stages.common import (
    SAMPLE_STATS,
    check_file,
    digest_of,
    expert_spec,
    outputs_digest,
    real_meta,
    train_split,
)

log = logging.getLogger(__name__)

TRAJECTORIES = "trajectories"  # the artifact name methods declare in `Needs(artifacts=...)`
UNIT_THREADS = 1  # torch CPU threads per unit: the same bytes on any worker (see the recover stage)


def needs_trajectories(cfg: Any) -> bool:
    from pipeline.methods import get_method

    return TRAJECTORIES in get_method(cfg.recover.method).needs.artifact_names()


def experts_folder(ctx: RunContext) -> Path:
    """The keyed folder of this run's experts."""
    root = Path(ctx.config.experts.dir).expanduser() if ctx.config.experts.dir else ctx.path("experts")
    inputs = {"ingest": outputs_digest(ctx, "ingest")}
    source = difficulty_source(ctx.config)
    if source == "squeeze":
        from manifests.digest import file_digest

        inputs["sample-stats"] = file_digest(ctx.path(SAMPLE_STATS))[0]
    elif source == "difficulty":
        inputs["el2n"] = outputs_digest(ctx, "difficulty")
    return root / f"experts-{digest_of({'hash': ctx.hashes['experts'], 'inputs': inputs})}"


def difficulty_source(cfg: Any) -> str:
    """The stage whose outputs order PAD's schedule: difficulty (EL2N), squeeze (the teacher's loss), or ''."""
    if cfg.experts.schedule != "pad":
        return ""
    return "difficulty" if cfg.experts.difficulty == "el2n" else "squeeze"


def trajectory_meta(ctx: RunContext) -> dict[str, Any]:
    """What a trajectory file says about its network (checked by the reader)."""
    return {"arch": ctx.config.experts.arch, "num_classes": real_meta(ctx)["num_classes"],
            "resolution": ctx.config.data.resolution}


def trajectory_reader(ctx: RunContext) -> Any:
    """The run's experts as a `TrajectoryReader` (what a method gets from `env.artifact("trajectories")`)."""
    from pipeline.data.trajectories import TrajectoryReader

    paths = [Path(o.uri) if Path(o.uri).is_absolute() else ctx.path(o.uri)
             for r in sorted(ctx.store.records(ExpertsStage.name), key=lambda r: r.unit)
             if r.config_hash == ctx.hashes[ExpertsStage.name] and r.status == "done" for o in r.outputs]
    if len(paths) != ctx.config.experts.num:
        raise ConfigError(f"the experts stage has {len(paths)} of {ctx.config.experts.num} trajectories: run it "
                          "first (distill run --stages experts)")
    return TrajectoryReader(paths, ctx.config.experts.epochs, trajectory_meta(ctx), cache=ctx.config.experts.cache)


class ExpertsStage(Stage):
    name = "experts"
    depends_on = ("ingest", "squeeze", "difficulty")
    # not the run seed: runs with other seeds share the experts (experts.seed seeds them)
    sections = ("experts", "eval.holdout_fraction", "data.shuffle_seed", "data.resolution", "data.mean", "data.std")
    distributed = True
    needs_gpu = True

    def dependencies(self, cfg: Any) -> tuple[str, ...]:
        """Ingest's shards; with the pad schedule also what orders it: the EL2N scores (difficulty) or the
        teacher's per-sample statistics (squeeze)."""
        return (difficulty_source(cfg) or "ingest",)

    def read_stages(self, ctx: RunContext) -> tuple[str, ...]:
        source = difficulty_source(ctx.config)
        return ("ingest", source) if source else ("ingest",)

    def validate(self, ctx: RunContext) -> None:
        if not needs_trajectories(ctx.config):
            return
        if difficulty_source(ctx.config) == "squeeze":
            check_file(ctx.path(SAMPLE_STATS), "the teacher's per-sample statistics, which order the data of "
                       "experts.schedule=pad (train the teacher here with squeeze.sample_stats=true)")

    def plan(self, ctx: RunContext) -> list[Unit]:
        if not needs_trajectories(ctx.config):
            return []
        return [Unit(f"expert-{i:04d}", {"index": i}) for i in range(ctx.config.experts.num)]

    def open_worker(self, ctx: RunContext) -> ExpertsWorker:
        return ExpertsWorker(ctx)

    def finalize(self, ctx: RunContext) -> dict[str, Any]:
        recs = [r for r in ctx.store.records(self.name) if r.config_hash == ctx.hashes[self.name]]
        if not recs:
            return {"experts": 0}
        return {"experts": len(recs), "folder": str(experts_folder(ctx)),
                "bytes": sum(o.bytes for r in recs for o in r.outputs),
                "cached": sum(1 for r in recs if r.metrics.get("cached")),
                "unit_seconds": round(sum(r.metrics.get("seconds", 0.0) for r in recs), 2)}


class ExpertsWorker:
    """Trains experts on one actor; the training images are decoded once per worker."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.folder = experts_folder(ctx)
        self._data: tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]] | None = None

    def data(self) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(normalized images [N, 3, R, R] on the device, labels [N], per class the positions of its images in
        easiest-first order under the pad schedule (by EL2N or the teacher's mean loss), else index order)."""
        if self._data is None:
            ctx = self.ctx
            x, labels, rows = train_split(ctx, self.device)
            score = torch.zeros(len(rows))
            if difficulty_source(ctx.config) == "difficulty":
                from pipeline.run.stages.difficulty import read_el2n

                score = read_el2n(ctx, rows)
            elif difficulty_source(ctx.config) == "squeeze":
                score = self._difficulty(rows)
            easy_first = []
            for c in range(real_meta(ctx)["num_classes"]):
                pos = (labels == c).nonzero().flatten()
                easy_first.append(pos[torch.sort(score[pos], stable=True).indices])
            self._data = (x, labels, easy_first)
        return self._data

    def _difficulty(self, rows: list[int]) -> torch.Tensor:
        """The teacher's mean cross-entropy over the last squeeze.stats_window epochs, per training row."""
        from pipeline.data.shards import read_index
        from pipeline.train.sample_stats import read_sample_stats

        ctx = self.ctx
        names = real_meta(ctx)["shards"]["train"]
        keys = read_index([ctx.path("real", f"{n}.parquet") for n in names]).column("key").to_pylist()
        table = read_sample_stats(ctx.path(SAMPLE_STATS), keys)
        loss = torch.tensor(table.column("loss_label_mean").to_numpy())
        return loss[torch.tensor(rows)]

    def run(self, unit: Unit) -> UnitResult:
        from pipeline.data.trajectories import expert_name, layout, read_trajectory, write_trajectory
        from pipeline.train.experts import train_expert
        from pipeline.train.trainloop import save_atomic

        ctx, index = self.ctx, int(unit.payload["index"])
        path = self.folder / expert_name(index)
        t0 = time.time()
        if path.is_file():
            try:
                read_trajectory(path)
                return UnitResult(outputs=[ctx.ref(path)], metrics={"cached": True, "seconds": 0.0,
                                                                    "folder": str(self.folder)})
            except ValueError as exc:
                log.warning("experts: %s; training it again", exc)
        self.folder.mkdir(parents=True, exist_ok=True)
        spec = expert_spec(ctx)
        partial = path.with_name(path.stem + ".partial.pt")
        tag = self.folder.name
        state = None
        if partial.is_file():
            try:
                saved = torch.load(partial, map_location="cpu", weights_only=True)
                state = saved["state"] if saved.get("tag") == tag else None
            except Exception as exc:  # a damaged checkpoint costs the epochs since the start, nothing else
                log.warning("experts: %s cannot be read (%s); expert %d starts over", partial, exc, index)
        resumed_at = int(state["epoch"]) if state else 0
        prior = float(state.get("seconds", 0.0)) if state else 0.0

        def save(st: dict[str, Any]) -> None:
            save_atomic({"tag": tag, "state": {**st, "seconds": prior + time.time() - t0}}, partial)

        with torch_threads(UNIT_THREADS):
            x, labels, easy_first = self.data()
            state = train_expert(spec, index, x, labels, easy_first, self.device, state, on_epoch=save)
            names, shapes = layout(state["network"])
        write_trajectory(path, torch.stack(state["snapshots"]), {**trajectory_meta(ctx), "index": index,
                                                                   "epochs": spec.epochs}, names, shapes)
        partial.unlink(missing_ok=True)
        seconds = prior + time.time() - t0
        images = sum(h["images"] for h in state["history"])
        metrics = {"cached": False, "seconds": round(seconds, 3), "device": self.device.type, "epochs": spec.epochs,
                   "images_trained": images, "final_train_acc": state["history"][-1]["train_acc"],
                   "final_loss": state["history"][-1]["loss"], "folder": str(self.folder),
                   **({"resumed_at_epoch": resumed_at} if resumed_at else {}),
                   "images_per_s": round(images / seconds, 2) if seconds > 0 else None}
        return UnitResult(outputs=[ctx.ref(path)], metrics=metrics)

    def close(self) -> None:
        self._data = None


STAGE = register_stage(ExpertsStage())
