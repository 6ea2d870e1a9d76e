"""Ray executor: same shards as the local executor, dead actors replaced, failing units reported."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import ray

from manifests.store import ManifestStore
from pipeline.commands.recipes import load_config
from pipeline.run.base import Outcome, RunContext, Stage, Unit, UnitResult
from pipeline.run.executors import LocalExecutor
from pipeline.run.runner import _record, run_pipeline
from workers.ray_executor import RayExecutor, _lost_outcome, plan_actors, resolve_stage, stage_ref

# ------------------------------------------------------------------------------------- a toy test stage

class ToyWorker:
    """Behaviour comes from the unit payload: sleep, raise always, or kill its own process once."""

    def run(self, unit: Unit) -> UnitResult:
        p = unit.payload
        time.sleep(p.get("sleep", 0.0))
        if p.get("raise"):
            raise ValueError(f"bad unit {unit.key}")
        marker = p.get("die_once")
        if marker and not Path(marker).exists():
            Path(marker).write_text(str(os.getpid()))
            os._exit(1)  # the actor process dies mid-unit
        return UnitResult(metrics={"pid": os.getpid(), "double": 2 * p.get("i", 0)})

    def close(self) -> None:
        pass


class ToyStage(Stage):
    name = "toy"
    distributed = True

    def open_worker(self, ctx: RunContext) -> ToyWorker:
        return ToyWorker()


TOY = ToyStage()  # actors find it as "<this module>:TOY"


# ------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False,
             object_store_memory=100 * 1024 * 1024, log_to_driver=True)
    yield
    ray.shutdown()


def _cfg(*overrides: str):
    return load_config("demo", overrides=["executor.kind=ray", "executor.num_workers=2", *overrides])


def _toy_run(tmp_path: Path, units: list[Unit], *overrides: str, during=None):
    """Run the toy stage through a RayExecutor; records are written as the runner does."""
    cfg = _cfg(*overrides)
    ctx = RunContext(run_dir=tmp_path, config=cfg, run_id="test", hashes={"toy": "h"})
    store = ManifestStore(tmp_path)
    outcomes: list[Outcome] = []
    executor = RayExecutor(cfg)

    def on_outcome(outcome: Outcome) -> None:
        outcomes.append(outcome)
        rec = _record(ctx, "toy", outcome)
        store.commit(rec) if outcome.ok else store.fail(rec)
        if during is not None and len(outcomes) == 1:
            during(executor)

    try:
        executor.run_units(TOY, ctx, units, on_outcome)
        assert executor.actors == []  # all actors are gone at the end of the stage
    finally:
        executor.close()
    assert ray.is_initialized()  # the executor joined the fixture's cluster and left it running
    return outcomes, store


# ------------------------------------------------------------------------------------- pure (no cluster)

def test_plan_actors_decides_before_creating():
    cfg = load_config("demo", overrides=["executor.cpus_per_worker=1"])
    gpu_stage = type("G", (Stage,), {"needs_gpu": True})()
    cpu_plan = plan_actors(gpu_stage, cfg, 10, {"CPU": 2.0})
    assert (cpu_plan.kind, cpu_plan.count, cpu_plan.num_gpus) == ("CPU", 2, 0)  # no GPU: never ask for one
    gpu_plan = plan_actors(gpu_stage, cfg, 10, {"CPU": 16.0, "GPU": 4.0})
    assert (gpu_plan.kind, gpu_plan.count, gpu_plan.num_gpus) == ("GPU", 4, 1)
    assert plan_actors(gpu_stage, cfg, 3, {"CPU": 16.0, "GPU": 4.0}).count == 3  # never more than units
    assert plan_actors(TOY, cfg, 10, {"CPU": 16.0, "GPU": 4.0}).kind == "CPU"  # stage needs no GPU
    wide = load_config("demo", overrides=["executor.cpus_per_worker=2", "executor.num_workers=5"])
    assert plan_actors(TOY, wide, 10, {"CPU": 4.0}).count == 2  # capped to what fits
    # the train stage's students share GPUs: eval.gpus_per_student=0.25 puts four on each of 2 GPUs
    from pipeline.run.graph import get_stage

    shared = load_config("demo", overrides=["eval.gpus_per_student=0.25", "executor.cpus_per_worker=1"])
    plan = plan_actors(get_stage("train"), shared, 12, {"CPU": 16.0, "GPU": 2.0})
    assert (plan.kind, plan.count, plan.num_gpus) == ("GPU", 8, 0.25)
    assert plan_actors(get_stage("train"), shared, 3, {"CPU": 16.0, "GPU": 2.0}).count == 3


def test_stage_ref_round_trip():
    from pipeline.run.graph import get_stage

    assert stage_ref(get_stage("ingest")) == "ingest"
    assert stage_ref(TOY) == f"{__name__}:TOY"
    assert resolve_stage(stage_ref(TOY)) is TOY


def test_lost_actor_messages():
    unit = Unit("u7")
    oom = _lost_outcome(unit, 1, ray.exceptions.OutOfMemoryError("Task was killed due to the node running low "
                                                                  "on memory."), max_attempts=3)
    assert not oom.ok and oom.attempt == 1
    assert "out of memory" in oom.error and "u7" in oom.error and "retried" in oom.error
    died = _lost_outcome(unit, 3, ray.exceptions.WorkerCrashedError(), max_attempts=3)
    assert died.error.startswith("actor died while running unit u7 (attempt 3); no attempts left")


# ----------------------------------------------------------------------------------------- on a cluster

@pytest.mark.ray
def test_ingest_on_ray_matches_local(ray_cluster, tmp_path):
    cfg = _cfg("data.shard_size=200")
    ray_ctx = run_pipeline(cfg, tmp_path / "ray", stages=["ingest"], executor=RayExecutor(cfg), progress=False)
    local_ctx = run_pipeline(cfg, tmp_path / "local", stages=["ingest"], executor=LocalExecutor(), progress=False)

    def shards(ctx: RunContext) -> dict[str, list[tuple[str, str]]]:
        return {r.unit: sorted((f.uri, f.sha256) for f in r.outputs) for r in ctx.store.records("ingest")}

    got, want = shards(ray_ctx), shards(local_ctx)
    assert len(want) >= 5 and got == want
    for uri, _ in next(iter(want.values())):
        assert (tmp_path / "ray" / uri).read_bytes() == (tmp_path / "local" / uri).read_bytes()


@pytest.mark.ray
def test_actor_that_kills_itself_is_replaced(ray_cluster, tmp_path):
    marker = tmp_path / "died-once"
    units = [Unit(f"u{i}", {"i": i, "sleep": 0.1}) for i in range(4)]
    units[1] = Unit("u1", {"i": 1, "sleep": 0.1, "die_once": str(marker)})
    outcomes, store = _toy_run(tmp_path, units, "executor.max_attempts=3")
    assert sorted(o.unit.key for o in outcomes) == ["u0", "u1", "u2", "u3"] and all(o.ok for o in outcomes)
    records = {r.unit: r for r in store.records("toy")}
    assert records["u1"].attempt == 2 and records["u1"].metrics["double"] == 2
    assert records["u1"].metrics["pid"] != int(marker.read_text())  # ran again on a fresh actor
    assert all(records[k].attempt == 1 for k in ("u0", "u2", "u3"))
    assert store.failures("toy") == []


@pytest.mark.ray
def test_ray_kill_mid_stage_completes_every_unit(ray_cluster, tmp_path):
    killed: list[str] = []

    def kill_one_soon(executor: RayExecutor) -> None:
        def target() -> None:
            time.sleep(0.2)
            key, actor = list(executor.in_flight().items())[-1]  # the unit submitted last is mid-run
            killed.append(key)
            ray.kill(actor)

        threading.Thread(target=target, daemon=True).start()

    units = [Unit(f"u{i}", {"i": i, "sleep": 0.8}) for i in range(6)]
    outcomes, store = _toy_run(tmp_path, units, "executor.max_attempts=2", during=kill_one_soon)
    assert len(outcomes) == 6 and all(o.ok for o in outcomes)
    assert len(killed) == 1
    attempts = {o.unit.key: o.attempt for o in outcomes}
    assert attempts[killed[0]] == 2 and sum(a == 2 for a in attempts.values()) == 1
    assert len(store.records("toy")) == 6


@pytest.mark.ray
def test_unit_that_always_raises_fails_after_max_attempts(ray_cluster, tmp_path):
    units = [Unit(f"u{i}", {"i": i, "raise": i == 2}) for i in range(4)]
    outcomes, store = _toy_run(tmp_path, units, "executor.max_attempts=2")
    assert len(outcomes) == 4  # one call per unit: intermediate failures are only logged
    assert sorted(r.unit for r in store.records("toy")) == ["u0", "u1", "u3"]
    (failed,) = store.failures("toy")
    assert failed.unit == "u2" and failed.status == "failed" and failed.attempt == 2
    assert "Traceback" in failed.error and "ValueError: bad unit u2" in failed.error


# ------------------------------------------------------------------ recover bytes: threads never matter

THREADS_RECOVER = ("recover.method=dwa", "recover.dwa.iterations=30")  # enough steps for rounding to differ


def _recover_outputs(run_dir: Path) -> dict[str, list[tuple[str, str]]]:
    return {r.unit: sorted((o.uri, o.sha256) for o in r.outputs) for r in ManifestStore(run_dir).records("recover")}


@pytest.mark.ray
def test_recover_bytes_do_not_depend_on_thread_count_or_executor(ray_cluster, teacher_run, tmp_path):
    import subprocess
    import sys

    import torch

    from tests.helpers import clone_run, fast_config

    root = Path(__file__).resolve().parents[1]
    # 1. local, in this process, with 2 torch threads
    local = clone_run(teacher_run, tmp_path / "local")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_pipeline(fast_config(*THREADS_RECOVER), local, stages=["recover"], progress=False)
    finally:
        torch.set_num_threads(before)
    # 2. local, in a fresh process with OMP_NUM_THREADS=1
    single = clone_run(teacher_run, tmp_path / "omp1")
    code = ("import sys; from pipeline.run.runner import run_pipeline; from tests.helpers import fast_config; "
            "run_pipeline(fast_config(*sys.argv[2:]), sys.argv[1], stages=['recover'], progress=False)")
    proc = subprocess.run([sys.executable, "-c", code, str(single), *THREADS_RECOVER], cwd=root, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 3. on Ray: two actors of 1 CPU each
    on_ray = clone_run(teacher_run, tmp_path / "ray")
    cfg = fast_config(*THREADS_RECOVER, "executor.kind=ray", "executor.num_workers=2", "executor.cpus_per_worker=1")
    executor = RayExecutor(cfg)
    try:
        run_pipeline(cfg, on_ray, stages=["recover"], executor=executor, progress=False)
    finally:
        executor.close()
    want = _recover_outputs(local)
    assert len(want) == 4
    assert _recover_outputs(single) == want
    assert _recover_outputs(on_ray) == want


@pytest.mark.ray
def test_the_students_of_a_matrix_train_on_ray_actors_like_locally(ray_cluster, teacher_run, tmp_path):
    """Two hard cells of the matrix run as units on two CPU actors and give the same students as in-process."""
    import hashlib

    from tests.helpers import clone_run, fast_config

    matrix = ["eval.protocols=[hard]", "eval.students=[convnet-in, lenet]", "train.hard_epochs=2",
              "train.hard_batch_size=8"]
    local = clone_run(teacher_run, tmp_path / "local")
    run_pipeline(fast_config(*matrix), local, stages=["recover", "relabel", "train"], progress=False)
    on_ray = clone_run(teacher_run, tmp_path / "ray")
    cfg = fast_config(*matrix, "executor.kind=ray", "executor.num_workers=2", "executor.cpus_per_worker=1")
    executor = RayExecutor(cfg)
    try:
        run_pipeline(cfg, on_ray, stages=["recover", "relabel", "train"], executor=executor, progress=False)
    finally:
        executor.close()

    def students(run: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted((run / "checkpoints" / "students").glob("*.pt"))}

    assert list(students(local)) == ["hard-convnet-in-s0.pt", "hard-lenet-s0.pt"]
    assert students(on_ray) == students(local)
    records = [ManifestStore(on_ray).load("train", k) for k in ("hard-convnet-in-s0", "hard-lenet-s0")]
    assert all(r.metrics["world_size"] == 1 and r.metrics["device"] == "cpu" for r in records)
