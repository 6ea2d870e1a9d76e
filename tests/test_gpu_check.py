"""`benchmarks/gpu_check.py` runs on the CPU (`--device cpu --quick`), so the script a lent GPU runs cannot rot."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402 - the script's own functions


def _run(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_quick_check_on_cpu_runs_every_part_and_writes_its_figures(tmp_path: Path) -> None:
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = report["parts"]
    assert [p for p in parts if parts[p]["status"] == "ok"] == ["env", "tests", "bench", "e2e", "variants"]
    env = parts["env"]["items"]
    assert env["matmul"]["tflops"] > 0 and env["copy"]["tb_per_s"] > 0
    # without CUDA every gpu test is collected and skipped, none is missing
    cases = parts["tests"]["items"]["cases"]
    assert len(cases) >= 7 and {c["outcome"] for c in cases} == {"skipped"}
    assert {c["test"].split("[")[0] for c in cases} >= {"test_recover_unit_on_cuda_matches_the_cpu_unit",
                                                       "test_bf16_recover_losses_stay_near_fp32",
                                                       "test_batched_views_on_cuda_match_the_cpu_loop",
                                                       "test_student_step_on_cuda_matches_the_cpu"}
    bench = parts["bench"]["items"]
    assert set(bench["rows"]) >= {"recover/sre2l", "recover/dwa", "recover/sre2l-merged", "relabel", "views", "train"}
    for row in bench["rows"].values():
        assert row["baseline"] > 0 and row["optimized"] > 0 and row["peak_memory_bytes"] > 0
    assert bench["recover_step_flops"]["per_image_iteration"] > 0
    variants = parts["variants"]["items"]
    # on a CPU only the eager variants run (no channels_last, TF32 or compiling there)
    assert list(variants["variants"]) == ["fp32 eager (baseline)", "DWA fp32 eager"]
    assert variants["variants"]["fp32 eager (baseline)"]["vs_fp32_eager"] == 1.0
    assert variants["projection"]["sre2l IPC 10 (4000 it)"]["gpu_hours"] > 0
    e2e = parts["e2e"]["items"]
    assert all(e2e["checks"].values()) and e2e["recover_unit"]["device"] == "cpu"
    text = (tmp_path / "gpu_check.txt").read_text()
    assert "[bench] ok" in text and "recover/sre2l" in text and text in proc.stdout


def test_a_part_past_its_limit_is_stopped_and_the_next_parts_still_run(tmp_path: Path) -> None:
    proc = _run(tmp_path, "--parts", "env,tests", "--limit", "env=1")
    assert proc.returncode == 1  # a part that did not finish is a failed check
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert parts["env"]["status"] == "timed out" and "limit of 1 s" in parts["env"]["error"]
    assert parts["tests"]["status"] == "ok"
    assert "[env] timed out" in (tmp_path / "gpu_check.txt").read_text()


def test_bad_part_or_limit_is_refused(tmp_path: Path) -> None:
    for args in (["--parts", "env,gpu"], ["--limit", "bench"]):
        proc = _run(tmp_path, *args)
        assert proc.returncode != 0 and "gpu_check:" in proc.stderr


def test_recover_step_flops_count_forward_and_backward_to_the_pixels() -> None:
    """ResNet-18 at 224 px is 1.82 GMACs forward (3.64 GFLOP); the backward to the pixels costs about the same
    again (each convolution's input gradient), and no weight gradient is counted."""
    b = argparse.Namespace(model="resnet18", classes=1000, resolution=224, batch=2)
    flops = gpu_check.recover_step_flops(b)
    assert flops / 2 == pytest.approx(2 * 3.64e9, rel=0.03)


def test_projection_and_achieved_fraction_follow_the_rows(tmp_path: Path) -> None:
    p = gpu_check.projection(4000.0, 2000.0, 0.5, 100, flops={"per_image_iteration": 10**10})
    # SRe2L IPC 10: 10,000 images x 4000 iterations at 4000 image-it/s = 10,000 s
    assert p["sre2l IPC 10 (4000 it)"]["gpu_hours"] == pytest.approx(10_000 / 3600, abs=0.01)
    # DWA IPC 50: 50,000 x 2000 at 2000 image-it/s, plus 0.5 s of perturbation for each of 500 batches
    assert p["dwa IPC 50 (2000 it)"]["gpu_hours"] == pytest.approx((50_000 * 2000 / 2000 + 500 * 0.5) / 3600,
                                                                     abs=0.01)
    assert p["sre2l_model_tflops"] == 40.0
    rows = {"recover/sre2l": {"baseline": 1000.0, "optimized": 4000.0}}
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "env.json").write_text(json.dumps({"items": {
        "device": {"bf16_peak_tflops_datasheet": 1000.0}, "matmul": {"dtype": "bfloat16", "tflops": 800.0}}}))
    got = gpu_check.achieved(rows, 10**10, argparse.Namespace(out=tmp_path))
    # 1e10 FLOPs per image-iteration at 4000 image-it/s = 40 TFLOP/s: 4 % of 1000, 5 % of 800
    assert got["recover/sre2l optimized"] == {"model_tflops": 40.0, "of_datasheet_bf16_peak": 0.04,
                                              "of_measured_bf16_matmul": 0.05}
