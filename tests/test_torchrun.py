"""The teacher job runs unchanged under torchrun (2 gloo processes); the pipeline then adopts its result."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.run.runner import run_pipeline
from tests.helpers import fast_config


@pytest.mark.slow
def test_squeeze_under_torchrun_then_pipeline_resumes(tmp_path):
    cfg = fast_config()  # squeeze.epochs=1
    run = tmp_path / "run"
    run_pipeline(cfg, run, stages=["ingest"], progress=False)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "pipeline.torchrun", "--run-dir", str(run), "--job", "squeeze"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'world_size': 2" in proc.stdout
    assert (run / "checkpoints" / "teacher.pt").exists()
    ctx = run_pipeline(cfg, run, stages=["squeeze"], progress=False)
    rec = ctx.store.load("squeeze", "train")
    assert rec.metrics["resumed_from_epoch"] == 1  # nothing trained again: the torchrun checkpoint was adopted
    assert rec.metrics["teacher_top1"] > 10.0
