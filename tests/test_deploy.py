"""Deployment files: static checks (fast) and a real `ray job submit` to a private local head (slow).

The Ray test starts its own head with `ray start --head --block` under a private temp dir and free ports,
and stops exactly that head's processes by pid at the end (never `ray stop`, which would also stop other
sessions' clusters); see tests/ray_cluster.py for how the processes are found.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from manifests.store import STAGE_RECORD, ManifestStore
from tests.ray_cluster import REPO, VENV_BIN, LocalRayHead, start_head

DEPLOY = REPO / "deploy"
JOB_EXCLUDES = [".venv", "runs", ".git", ".pytest_cache", ".ruff_cache", "benchmarks/out"]


# --------------------------------------------------------------------------------------------- static


def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _pod_templates(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def test_cli_runs_as_module() -> None:
    assert 'if __name__ == "__main__":' in (REPO / "pipeline" / "cli.py").read_text()


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
        assert doc["spec"]["entrypoint"] == ("python -m pipeline.cli run --recipe imagenet1k-rn18-ipc10-dwa "
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
        "deploy/ray/runtime_env.yaml", "--no-wait", "--", "python", "-m", "pipeline.cli", "run", "--recipe", "demo",
        "--run-dir", "/runs/x\\", "y",
    ]


# --------------------------------------------------------------------------------------------- Ray job


@pytest.fixture(scope="module")
def ray_head() -> Iterator[LocalRayHead]:
    head = start_head(num_cpus=2)
    try:
        yield head
    finally:
        pids = head.stop()
        assert pids, "found no processes of the head to stop"
        assert not (head.pids() & pids), "some of the head's processes survived stop()"


@pytest.mark.ray
@pytest.mark.slow
def test_job_api_requires_token(ray_head: LocalRayHead) -> None:
    assert ray_head.get_json("/api/jobs/") is not None
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{ray_head.dashboard_url}/api/jobs/", timeout=10)
    assert err.value.code in (401, 403)


@pytest.mark.ray
@pytest.mark.slow
def test_submit_ingest_job(ray_head: LocalRayHead, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # One shell entrypoint: report the interpreter and where `pipeline` is imported from, then run ingest.
    check = ("import sys, pipeline; "
             "print('JOB_PYTHON', sys.prefix); print('JOB_PIPELINE', pipeline.__file__)")
    script = (f"python -c {json.dumps(check)} && exec python -m pipeline.cli run --recipe demo --stages ingest "
              f"--run-dir {run_dir} --set ray.executor=ray --no-progress")
    job_id = f"distill-test-{uuid.uuid4().hex[:8]}"
    env = {"excludes": JOB_EXCLUDES, "env_vars": {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}}
    result = ray_head.submit(["sh", "-c", script], working_dir=REPO, runtime_env=env, submission_id=job_id,
                             timeout=300)
    logs = result.stdout + result.stderr
    assert result.returncode == 0, logs[-6000:]
    assert ray_head.job_status(job_id) == "SUCCEEDED"
    # The job ran on the venv's interpreter, with the code from the uploaded working dir.
    assert f"JOB_PYTHON {Path(sys.prefix)}" in logs or f"JOB_PYTHON {VENV_BIN.parent}" in logs, logs[-3000:]
    pipeline_file = next(line.split(" ", 1)[1] for line in logs.splitlines() if line.startswith("JOB_PIPELINE"))
    assert not pipeline_file.startswith(str(REPO)), "the job imported the checkout, not the uploaded copy"
    assert str(ray_head.temp_dir) in pipeline_file
    stage = ManifestStore(run_dir).load("ingest", STAGE_RECORD)
    assert stage is not None and stage.status == "done"
    assert ManifestStore(run_dir).records("ingest"), "no ingest unit records"
