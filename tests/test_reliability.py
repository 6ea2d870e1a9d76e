"""Reliability: every stage checks what it reads (a damaged upstream file is recomputed, or named with the
repair), one driver per run directory (two real processes), file-system and JSON errors as one-line messages,
stale temporaries removed, bad teacher files refused. Real runs under FAST on the digits (clones of the
session's `teacher_run`) and a toy stage graph in process."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from manifests.store import ManifestStore
from pipeline.commands.cli import main
from pipeline.config import Config
from pipeline.run.base import RunContext, Stage, Unit, UnitResult
from pipeline.run.graph import StageGraph
from pipeline.run.runner import StageFailed, run_pipeline
from tests.helpers import FAST, clone_run, fast_config, make_image_folder

ROOT = Path(__file__).resolve().parents[1]


def _argv(run_dir: Path, *extra: str, stages: str | None = None) -> list[str]:
    argv = ["run", "--run-dir", str(run_dir), "--no-progress", *(["--stages", stages] if stages else [])]
    for item in (*FAST, *extra):
        argv += ["--set", item]
    return argv


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _last_error(capsys: pytest.CaptureFixture[str]) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def full_run(teacher_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every stage done under FAST (a clone of the teacher run); do not modify: clone it."""
    run_dir = clone_run(teacher_run, tmp_path_factory.mktemp("full") / "run")
    run_pipeline(fast_config(), run_dir, progress=False)
    return run_dir


# ----------------------------------------------------------------------------- 2. stages verify their inputs


def test_records_list_their_inputs_with_hashes(full_run: Path) -> None:
    store = ManifestStore(full_run)
    teacher = store.load("squeeze", "train").outputs[0]
    assert teacher.uri == "checkpoints/teacher.pt" and teacher.sha256 == _sha(full_run / teacher.uri)
    shards = {o for r in store.records("recover") for o in r.outputs}
    soft = {o for r in store.records("relabel") for o in r.outputs}
    for rec in store.records("recover"):
        assert teacher in rec.inputs and {i.uri for i in rec.inputs} >= {"real/classes.json", "real/source.json"}
    for rec in store.records("relabel"):
        assert teacher in rec.inputs and shards <= set(rec.inputs)
    assert soft and soft <= set(store.load("train", "kd-convnet-s0").inputs)
    student = store.load("train", "kd-convnet-s0").outputs[0]
    assert student in store.load("evaluate", "job").inputs


def test_a_damaged_teacher_is_shown_and_recomputed_and_nothing_after_it_reruns(
        full_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    run_dir = clone_run(full_run, tmp_path / "run")
    teacher = run_dir / "checkpoints" / "teacher.pt"
    recorded = ManifestStore(run_dir).load("squeeze", "train").outputs[0].sha256
    data = bytearray(teacher.read_bytes())
    data[len(data) // 2:len(data) // 2 + 16] = bytes(255 - b for b in data[len(data) // 2:len(data) // 2 + 16])
    teacher.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["status", "--run-dir", str(run_dir)]) == 0
    squeeze_row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("squeeze"))
    assert "damaged" in squeeze_row and "checkpoints/teacher.pt has changed" in squeeze_row
    assert main(_argv(run_dir)) == 0
    assert _sha(teacher) == recorded  # re-derived from the last epoch's checkpoint: the same bytes
    assert any("checkpoints/teacher.pt" in r.getMessage() and "discarded" in r.getMessage() for r in caplog.records)
    store = ManifestStore(run_dir)
    assert store.load("squeeze", "_stage").metrics["ran"] == 1
    assert [store.load(s, "_stage").metrics["ran"] for s in ("recover", "relabel", "train", "evaluate")] == [0] * 4


def test_damage_upstream_of_the_selected_stages_stops_naming_the_file_and_the_repair(
        full_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = clone_run(full_run, tmp_path / "run")
    teacher = run_dir / "checkpoints" / "teacher.pt"
    teacher.write_bytes(teacher.read_bytes()[:-16] + bytes(16))
    capsys.readouterr()
    assert main(_argv(run_dir, stages="recover")) == 2
    msg = _last_error(capsys)
    assert "checkpoints/teacher.pt has changed" in msg and "--stages including squeeze" in msg
    teacher.unlink()
    assert main(_argv(run_dir, stages="relabel")) == 2
    assert "checkpoints/teacher.pt is missing" in _last_error(capsys)
    assert main(_argv(run_dir, stages="squeeze,recover")) == 0
    assert _sha(teacher) == ManifestStore(run_dir).load("squeeze", "train").outputs[0].sha256


def test_a_truncated_soft_label_file_is_recomputed(full_run: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = clone_run(full_run, tmp_path / "run")
    store = ManifestStore(run_dir)
    ref = store.records("relabel")[0].outputs[0]
    path = run_dir / ref.uri
    path.write_bytes(path.read_bytes()[: ref.bytes // 2])
    capsys.readouterr()
    assert main(["status", "--run-dir", str(run_dir)]) == 0
    assert f"{ref.uri} has changed" in capsys.readouterr().out
    assert main(_argv(run_dir)) == 0
    assert path.stat().st_size == ref.bytes and _sha(path) == ref.sha256
    assert store.load("relabel", "_stage").metrics["ran"] == 1


def test_a_deleted_synthetic_shard_is_recomputed(full_run: Path, tmp_path: Path) -> None:
    run_dir = clone_run(full_run, tmp_path / "run")
    store = ManifestStore(run_dir)
    rec = store.records("recover")[1]
    shard = next(o for o in rec.outputs if o.uri.endswith(".tar"))
    (run_dir / shard.uri).unlink()
    assert main(_argv(run_dir)) == 0
    assert _sha(run_dir / shard.uri) == shard.sha256
    assert store.load("recover", rec.unit).outputs == rec.outputs
    assert store.load("recover", "_stage").metrics["ran"] == 1


# A toy graph: "src" writes one file per unit with VERSION in it; "use" reads them all.
VERSION = ["v1"]
RAN: list[str] = []


class ToyWorker:
    def __init__(self, ctx: RunContext, stage: str) -> None:
        self.ctx, self.stage = ctx, stage

    def run(self, unit: Unit) -> UnitResult:
        if unit.key == "boom":
            raise RuntimeError("boom: the original error 42")
        RAN.append(f"{self.stage}/{unit.key}")
        path = self.ctx.path(self.stage, f"{unit.key}.txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{self.stage} {unit.key} {VERSION[0]}")
        return UnitResult(outputs=[self.ctx.ref(path)])

    def close(self) -> None:
        pass


class ToyStage(Stage):
    distributed = True

    def __init__(self, name: str, depends_on: tuple[str, ...] = (), units: tuple[str, ...] = ("a", "b")) -> None:
        self.name, self.depends_on, self.units, self.output_dirs = name, depends_on, units, (name,)

    def plan(self, ctx: RunContext) -> list[Unit]:
        return [Unit(k) for k in self.units]

    def open_worker(self, ctx: RunContext) -> ToyWorker:
        return ToyWorker(ctx, self.name)


GRAPH = StageGraph.of([ToyStage("src"), ToyStage("use", ("src",))])


def _toy(run_dir: Path, graph: StageGraph = GRAPH, **kw: Any) -> RunContext:
    return run_pipeline(Config(), run_dir, progress=False, graph=graph, **kw)


def test_a_recomputed_upstream_file_that_differs_invalidates_the_units_that_read_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    RAN.clear()
    VERSION[0] = "v1"
    _toy(tmp_path / "run")
    assert RAN == ["src/a", "src/b", "use/a", "use/b"]
    (tmp_path / "run" / "src" / "b.txt").unlink()
    RAN.clear()
    VERSION[0] = "v2"  # the recomputed file differs from the one "use" read
    ctx = _toy(tmp_path / "run")
    assert RAN == ["src/b", "use/a", "use/b"]
    assert any("src/b.txt is missing" in r.getMessage() for r in caplog.records)
    assert any("input src/b.txt has changed" in r.getMessage() for r in caplog.records)
    b = ctx.store.load("src", "b").outputs[0]
    assert all(b in r.inputs for r in ctx.store.records("use"))
    RAN.clear()
    _toy(tmp_path / "run")
    assert RAN == []  # everything is as recorded now


# ----------------------------------------------------------------------------- 3. one driver per run directory

HOLDER = """
import sys, time
from pathlib import Path
from pipeline.config import Config
from pipeline.run.runner import run_pipeline
from pipeline.run.graph import StageGraph
from pipeline.run.base import Stage, Unit, UnitResult

class Wait:
    def run(self, unit):
        print("running", flush=True)
        while not Path(sys.argv[2]).exists():
            time.sleep(0.05)
        return UnitResult()
    def close(self):
        pass

class Hold(Stage):
    name, distributed = "hold", True
    def plan(self, ctx):
        return [Unit("u")]
    def open_worker(self, ctx):
        return Wait()

run_pipeline(Config(), Path(sys.argv[1]), graph=StageGraph.of([Hold()]), progress=False)
"""


def test_a_second_driver_is_refused_at_once_naming_the_holder_until_the_holder_dies(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", classes=2, per_class=4)
    run_dir, go = tmp_path / "run", tmp_path / "go"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), str(go)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "running"  # a real `run_pipeline`, inside its unit
        second = [sys.executable, "-m", "workers.cli", "run", "--run-dir", str(run_dir), "--data-dir", str(data),
                  "--stages", "ingest", "--no-progress", "--set", "data.shard_size=5"]
        t0 = time.time()
        refused = subprocess.run(second, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2, refused.stderr
        last = refused.stderr.strip().splitlines()[-1]
        assert f"host {socket.gethostname()}, pid {holder.pid}" in last and str(run_dir) in last
        assert time.time() - t0 < 120  # refused at once, not after waiting for the holder
        assert not (run_dir / "manifests" / "ingest").exists()
        status = subprocess.run([sys.executable, "-m", "workers.cli", "status", "--run-dir", str(run_dir)],
                                cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert status.returncode == 0 and "ingest" in status.stdout  # readers take no lock
        holder.kill()  # SIGKILL: no clean-up; the kernel releases the lock
        holder.wait(timeout=60)
        after = subprocess.run(second, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert after.returncode == 0, after.stderr
        assert ManifestStore(run_dir).load("ingest", "_stage") is not None
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_a_holder_caught_before_it_wrote_its_pid_is_named_once_it_has(tmp_path: Path) -> None:
    """The holder takes the flock, then writes its host and pid: a second driver that comes in between waits a
    moment for them instead of reporting an unknown holder; a holder that never writes them is called a
    starting driver."""
    import fcntl
    import json
    import os
    import threading

    from manifests.store import LOCK_FILE, RunDirBusy, run_dir_lock

    fd = os.open(tmp_path / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by "another driver" that has written nothing yet
        info = {"host": "node-7", "pid": 4242, "started": "2026-12-01 10:00:00"}
        writer = threading.Timer(0.2, lambda: os.pwrite(fd, json.dumps(info).encode(), 0))
        writer.start()
        with pytest.raises(RunDirBusy, match="host node-7, pid 4242, since 2026-12-01 10:00:00"):
            with run_dir_lock(tmp_path):
                pass
        writer.join()
        os.ftruncate(fd, 0)
        with pytest.raises(RunDirBusy, match="a driver that is starting and has not yet written its host and pid"):
            with run_dir_lock(tmp_path):
                pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- 9. errors as messages


def test_a_run_dir_that_cannot_be_made_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(_argv(blocker / "run", stages="ingest")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"distill: error: {blocker / 'run'}: Not a directory"
    assert not any("Traceback" in line for line in err)


def test_corrupt_config_and_record_json_are_named_with_the_cause(teacher_run: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = clone_run(teacher_run, tmp_path / "run")
    config = run_dir / "config.json"
    good = config.read_text()
    config.write_text(good[: len(good) // 2])
    for argv in (["status", "--run-dir", str(run_dir)], _argv(run_dir, stages="ingest")):
        capsys.readouterr()
        assert main(argv) == 2
        msg = _last_error(capsys)
        assert msg.startswith(f"distill: error: {config} is corrupt (") and "delete it" in msg
    assert config.read_text() == good[: len(good) // 2]  # `run` did not overwrite it
    config.write_text(good)
    record = run_dir / "manifests" / "ingest" / "train-000000.json"
    record.write_text('{"run_id": "x", "stage": ')
    for argv in (["status", "--run-dir", str(run_dir)], _argv(run_dir, stages="ingest")):
        capsys.readouterr()
        assert main(argv) == 2
        msg = _last_error(capsys)
        assert msg.startswith(f"distill: error: record {record} is corrupt (JSONDecodeError")
    # a record whose status is not a known value does not pass for done (it used to, in `status` and `run`)
    other = run_dir / "manifests" / "ingest" / "val-000000.json"
    other.write_text(other.read_text().replace('"status": "done"', '"status": "maybe"'))
    record.unlink()
    for argv in (["status", "--run-dir", str(run_dir)], _argv(run_dir, stages="ingest")):
        capsys.readouterr()
        assert main(argv) == 2
        assert _last_error(capsys).startswith(f"distill: error: record {other} is corrupt (ValueError: status "
                                              "'maybe' is not one of done, failed)")


def test_collect_out_on_a_path_that_cannot_be_written_is_a_one_line_error(
        full_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a real run collects cleanly: its evaluate record (with the executor's usage figures) matches its summary file
    assert main(["collect", str(full_run)]) == 0
    assert "1 run(s) counted" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["collect", str(full_run), "--out", str(blocker / "sub" / "results.md")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"distill: error: {blocker / 'sub'}: Not a directory"
    assert not any("Traceback" in line for line in err)


def test_the_error_reaches_the_terminal_when_its_failure_record_cannot_be_written(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    graph = StageGraph.of([ToyStage("src", units=("a", "boom"))])
    (tmp_path / "run" / "manifests" / "src" / "boom.failed.json").mkdir(parents=True)  # the record cannot go there
    with pytest.raises(StageFailed, match=r"1 of 2 units failed \(boom\); last error: RuntimeError: boom: the "
                       r"original error 42\. Their failure records could not be written \(.*boom\.failed\.json"):
        _toy(tmp_path / "run", graph)
    assert any("boom: the original error 42" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert ManifestStore(tmp_path / "run").load("src", "a") is not None  # the unit that worked is kept


def test_stale_temporaries_of_a_killed_unit_are_removed_when_it_runs_again(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", classes=2, per_class=4)
    run_dir = tmp_path / "run"
    assert main(["run", "--run-dir", str(run_dir), "--data-dir", str(data), "--stages", "ingest", "--no-progress",
                 "--set", "data.shard_size=5"]) == 0
    stale = [run_dir / "real" / ".train-000000.tar.99999.0badc0de.tmp",
             run_dir / "real" / ".train-000000.parquet.99999.0badc0de.tmp",
             run_dir / "manifests" / "ingest" / ".train-000000.json.99999.0badc0de.tmp"]
    keep = run_dir / "real" / ".train-000001.tar.99999.0badc0de.tmp"  # another unit's: not touched
    for path in (*stale, keep):
        path.write_bytes(b"half a file")
    (run_dir / "manifests" / "ingest" / "train-000000.json").unlink()  # as if killed before its record
    assert main(["run", "--run-dir", str(run_dir), "--data-dir", str(data), "--stages", "ingest", "--no-progress",
                 "--set", "data.shard_size=5"]) == 0
    assert [p for p in stale if p.exists()] == [] and keep.exists()
    assert ManifestStore(run_dir).load("ingest", "train-000000") is not None


# ----------------------------------------------------------------------------- 10. bad teacher files


@pytest.mark.parametrize("kind", ["tensor", "list", "text"])
def test_a_teacher_file_that_is_not_a_state_dict_is_a_usage_error(kind: str, teacher_run: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = clone_run(teacher_run, tmp_path / "run")
    weights = tmp_path / f"{kind}.pt"
    if kind == "tensor":
        torch.save(torch.zeros(10, 3), weights)
    elif kind == "list":
        torch.save(list(torch.load(run_dir / "checkpoints" / "teacher.pt", weights_only=True).values()), weights)
    else:
        weights.write_text("these are not weights\n")
    capsys.readouterr()
    assert main([*_argv(run_dir, f"squeeze.weights={weights}", stages="squeeze"), "--fresh"]) == 2
    assert f"not a state_dict: {weights}" in _last_error(capsys)
    assert ManifestStore(run_dir).load("squeeze", "import") is None


def test_a_record_lists_the_file_it_read_as_json(full_run: Path) -> None:
    raw = json.loads((full_run / "manifests" / "evaluate" / "job.json").read_text())
    assert any(i["uri"] == "checkpoints/students/kd-convnet-s0.pt" and len(i["sha256"]) == 64 and i["bytes"] > 0
               for i in raw["inputs"])


def test_a_busy_run_directory_is_a_run_dir_in_use_error_that_callers_can_wait_on(tmp_path: Path) -> None:
    """`run_pipeline` on a locked run directory raises RunDirInUse: a ConfigError (the CLI's exit 2) of its own
    type, so the random-real baseline and the sanity table wait on exactly this and nothing else."""
    from manifests.store import run_dir_lock
    from pipeline.core.errors import ConfigError, RunDirInUse

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with run_dir_lock(run_dir):
        with pytest.raises(RunDirInUse, match=f"{run_dir} is in use by another") as caught:
            run_pipeline(Config(), run_dir, stages=["ingest"], progress=False)
    assert isinstance(caught.value, ConfigError)
    assert not (run_dir / "manifests").exists()


def test_a_script_that_configures_no_logging_gets_the_run_log_and_keeps_its_console(teacher_run: Path,
                                                                                     tmp_path: Path) -> None:
    """run_pipeline called from a script whose root logger is at WARNING (Python's default): RUN_DIR/logs/driver.log
    still holds the stages' INFO lines (it used to stay empty), the caller's handlers get the warnings and no INFO
    record, and the project's loggers are as they were afterwards."""
    import logging

    from pipeline.run.runlog import PROJECT_LOGGERS

    class Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    run_dir = clone_run(teacher_run, tmp_path / "run")
    (run_dir / "logs" / "driver.log").unlink(missing_ok=True)
    root, keep = logging.getLogger(), Keep()
    old_level = root.level
    root.setLevel(logging.WARNING)
    root.addHandler(keep)
    try:  # executor.kind=ray without an executor: the runner warns, then runs in-process (ingest is done: skipped)
        run_pipeline(fast_config("executor.kind=ray"), run_dir, stages=["ingest"], progress=False)
    finally:
        root.removeHandler(keep)
        root.setLevel(old_level)
    text = (run_dir / "logs" / "driver.log").read_text()
    assert "INFO distill: stage ingest:" in text and "WARNING distill: executor.kind=ray" in text
    assert [r.levelno for r in keep.records if r.name.split(".")[0] in PROJECT_LOGGERS] == [logging.WARNING]
    for name in PROJECT_LOGGERS:
        lg = logging.getLogger(name)
        assert (lg.level, lg.propagate, lg.handlers) == (logging.NOTSET, True, []), name


def test_a_caller_that_shares_a_run_directory_is_told_once_who_holds_it_and_waits_for_it(tmp_path: Path) -> None:
    """run_dir_lock(on_busy=...): called once with the holder's host and pid, then the lock is taken as soon as the
    holder lets it go (the random-real baseline and the sanity table's teachers wait this way)."""
    import threading

    from manifests.store import run_dir_lock

    told: list[str] = []
    taken_at: list[float] = []

    def second() -> None:
        with run_dir_lock(tmp_path, on_busy=told.append):
            taken_at.append(time.monotonic())

    with run_dir_lock(tmp_path):
        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(1.5)
        assert waiter.is_alive() and not taken_at  # still waiting while held
        released_at = time.monotonic()
    waiter.join(timeout=30)
    assert not waiter.is_alive() and taken_at and taken_at[0] >= released_at
    assert len(told) == 1 and told[0].startswith(f"host {socket.gethostname()}, pid {os.getpid()}, since ")
