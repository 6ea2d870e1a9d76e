"""The runner on a toy stage graph, in process and in seconds: skip what is done, refuse a changed config
naming the stage unless fresh, the hash chain, the order derived from `depends_on`; and the checkpoint
round trip through which the DDP jobs resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from pipeline.config import Config, ConfigError
from pipeline.run.base import RunContext, Stage, Unit, UnitResult
from pipeline.run.graph import StageGraph, stage_order, topological_order
from pipeline.run.runner import compute_hashes, run_pipeline

RAN: list[str] = []  # "stage/unit" of every unit run, in order (the toy workers run in this process)


class FileWorker:
    """Writes one file per unit under RUN_DIR/<stage>/ (the stage's output folder)."""

    def __init__(self, ctx: RunContext, stage: str) -> None:
        self.ctx, self.stage = ctx, stage

    def run(self, unit: Unit) -> UnitResult:
        path = self.ctx.path(self.stage, f"{unit.key}.txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{self.stage} {unit.key} shard_size={self.ctx.config.data.shard_size}")
        RAN.append(f"{self.stage}/{unit.key}")
        return UnitResult(outputs=[self.ctx.ref(path)], metrics={"bytes": path.stat().st_size})

    def close(self) -> None:
        pass


class FileStage(Stage):
    """A distributed toy stage of two units, hashed over the given config sections."""

    distributed = True

    def __init__(self, name: str, sections: tuple[str, ...], depends_on: tuple[str, ...] = ()) -> None:
        self.name, self.sections, self.depends_on, self.output_dirs = name, sections, depends_on, (name,)

    def plan(self, ctx: RunContext) -> list[Unit]:
        return [Unit("a"), Unit("b")]

    def open_worker(self, ctx: RunContext) -> FileWorker:
        return FileWorker(ctx, self.name)


UP = FileStage("up", ("data",))
DOWN = FileStage("down", ("train",), depends_on=("up",))
GRAPH = StageGraph.of([DOWN, UP])  # given out of order on purpose: the graph sorts by depends_on


def _cfg(shard_size: int = 100, epochs: int = 3) -> Config:
    cfg = Config()
    cfg.data.shard_size, cfg.train.epochs = shard_size, epochs
    return cfg


def _run(cfg: Config, run_dir: Path, **kw: Any) -> RunContext:
    return run_pipeline(cfg, run_dir, progress=False, graph=GRAPH, **kw)


@pytest.fixture(autouse=True)
def _clear_ran() -> None:
    RAN.clear()


def test_a_second_run_skips_every_done_unit(tmp_path: Path) -> None:
    ctx = _run(_cfg(), tmp_path / "run")
    assert RAN == ["up/a", "up/b", "down/a", "down/b"]  # upstream first, although given second
    assert sorted(r.unit for r in ctx.store.records("down")) == ["a", "b"]
    assert (tmp_path / "run" / "up" / "b.txt").read_text() == "up b shard_size=100"
    assert ctx.store.load("down", "_stage").metrics["ran"] == 2
    again = _run(_cfg(), tmp_path / "run")
    assert RAN == ["up/a", "up/b", "down/a", "down/b"]  # nothing ran again
    assert again.run_id == ctx.run_id
    assert again.store.load("up", "_stage").metrics["ran"] == 0
    assert again.store.load("down", "_stage").metrics["ran"] == 0


def test_a_changed_config_is_refused_naming_the_stage_unless_fresh(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _run(_cfg(), run_dir)
    RAN.clear()
    with pytest.raises(ConfigError, match=r"another configuration for stage\(s\) down;") as err:
        _run(_cfg(epochs=4), run_dir)  # `train` is hashed by `down` only
    assert "--fresh" in str(err.value) and RAN == []
    (run_dir / "down" / "left-over.txt").write_text("from the old configuration")
    ctx = _run(_cfg(epochs=4), run_dir, fresh=True)
    assert RAN == ["down/a", "down/b"]  # the changed stage is recomputed, its upstream kept
    assert not (run_dir / "down" / "left-over.txt").exists()  # its output folder was discarded
    assert {r.config_hash for r in ctx.store.records("down")} == {ctx.hashes["down"]}
    RAN.clear()
    with pytest.raises(ConfigError, match=r"stage\(s\) up, down;"):  # both changed: named in run order
        _run(_cfg(shard_size=7, epochs=4), run_dir)
    _run(_cfg(shard_size=7, epochs=4), run_dir, fresh=True)
    assert RAN == ["up/a", "up/b", "down/a", "down/b"]
    assert (run_dir / "up" / "a.txt").read_text() == "up a shard_size=7"


def test_the_hash_chain_carries_upstream_changes_downstream() -> None:
    base = compute_hashes(_cfg(), GRAPH)
    data = compute_hashes(_cfg(shard_size=7), GRAPH)
    train = compute_hashes(_cfg(epochs=4), GRAPH)
    assert data["up"] != base["up"] and data["down"] != base["down"]  # through `down`'s upstream hash
    assert train["up"] == base["up"] and train["down"] != base["down"]
    assert compute_hashes(_cfg(), GRAPH) == base  # deterministic
    # the pipeline's own chain: recover settings invalidate recover and everything after it
    cfg = Config()
    before = compute_hashes(cfg)
    cfg.recover.ipc += 1
    after = compute_hashes(cfg)
    assert [s for s in stage_order() if before[s] != after[s]] == ["recover", "relabel", "train", "baseline",
                                                                    "evaluate"]  # the baselines at the same IPC
    # a method's own settings leave the baselines alone; the baselines list leaves the students alone
    cfg.recover.dwa.iterations += 1
    again = compute_hashes(cfg)
    assert [s for s in stage_order() if after[s] != again[s]] == ["recover", "relabel", "train", "evaluate"]
    cfg.eval.baselines = []
    last = compute_hashes(cfg)
    assert [s for s in stage_order() if again[s] != last[s]] == ["baseline", "evaluate"]


def test_stage_order_is_derived_from_depends_on() -> None:
    assert stage_order() == ("ingest", "squeeze", "difficulty", "experts", "recover", "relabel", "train", "baseline",
                             "evaluate")
    assert GRAPH.names == ("up", "down")
    assert GRAPH.select(["down", "up"]) == ["up", "down"] and GRAPH.select(None) == ["up", "down"]
    with pytest.raises(ConfigError, match="unknown stage.*sideways.*stages are up, down"):
        GRAPH.select(["sideways"])
    # stable: independent stages keep the order they are given in
    side = FileStage("side", ("eval",))
    assert [s.name for s in topological_order([DOWN, side, UP])] == ["side", "up", "down"]
    with pytest.raises(ValueError, match="cycle"):
        topological_order([FileStage("x", (), ("y",)), FileStage("y", (), ("x",))])
    with pytest.raises(ValueError, match="depends on unknown stage"):
        topological_order([DOWN])


# ----------------------------------------------------------------------------- checkpoint round trip


def _train_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    x = torch.randn(8, 4)
    loss = model(x).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _setup(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    from pipeline.train.optim import cosine_schedule

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    return model, opt, cosine_schedule(opt, 10, warmup_epochs=2)


def _same(a: Any, b: Any) -> bool:
    """Equal nested state (dicts, lists, tensors bit for bit, numbers)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def test_checkpoint_resumes_model_optimizer_scheduler_epoch_and_rng(tmp_path: Path) -> None:
    from pipeline.train.trainloop import resume, save_checkpoint

    path = tmp_path / "last.pt"
    model, opt, sched = _setup(0)
    for _ in range(3):  # epochs 0, 1, 2
        _train_step(model, opt)
        sched.step()
    save_checkpoint(path, model, opt, sched, 2, "hash-a", history=[{"epoch": 2}])
    _train_step(model, opt)  # what epoch 3 does in the uninterrupted run
    sched.step()

    other, other_opt, other_sched = _setup(1)  # a restarted job: other weights, fresh optimizer, other RNG
    assert resume(tmp_path / "missing.pt", "hash-a", other, other_opt, other_sched, "test") is None
    untouched = {k: v.clone() for k, v in other.state_dict().items()}
    assert resume(path, "hash-b", other, other_opt, other_sched, "test") is None  # another config: ignored
    assert _same(other.state_dict(), untouched) and other_opt.state_dict()["state"] == {}

    ckpt = resume(path, "hash-a", other, other_opt, other_sched, "test")
    assert ckpt is not None and ckpt["epoch"] == 2 and ckpt["history"] == [{"epoch": 2}]
    saved = torch.load(path, weights_only=True)
    assert _same(other.state_dict(), saved["model"])
    assert _same(other_opt.state_dict(), saved["optimizer"])  # momentum buffers and step counts
    assert other_sched.state_dict() == saved["scheduler"] and other_sched.last_epoch == 3
    _train_step(other, other_opt)  # epoch 3 again, after the resume: the RNG state was restored too
    other_sched.step()
    assert _same(other.state_dict(), model.state_dict())
    assert _same(other_opt.state_dict(), opt.state_dict())
    assert other_sched.state_dict() == sched.state_dict()
