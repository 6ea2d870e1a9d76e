"""Executors: the in-process executor's retries, DDP launching as an executor capability reached through
`RunContext.executor` (never pickled), the factory, and the layering (`pipeline` never imports `workers`)."""

from __future__ import annotations

import ast
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline.commands.recipes import load_config
from pipeline.config import Config, ConfigError
from pipeline.run.base import Outcome, RunContext, Stage, Unit, UnitResult
from pipeline.run.executors import LocalExecutor
from pipeline.run.graph import StageGraph
from pipeline.run.runner import run_pipeline
from pipeline.run.stages.common import launch

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class EchoJob:
    """A job spec of the shape the real ones have: frozen, picklable."""

    value: int


def echo_job(spec: EchoJob) -> dict[str, Any]:
    from pipeline.train.ddp import dist_info

    rank, world, _ = dist_info()
    return {"value": spec.value, "rank": rank, "world": world}


class FlakyWorker:
    """Fails the first `fails` attempts of each unit; a unit with payload "usage" raises a ConfigError."""

    def __init__(self, fails: int) -> None:
        self.fails, self.tries = fails, {}

    def run(self, unit: Unit) -> UnitResult:
        if unit.payload.get("usage"):
            raise ConfigError(f"bad input in {unit.key}")
        self.tries[unit.key] = self.tries.get(unit.key, 0) + 1
        if self.tries[unit.key] <= self.fails:
            raise RuntimeError(f"flaky {unit.key}")
        return UnitResult(metrics={"tries": self.tries[unit.key]})

    def close(self) -> None:
        pass


class FlakyStage(Stage):
    name = "flaky"
    distributed = True

    def __init__(self, fails: int = 0, broken: bool = False) -> None:
        self.fails, self.broken = fails, broken

    def open_worker(self, ctx: RunContext) -> FlakyWorker:
        if self.broken:
            raise RuntimeError("cannot load the model")
        return FlakyWorker(self.fails)


def _ctx(tmp_path: Path, executor: Any = None) -> RunContext:
    return RunContext(run_dir=tmp_path, config=Config(), run_id="t", hashes={"flaky": "h"}, executor=executor)


def _collect(executor: LocalExecutor, stage: Stage, ctx: RunContext, units: list[Unit]) -> list[Outcome]:
    out: list[Outcome] = []
    executor.run_units(stage, ctx, units, out.append)
    return out


def test_local_executor_retries_up_to_max_attempts(tmp_path: Path) -> None:
    units = [Unit("u0"), Unit("u1")]
    ok = _collect(LocalExecutor(max_attempts=3), FlakyStage(fails=2), _ctx(tmp_path), units)
    assert [(o.unit.key, o.ok, o.attempt, o.result.metrics["tries"]) for o in ok] == [("u0", True, 3, 3),
                                                                                      ("u1", True, 3, 3)]
    failed = _collect(LocalExecutor(max_attempts=2), FlakyStage(fails=2), _ctx(tmp_path), units)
    assert [(o.ok, o.attempt) for o in failed] == [(False, 2), (False, 2)]  # one outcome per unit: the last
    assert "RuntimeError: flaky u0" in failed[0].error
    usage = _collect(LocalExecutor(max_attempts=3), FlakyStage(), _ctx(tmp_path), [Unit("bad", {"usage": True})])
    assert usage[0].attempt == 1 and usage[0].usage_error == "bad input in bad"  # bad input is not retried
    broken = _collect(LocalExecutor(), FlakyStage(broken=True), _ctx(tmp_path), units)
    assert len(broken) == 2 and all("cannot load the model" in o.error for o in broken)


def test_run_context_pickles_without_its_executor(tmp_path: Path) -> None:
    executor = LocalExecutor()
    ctx = _ctx(tmp_path, executor)
    copy = pickle.loads(pickle.dumps(ctx))
    assert copy.executor is None and ctx.executor is executor  # the original keeps it
    assert (copy.run_dir, copy.run_id, copy.hashes, copy.config) == (ctx.run_dir, ctx.run_id, ctx.hashes, ctx.config)


class RecordingExecutor(LocalExecutor):
    """The local executor, noting the DDP jobs it launches."""

    def __init__(self) -> None:
        super().__init__()
        self.jobs: list[tuple[Any, int]] = []

    def launch_ddp(self, fn: Any, spec: Any, workers: int) -> dict[str, Any]:
        self.jobs.append((spec, workers))
        return super().launch_ddp(fn, spec, workers)


class JobWorker:
    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def run(self, unit: Unit) -> UnitResult:
        return UnitResult(metrics=launch(self.ctx, echo_job, EchoJob(7), 1))

    def close(self) -> None:
        pass


class JobStage(Stage):
    """A driver-side stage (not distributed) whose one unit is a DDP job, like squeeze and train."""

    name = "job"
    sections = ("train",)

    def plan(self, ctx: RunContext) -> list[Unit]:
        return [Unit("job")]

    def open_worker(self, ctx: RunContext) -> JobWorker:
        return JobWorker(ctx)


def test_a_driver_side_stage_launches_its_job_through_the_callers_executor(tmp_path: Path) -> None:
    executor = RecordingExecutor()
    ctx = run_pipeline(Config(), tmp_path / "run", executor=executor, progress=False,
                       graph=StageGraph.of([JobStage()]))
    assert executor.jobs == [(EchoJob(7), 1)]
    metrics = ctx.store.load("job", "job").metrics
    assert {k: metrics[k] for k in ("value", "rank", "world")} == {"value": 7, "rank": 0, "world": 1}
    # every record carries the unit's cost (pipeline.run.cost)
    assert metrics["device"] == "cpu" and metrics["wall_s"] >= 0 and metrics["peak_memory_bytes"] > 0
    # outside the runner (no executor in the context) a job runs on the local launcher
    assert launch(_ctx(tmp_path), echo_job, EchoJob(3), 1) == {"value": 3, "rank": 0, "world": 1}


def test_make_executor_follows_executor_kind() -> None:
    from workers import make_executor

    local = make_executor(load_config("demo", overrides=["executor.kind=local", "executor.max_attempts=5"]))
    assert type(local) is LocalExecutor and local.max_attempts == 5
    pytest.importorskip("ray")
    from workers.ray_executor import RayExecutor

    remote = make_executor(load_config("demo", overrides=["executor.kind=ray"]))
    assert isinstance(remote, RayExecutor)  # made without connecting: nothing starts until it runs units
    remote.close()


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_pipeline_imports_neither_workers_nor_ray() -> None:
    # workers/cli.py is the composition root that gives pipeline's commands the Ray executor
    offenders = {str(p.relative_to(ROOT)): sorted(_imports(p) & {"workers", "ray"})
                 for p in sorted((ROOT / "pipeline").rglob("*.py"))}
    assert {k: v for k, v in offenders.items() if v} == {}


# ------------------------------------------------------------------------- orphans die with the driver

@dataclass(frozen=True)
class StuckJob:
    """A DDP job whose ranks record their pids, then wait in a collective that never completes."""

    folder: str


def stuck_job(spec: StuckJob) -> dict[str, Any]:
    import os

    import torch
    import torch.distributed as dist

    from pipeline.train.ddp import dist_info

    rank = dist_info()[0]
    Path(spec.folder, f"rank{rank}.pid").write_text(str(os.getpid()))
    # Each rank waits for a message the other never sends: native code, as a rank inside an all-reduce or
    # a long kernel. A polite signal (SIGINT, what torch's spawn arms) only acts when that code returns.
    dist.recv(torch.zeros(1), src=1 - rank)
    return {}


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_local_ddp_ranks_listen_on_loopback_and_die_with_a_sigkilled_driver(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    code = ("from pipeline.run.executors import LocalExecutor\n"
            "from tests.test_executors import StuckJob, stuck_job\n"
            f"LocalExecutor().launch_ddp(stuck_job, StuckJob({str(tmp_path)!r}), 2)\n")
    driver = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(pids) < 2:
            assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the ranks did not start"
            pids = [int(p.read_text()) for p in sorted(tmp_path.glob("rank*.pid")) if p.read_text()]
            time.sleep(0.2)
        assert all(_alive(pid) for pid in pids)
        from tests.test_security import _is_loopback, _listening

        sockets = _listening(set(pids))  # the rendezvous store and gloo: this machine only
        assert sockets and [s for s in sockets if not _is_loopback(s[1])] == []
        driver.kill()  # SIGKILL: no handler, no atexit, nothing of the driver runs any more
        driver.wait(timeout=10)
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in pids if _alive(pid)], "DDP ranks outlived the SIGKILLed driver"
    finally:
        if driver.poll() is None:
            driver.kill()
        for pid in pids:  # never leave orphans behind, even when the test fails
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if driver.stderr is not None:
            driver.stderr.close()
