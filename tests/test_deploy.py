"""Deployment files: static checks (fast) and real `ray job submit` runs on a private local head (slow).

The Ray tests share one head of their own (`ray start --head --block` under a private temp dir and free
ports, token auth on), stopped at the end by the pids of exactly that head's processes (never `ray stop`,
which would also stop other sessions' clusters); see tests/ray_cluster.py for how the processes are found.
They cover: the job API refusing requests without the token; the demo recipe end to end as one job that
joins the head (no nested cluster); a job stopped with `ray job stop` in the middle of recover and submitted
again, which runs only the missing units, one of its actor processes killed with SIGKILL and its unit requeued.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from manifests.store import STAGE_RECORD, ManifestStore
from tests.helpers import FAST
from tests.ray_cluster import REPO, VENV_BIN, LocalRayHead, start_head

DEPLOY = REPO / "deploy"
JOB_EXCLUDES = [".venv", "runs", ".git", ".pytest_cache", ".ruff_cache", "benchmarks/out"]


# --------------------------------------------------------------------------------------------- static


def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _pod_templates(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def test_cli_runs_as_module() -> None:
    assert 'if __name__ == "__main__":' in (REPO / "pipeline" / "commands" / "cli.py").read_text()


def test_runtime_env_yaml() -> None:
    env = yaml.safe_load((DEPLOY / "ray" / "runtime_env.yaml").read_text())
    assert {".venv", ".git", "runs"} <= set(env["excludes"])
    assert all(isinstance(v, str) for v in env["env_vars"].values())  # Ray requires string values
    assert "pip" not in env and "working_dir" not in env  # working dir comes from submit.sh


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycluster.yaml"])
def test_kuberay_pods_share_runs_volume(name: str) -> None:
    pvcs = {d["metadata"]["name"]: d for d in _yaml_docs(DEPLOY / "kuberay" / "pvc.yaml")}
    assert pvcs["distill-runs"]["spec"]["accessModes"] == ["ReadWriteMany"]
    (doc,) = _yaml_docs(DEPLOY / "kuberay" / name)
    cluster = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert cluster["authOptions"] == {"mode": "token"}
    for pod in _pod_templates(cluster):
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        for container in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert claims[mounts["/runs"]] == "distill-runs"
            assert claims[mounts["/data"]] == "imagenet"
    for group in cluster["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    if doc["kind"] == "RayJob":
        assert doc["spec"]["shutdownAfterJobFinishes"] is True
        assert doc["spec"]["entrypoint"] == ("python -m workers.cli run --recipe imagenet1k-rn18-ipc10-dwa "
                                             "--data-dir /data/imagenet --run-dir /runs/in1k-ipc10-dwa")


def test_cluster_launcher_yaml() -> None:
    cfg = yaml.safe_load((DEPLOY / "cluster" / "ray-cluster.yaml").read_text())
    assert cfg["provider"]["type"] == "aws"
    workers = cfg["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] <= workers["max_workers"] <= cfg["max_workers"]
    assert cfg["head_node_type"] in cfg["available_node_types"]
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert any("/runs" in c for c in cfg["setup_commands"])


def test_dockerfile_pins_match_lock() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    lock = (REPO / "requirements.lock").read_text()
    for pin in ("torch==2.14.1", "torchvision==0.29.1", "ray[default,train]==2.60.0"):
        assert pin in lock
    assert "requirements.lock" in text and "python:3.11" in text
    assert "\nUSER ray" in text


def test_submit_sh_builds_command() -> None:
    script = DEPLOY / "submit.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    usage = subprocess.run([str(script)], capture_output=True, text=True, check=False)
    assert usage.returncode == 2 and "usage:" in usage.stderr
    helped = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=False)
    assert helped.returncode == 0 and "--no-wait" in helped.stdout
    dry = subprocess.run([str(script), "--dry-run", "--no-wait", "--", "--recipe", "demo", "--run-dir", "/runs/x y"],
                         capture_output=True, text=True, check=False, env={"PATH": "/usr/bin:/bin"})
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.split() == [
        "ray", "job", "submit", "--address", "http://127.0.0.1:8265", "--working-dir", ".", "--runtime-env",
        "deploy/ray/runtime_env.yaml", "--no-wait", "--", "python", "-m", "workers.cli", "run", "--recipe", "demo",
        "--run-dir", "/runs/x\\", "y",
    ]


# --------------------------------------------------------------------------------------------- Ray jobs
#
# One private head serves every job test below (start-up costs seconds). `demo_job` runs the demo recipe
# end to end once; the resume and actor-kill tests start from a copy of its ingest + squeeze results and
# run only the recover stage, with units slow enough (a few seconds each) to be interrupted.

JOB_ENV = {"excludes": JOB_EXCLUDES, "env_vars": {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}}
# 10 demo classes in shards of 5 x IPC 4, one image per unit -> 8 recover units of a few seconds each.
SLOW_RECOVER = ["recover.dwa.iterations=60", "recover.ipc=8", "recover.ipc_per_unit=1", "recover.classes_per_shard=5"]
SLOW_RECOVER_UNITS = 16  # seconds of work remain after the first record, whatever the machine's load
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def _run_command(run_dir: Path, *extra: str, stages: str | None = None) -> list[str]:
    """`python -m workers.cli run` for the demo with every FAST item, then `executor.kind=ray` (which must win
    over FAST's `executor.kind=local`: later --set items override earlier ones), then `extra`."""
    cmd = ["python", "-m", "workers.cli", "run", "--recipe", "demo", "--run-dir", str(run_dir), "--no-progress"]
    if stages:
        cmd += ["--stages", stages]
    for item in [*FAST, "executor.kind=ray", *extra]:
        cmd += ["--set", item]
    return cmd


def _job_id(tag: str) -> str:
    return f"distill-{tag}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def _stopped_on_exit(head: LocalRayHead, *job_ids: str) -> Iterator[None]:
    """Stop any of `job_ids` still running when the block exits (a failing test leaves no job behind)."""
    try:
        yield
    finally:
        for job_id in job_ids:
            with contextlib.suppress(Exception):
                if head.job_status(job_id) not in TERMINAL:
                    head.stop_job(job_id)
                    head.wait_job(job_id, timeout=60)


def _submit_no_wait(head: LocalRayHead, entrypoint: list[str], job_id: str) -> None:
    result = head.submit(entrypoint, working_dir=REPO, runtime_env=JOB_ENV, submission_id=job_id, no_wait=True,
                         timeout=120)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


def _wait_for(condition: Any, timeout: float, what: str, poll: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def _unit_records(run_dir: Path, stage: str = "recover") -> list[Path]:
    """Committed unit records (the completion markers), without failure or stage records."""
    folder = run_dir / "manifests" / stage
    return sorted(p for p in folder.glob("*.json")
                  if not p.name.endswith(".failed.json") and p.stem != STAGE_RECORD) if folder.is_dir() else []


def _actor_processes(head: LocalRayHead, title: str = "ray::UnitActor") -> dict[int, str]:
    """pid -> process title of this head's processes whose title starts with `title` (Ray sets
    `ray::UnitActor` for an idle actor, `ray::UnitActor.run` while it runs a unit)."""
    out = {}
    for pid in head.pids():
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if args.startswith(title):
            out[pid] = args
    return out


def _job_failure(head: LocalRayHead, job_id: str) -> str:
    return head.job_logs(job_id)[-6000:]


def _teacher_copy(src: Path, dst: Path) -> Path:
    """A new run directory holding only the ingest and squeeze results of `src` (their records included)."""
    shutil.copytree(src / "real", dst / "real")
    (dst / "checkpoints").mkdir(parents=True)
    for name in ("teacher.pt", "teacher-samples.parquet"):  # every output the squeeze record names
        shutil.copy2(src / "checkpoints" / name, dst / "checkpoints" / name)
    for stage in ("ingest", "squeeze"):
        shutil.copytree(src / "manifests" / stage, dst / "manifests" / stage)
    return dst


@pytest.fixture(scope="module")
def ray_head() -> Iterator[LocalRayHead]:
    head = start_head(num_cpus=2)
    try:
        yield head
    finally:
        pids = head.stop()
        assert pids, "found no processes of the head to stop"
        assert not (head.pids() & pids), "some of the head's processes survived stop()"


@dataclass
class DemoJob:
    run_dir: Path
    job_id: str
    status: str
    logs: str


@pytest.fixture(scope="module")
def demo_job(ray_head: LocalRayHead, tmp_path_factory: pytest.TempPathFactory) -> DemoJob:
    """The demo recipe end to end (FAST settings) as one `ray job submit`, waited for."""
    run_dir = tmp_path_factory.mktemp("demo-job") / "run"
    # One shell entrypoint: report the interpreter and where `pipeline` is imported from, then run.
    # (`ray job submit` shell-quotes the entrypoint words it is given; `sh -c` gets the script as one.)
    check = "import sys, pipeline; print('JOB_PYTHON', sys.prefix); print('JOB_PIPELINE', pipeline.__file__)"
    # squeeze on 2 Ray Train workers: DDP with gloo across two ranks (rank 0's result reaches the driver)
    script = f"python -c {shlex.quote(check)} && exec {shlex.join(_run_command(run_dir, 'squeeze.workers=2'))}"
    job_id = _job_id("demo")
    with _stopped_on_exit(ray_head, job_id):
        result = ray_head.submit(["sh", "-c", script], working_dir=REPO, runtime_env=JOB_ENV,
                                 submission_id=job_id, timeout=420)
    return DemoJob(run_dir, job_id, ray_head.job_status(job_id), result.stdout + result.stderr)


@pytest.mark.ray
@pytest.mark.slow
def test_job_api_requires_token(ray_head: LocalRayHead) -> None:
    assert ray_head.get_json("/api/jobs/") is not None
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{ray_head.dashboard_url}/api/jobs/", timeout=10)
    assert err.value.code in (401, 403)


@pytest.mark.ray
@pytest.mark.slow
def test_submit_demo_job_end_to_end(ray_head: LocalRayHead, demo_job: DemoJob) -> None:
    logs, run_dir = demo_job.logs, demo_job.run_dir
    assert demo_job.status == "SUCCEEDED", logs[-6000:]
    # The job ran on the venv's interpreter, with the code from the uploaded working dir.
    assert f"JOB_PYTHON {Path(sys.prefix)}" in logs or f"JOB_PYTHON {VENV_BIN.parent}" in logs, logs[-3000:]
    pipeline_file = next(line.split(" ", 1)[1] for line in logs.splitlines() if line.startswith("JOB_PIPELINE"))
    assert not pipeline_file.startswith(str(REPO)), "the job imported the checkout, not the uploaded copy"
    assert str(ray_head.temp_dir) in pipeline_file
    # The later `--set executor.kind=ray` won over FAST's `executor.kind=local`.
    assert json.loads((run_dir / "config.json").read_text())["executor"]["kind"] == "ray"
    # The Ray executor joined this head (its GCS port) instead of starting a nested cluster; the DDP stages
    # went through Ray Train on it.
    joined = [line for line in logs.splitlines() if "ray: joining the cluster at" in line]
    gcs_port = f":{ray_head.ports['port']}"
    assert joined and all(line.rstrip().endswith(gcs_port) for line in joined), joined or logs[-3000:]
    assert "started a local cluster" not in logs
    assert "ray train: ddp-" in logs
    assert re.search(r"ray train: ddp-\w+ on 2 CPU workers", logs), logs[-3000:]
    nodes = ray_head.get_json("/nodes?view=summary")["data"]["summary"]
    assert len(nodes) == 1, nodes
    # Every stage completed; the run has its summary and evaluation record.
    store = ManifestStore(run_dir)
    for stage in ("ingest", "squeeze", "recover", "relabel", "train", "evaluate"):
        rec = store.load(stage, STAGE_RECORD)
        assert rec is not None and rec.status == "done", stage
    assert store.records("evaluate"), "no evaluate unit record"
    assert store.load("squeeze", "train").metrics["world_size"] == 2  # rank 0's metrics, from 2 ranks
    summary = json.loads((run_dir / "results" / "summary.json").read_text())
    assert summary["num_classes"] == 10 and "top1" in summary


@pytest.mark.ray
@pytest.mark.slow
def test_job_stopped_mid_recover_resumes_and_a_killed_actor_unit_is_requeued(ray_head: LocalRayHead,
                                                                           demo_job: DemoJob, tmp_path: Path) -> None:
    """A job stopped with `ray job stop` in the middle of recover, then submitted again: the second job runs only
    the missing units, and when one of its actor processes is SIGKILLed under a unit, that unit is requeued on
    another actor (one job pair covers both: the recover units of a job take most of these tests' time)."""
    assert demo_job.status == "SUCCEEDED", "the demo job failed; see test_submit_demo_job_end_to_end"
    run_dir = _teacher_copy(demo_job.run_dir, tmp_path / "run")
    entrypoint = _run_command(run_dir, *SLOW_RECOVER, stages="recover")
    first, second = _job_id("stop"), _job_id("resume")
    with _stopped_on_exit(ray_head, first, second):
        _submit_no_wait(ray_head, entrypoint, first)

        def some_done() -> bool:
            if ray_head.job_status(first) in TERMINAL:
                raise AssertionError(f"job ended before it was stopped:\n{_job_failure(ray_head, first)}")
            return len(_unit_records(run_dir)) >= 1

        _wait_for(some_done, 240, "a first recover unit record")
        assert ray_head.stop_job(first)
        assert ray_head.wait_job(first, timeout=60) == "STOPPED"
        # The driver is gone, and Ray has destroyed the actors it owned: nothing keeps writing.
        _wait_for(lambda: not _actor_processes(ray_head), 60, "the stopped job's actors to exit", poll=0.5)
        done_before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in _unit_records(run_dir)}
        assert 1 <= len(done_before) < SLOW_RECOVER_UNITS - 2, sorted(done_before)
        assert ManifestStore(run_dir).load("recover", STAGE_RECORD) is None
        outputs = {o.uri for r in ManifestStore(run_dir).records("recover") for o in r.outputs}
        outputs_before = {uri: (run_dir / uri).stat().st_mtime_ns for uri in outputs}

        _submit_no_wait(ray_head, entrypoint, second)

        def busy_actor() -> int | None:
            """An actor of the second job running a unit, once that job has committed a unit of its own."""
            if ray_head.job_status(second) in TERMINAL:
                raise AssertionError(f"job ended before an actor was killed:\n{_job_failure(ray_head, second)}")
            if len(_unit_records(run_dir)) <= len(done_before):
                return None
            running = _actor_processes(ray_head, "ray::UnitActor.run")
            return min(running) if running else None

        victim = _wait_for(busy_actor, 240, "a recover actor of the second job running a unit")
        assert len(_unit_records(run_dir)) < SLOW_RECOVER_UNITS
        os.kill(victim, signal.SIGKILL)
        status = ray_head.wait_job(second, timeout=300)
        logs = ray_head.job_logs(second)
        assert status == "SUCCEEDED", logs[-6000:]

    # only the missing units ran: the first job's records and outputs are untouched
    records = _unit_records(run_dir)
    assert len(records) == SLOW_RECOVER_UNITS
    for name, (mtime, data) in done_before.items():
        path = run_dir / "manifests" / "recover" / name
        assert (path.stat().st_mtime_ns, path.read_bytes()) == (mtime, data), f"{name} was rewritten"
    assert {uri: (run_dir / uri).stat().st_mtime_ns for uri in outputs} == outputs_before
    store = ManifestStore(run_dir)
    stage = store.load("recover", STAGE_RECORD)
    assert stage is not None and stage.status == "done"
    assert stage.metrics["units"] == SLOW_RECOVER_UNITS
    assert stage.metrics["ran"] == SLOW_RECOVER_UNITS - len(done_before)
    assert (f"stage recover: {SLOW_RECOVER_UNITS} units, {len(done_before)} done, "
            f"{SLOW_RECOVER_UNITS - len(done_before)} to run") in logs
    # the executor saw the actor die under a unit and ran that unit again on another actor
    recs = store.records("recover")
    assert all(r.status == "done" for r in recs) and not store.failures("recover")
    attempts = {r.unit: r.attempt for r in recs}
    lost = re.findall(r"actor died while running unit (\S+) \(attempt 1\)", logs)
    assert lost and all(attempts[key] == 2 for key in lost), (lost, attempts)
    assert set(attempts.values()) <= {1, 2}, attempts
    # The replacement actor and the survivors were all shut down with the stage.
    _wait_for(lambda: not _actor_processes(ray_head), 60, "the job's actors to exit", poll=0.5)
