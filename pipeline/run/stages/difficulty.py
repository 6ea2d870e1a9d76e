"""Difficulty: the per-sample scores that order PAD's easy-first experts schedule (`experts.schedule = pad` with
`experts.difficulty = el2n`, the default).

PAD (github.com/NUS-HPC-AI-Lab/PAD) reads a precomputed GraNd or uncertainty ranking from DeepCore. This stage
computes EL2N (Paul, Ganguli, Dziugaite, "Deep Learning on a Data Diet: Finding Important Examples Early in
Training", NeurIPS 2021), their cheap stand-in for GraNd: `experts.el2n_networks` networks of the experts'
architecture and optimizer, each trained `experts.el2n_epoch` epochs on the training split (the holdout slice left
out; Paul et al.: 10 networks, epoch 20 on CIFAR-10), then per image the norm of softmax(f(x)) - onehot(y), averaged
over the networks by the experts stage. One unit per network; nothing is planned for any other configuration.
`experts.difficulty = teacher-loss` uses the squeeze teacher's per-sample loss instead (no units here).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from pipeline.core.seeding import derive_seed, torch_threads
from pipeline.run.base import RunContext, Stage, Unit, UnitResult
from pipeline.run.graph import register_stage
from pipeline.run.stages.common import expert_spec, train_split

log = logging.getLogger(__name__)

SCORES_DIR = "checkpoints/difficulty"
UNIT_THREADS = 1  # the same bytes on any worker (see the recover stage)


def scores_wanted(cfg: Any) -> bool:
    """EL2N scores are computed: the method needs trajectories, PAD's schedule, EL2N difficulty."""
    from pipeline.methods import get_method

    e = cfg.experts
    return ("trajectories" in get_method(cfg.recover.method).needs.artifact_names() and e.schedule == "pad"
            and e.difficulty == "el2n")


def read_el2n(ctx: RunContext, rows: list[int]) -> torch.Tensor:
    """The mean EL2N of the stage's current outputs, for `rows` (index rows of the training split)."""
    h = ctx.hashes[DifficultyStage.name]
    files = [ctx.path(o.uri) for r in ctx.store.records(DifficultyStage.name) if r.config_hash == h
             and r.status == "done" for o in r.outputs]
    if not files:
        raise ValueError("the difficulty stage has no EL2N scores: run it first (distill run --stages difficulty)")
    total: torch.Tensor | None = None
    for f in files:
        obj = torch.load(f, map_location="cpu", weights_only=True)
        if obj["rows"].tolist() != list(rows):
            raise ValueError(f"{f}: its rows are not this training split's; rerun the difficulty stage")
        total = obj["el2n"].double() if total is None else total + obj["el2n"].double()
    assert total is not None
    return (total / len(files)).float()


class DifficultyStage(Stage):
    name = "difficulty"
    depends_on = ("ingest",)
    sections = ("experts.difficulty", "experts.el2n_networks", "experts.el2n_epoch", "experts.arch", "experts.lr",
                "experts.momentum", "experts.weight_decay", "experts.batch_size", "experts.dsa_strategy",
                "experts.seed", "eval.holdout_fraction", "data.shuffle_seed", "data.resolution", "data.mean",
                "data.std")
    distributed = True
    needs_gpu = True
    output_dirs = (SCORES_DIR,)

    def plan(self, ctx: RunContext) -> list[Unit]:
        if not scores_wanted(ctx.config):
            return []
        return [Unit(f"el2n-{k:03d}", {"network": k}) for k in range(ctx.config.experts.el2n_networks)]

    def open_worker(self, ctx: RunContext) -> DifficultyWorker:
        return DifficultyWorker(ctx)


class DifficultyWorker:
    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._data: tuple[torch.Tensor, torch.Tensor, list[int]] | None = None

    def run(self, unit: Unit) -> UnitResult:
        import dataclasses

        from pipeline.train.experts import train_expert
        from pipeline.train.trainloop import save_atomic

        ctx, k = self.ctx, int(unit.payload["network"])
        e = ctx.config.experts
        t0 = time.time()
        with torch_threads(UNIT_THREADS):
            if self._data is None:
                self._data = train_split(ctx, self.device)
            x, labels, rows = self._data
            spec = dataclasses.replace(expert_spec(ctx), epochs=e.el2n_epoch, pad=None,
                                       seed=derive_seed(e.seed, "el2n"))  # not the experts' own inits
            every = [torch.arange(len(labels))]
            state = train_expert(spec, k, x, labels, every, self.device)
            model = state["network"].eval()
            with torch.no_grad():
                probs = torch.cat([model(x[i:i + 512]).float().softmax(1) for i in range(0, len(x), 512)]).cpu()
            el2n = (probs - torch.nn.functional.one_hot(labels, probs.shape[1]).float()).norm(dim=1)
        path = ctx.path(SCORES_DIR, f"{unit.key}.pt")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_atomic({"rows": torch.tensor(rows), "el2n": el2n}, path)
        seconds = time.time() - t0
        return UnitResult(outputs=[ctx.ref(path)], metrics={
            "seconds": round(seconds, 3), "device": self.device.type, "epochs": e.el2n_epoch,
            "train_acc": state["history"][-1]["train_acc"] if state["history"] else None,
            "el2n_mean": round(float(el2n.mean()), 5)})

    def close(self) -> None:
        self._data = None


STAGE = register_stage(DifficultyStage())
