"""The evaluation matrix (protocol x student x seed units), the holdout slice, baselines and cost in the summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from manifests.store import ManifestStore
from pipeline.data.holdout import holdout_count, holdout_rows
from pipeline.run.runner import run_pipeline
from tests.helpers import FAST, clone_run, fast_config, sigkill_when

REPO = Path(__file__).resolve().parents[1]

# 2 students x 2 seeds x 2 protocols, a couple of epochs each
MATRIX = ["eval.students=[convnet, lenet]", "eval.seeds=2", "eval.protocols=[kd, hard]", "train.hard_epochs=2",
          "train.hard_batch_size=8", "relabel.top_k=10"]


# ------------------------------------------------------------------------------------------- holdout (pure)

def test_holdout_rows_are_a_seeded_share_of_each_class_never_the_last_image():
    by_class = {0: list(range(0, 40)), 1: list(range(40, 43)), 2: [43], 3: list(range(44, 64))}
    rows = holdout_rows(by_class, 0.05, seed=7)
    per = {c: [r for r in rows if r in set(v)] for c, v in by_class.items()}
    assert [len(per[c]) for c in range(4)] == [2, 1, 0, 1]  # round(5 %), at least one, none of a single image
    assert holdout_rows(by_class, 0.05, seed=7) == rows  # seeded
    assert holdout_rows(by_class, 0.05, seed=8) != rows
    # a class's slice does not depend on the other classes
    assert [r for r in holdout_rows({0: by_class[0]}, 0.05, 7)] == per[0]
    assert holdout_count(2, 0.49) == 1 and holdout_count(10, 0.0) == 0 and holdout_count(3, 0.45) == 1


def test_config_refuses_bad_matrix_values():
    from pipeline.config import ConfigError

    for bad in (["eval.protocols=[kd, soft]"], ["eval.baselines=[random]"], ["eval.students=[convnet, convnet]"],
                ["eval.seeds=0"], ["eval.holdout_fraction=0.6"], ["eval.select=best-holdout"],
                ["eval.students=[no-such-net]"]):
        with pytest.raises(ConfigError, match="eval"):
            fast_config(*bad)
    cfg = fast_config(*MATRIX)
    from pipeline.run.stages.common import matrix

    cells = matrix(cfg)
    assert len(cells) == 8 and cells[0].key == "kd-convnet-s0" and cells[-1].key == "hard-lenet-s1"
    assert {c.key for c in cells} == {type(c).from_key(c.key).key for c in cells}


# ------------------------------------------------------------------------------------ holdout in the stages

def test_holdout_images_never_reach_a_distilled_set_or_the_full_real_students(teacher_run, tmp_path):
    from pipeline.data.synthetic import load_images
    from pipeline.run.runner import open_context
    from pipeline.run.stages.common import recover_index_paths
    from pipeline.run.stages.train import holdout_spec
    from pipeline.train.full_real import load_train_images

    run_dir = clone_run(teacher_run, tmp_path / "run")
    cfg = fast_config("recover.method=random-real", "recover.ipc=10", "recover.ipc_per_unit=10",
                      "eval.holdout_fraction=0.2")
    run_pipeline(cfg, run_dir, stages=["recover"], progress=False)
    ctx = open_context(cfg, run_dir)
    spec = holdout_spec(ctx)
    images = spec.images()
    held = holdout_rows(images.rows_of_class(), spec.fraction, spec.seed)
    everything, labels = load_train_images(type(spec)(spec.real_dir, spec.index_paths, 0.0, 0), cfg.data.resolution)
    kept, _ = load_train_images(spec, cfg.data.resolution)
    assert len(kept) == len(everything) - len(held) and len(held) >= 10 * 2  # 20 % of each digit
    from pipeline.data.shards import read_index
    from pipeline.data.synthetic import synthetic_index_paths

    index = read_index(synthetic_index_paths(run_dir, ctx.store.records("recover")))
    synthetic, _ = load_images(run_dir / "synthetic", index)
    assert len(synthetic) == 100 and len(recover_index_paths(ctx)) >= 1
    flat = everything.flatten(1)
    held_set = set(held)
    matches = [torch.nonzero((flat == img.flatten()).all(1)).flatten().tolist() for img in synthetic]
    assert all(m for m in matches), "random-real images are real training images, byte for byte"
    assert not any(r in held_set for m in matches for r in m), "a held-out image is in the distilled set"


# ------------------------------------------------------------------------------- the matrix, killed and resumed

def _train_records(run_dir: Path) -> list[Path]:
    return [p for p in (run_dir / "manifests" / "train").glob("*.json") if not p.name.startswith("_")
            and not p.name.endswith(".failed.json")] if (run_dir / "manifests" / "train").is_dir() else []


@pytest.mark.slow
def test_a_tiny_matrix_completes_and_survives_a_killed_driver(teacher_run, tmp_path):
    extra = ["eval.baselines=[random-real, full-real]", "eval.full_real_epochs=1", "eval.every=1",
             "eval.select=best-holdout"]
    clean = clone_run(teacher_run, tmp_path / "clean")
    run_pipeline(fast_config(*MATRIX, *extra), clean, progress=False)
    summary = json.loads((clean / "results" / "summary.json").read_text())
    keys = [(c["protocol"], c["student"], c["seed"]) for c in summary["cells"]]
    assert keys == [(p, s, k) for p in ("kd", "hard") for s in ("convnet", "lenet") for k in (0, 1)]
    assert all(0 <= c["top1"] <= 100 and c["holdout_top1"] is not None for c in summary["cells"])
    # best-holdout: the epoch best on the holdout slice, reported beside the final one, chosen from the history
    store = ManifestStore(clean)
    for c in summary["cells"]:
        key = f"{c['protocol']}-{c['student']}-s{c['seed']}"
        history = store.load("train", key).metrics["history"]
        assert [h["epoch"] for h in history] == [1, 2]
        best = max(history, key=lambda h: (h["holdout_top1"], -h["epoch"]))
        assert c["best_holdout"]["epoch"] == best["epoch"]
        assert c["best_holdout"]["holdout_top1"] == pytest.approx(best["holdout_top1"])
        assert (clean / "checkpoints" / "students" / f"{key}-best.pt").is_file()
    # student seeds differ: seed 1 is not a copy of seed 0
    a, b = (torch.load(clean / "checkpoints" / "students" / f"hard-convnet-s{k}.pt") for k in (0, 1))
    assert not torch.equal(a[next(iter(a))], b[next(iter(b))])
    base = summary["baselines"]
    assert [(c["protocol"], c["student"], c["seed"]) for c in base["random-real"]["cells"]] == keys
    assert (clean / base["random-real"]["run_dir"] / "results" / "summary.json").is_file()
    assert [(c["student"], c["seed"]) for c in base["full-real"]["cells"]] == [
        ("convnet", 0), ("convnet", 1), ("lenet", 0), ("lenet", 1)]
    fair = {(f["protocol"], f["student"]): f for f in summary["fairness"]}
    assert set(fair) == {(p, s) for p in ("kd", "hard") for s in ("convnet", "lenet")}
    assert all(f["ior"] is not None for f in fair.values())
    assert fair[("hard", "convnet")]["hlr"] is not None and fair[("hard", "convnet")]["lrs"] is not None
    cost = summary["cost"]
    assert cost["device"] == "cpu" and cost["device_hours"] > 0 and cost["gpu_hours"] == 0
    assert cost["stages"]["train"]["units"] == 8 and cost["stages"]["train"]["peak_memory_bytes"] > 0

    # the same matrix, its driver SIGKILLed after some cells finished: the rerun trains only the others (the
    # baselines are left out here: they are runs of their own, and leave the cells' numbers as they are)
    run_dir = clone_run(teacher_run, tmp_path / "killed")
    cmd = [sys.executable, "-m", "workers.cli", "run", "--run-dir", str(run_dir), "--no-progress"]
    for o in [*FAST, *MATRIX, "eval.every=1", "eval.select=best-holdout"]:
        cmd += ["--set", o]
    sigkill_when(cmd, REPO, lambda: len(_train_records(run_dir)) >= 2, tmp_path / "driver.out", timeout=300)
    done = {p.name: p.read_bytes() for p in _train_records(run_dir)}
    assert 2 <= len(done) < 8
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in _train_records(run_dir) if p.name in done} == done  # not redone
    resumed = json.loads((run_dir / "results" / "summary.json").read_text())
    assert [c["top1"] for c in resumed["cells"]] == [c["top1"] for c in summary["cells"]]  # same numbers on CPU
    for cell in ("kd-lenet-s1", "hard-convnet-s0"):
        rec = ManifestStore(run_dir).load("train", cell)
        assert rec is not None and rec.metrics["images_per_s"] > 0


# ---------------------------------------------------------------------------------------------------- cost

def test_cost_sums_per_stage_and_keeps_the_baselines_apart(monkeypatch):
    from pipeline.run.cost import run_cost, stage_cost, unit_usage

    usage = unit_usage(2.0, {"peak_memory_bytes": 123})
    assert usage == {"wall_s": 2.0, "device": "cpu", "device_s": 2.0, "peak_memory_bytes": 123}  # the unit's own peak
    assert unit_usage(1.5, {})["peak_memory_bytes"] > 0  # the process's peak RSS otherwise
    gpu = [{"wall_s": 10.0, "device": "cuda", "device_s": 40.0, "peak_memory_bytes": 5},
           {"wall_s": 20.0, "device": "cuda", "device_s": 5.0, "peak_memory_bytes": 9}]
    train = stage_cost(gpu)
    assert train == {"units": 2, "wall_s": 30.0, "device_s": 45.0, "gpu_s": 45.0, "peak_memory_bytes": 9}
    cpu = stage_cost([{"wall_s": 3600.0, "device": "cpu", "device_s": 3600.0}])
    total = run_cost({"train": train, "recover": cpu, "baseline": cpu})
    assert total["device"] == "cuda" and total["gpu_hours"] == round(45 / 3600, 6)
    assert total["device_hours"] == round((45 + 3600) / 3600, 6) and total["baseline_device_hours"] == 1.0


# ------------------------------------------------------------------------------------------ fairness metrics

def test_fairness_metrics_from_known_accuracies():
    import math

    from manifests.fairness import fairness_rows, hlr, ior, lrs

    assert ior(60.0, 50.0) == pytest.approx(0.10) and hlr(90.0, 40.0) == pytest.approx(0.50)
    want = (math.exp((0.10 - 0.50) / 2) - math.exp(-1)) / (math.e - math.exp(-1))
    assert lrs(0.10, 0.50) == pytest.approx(want) and 0.0 <= want <= 1.0
    assert lrs(1.0, -1.0) == pytest.approx(1.0) and lrs(-1.0, 1.0) == pytest.approx(0.0)  # fractions: [0, 1]
    assert ior(None, 50.0) is None and hlr(90.0, None) is None and lrs(0.1, None) is None
    cells = [{"protocol": "kd", "student": "convnet", "seed": 0, "top1": 60.0},
             {"protocol": "kd", "student": "convnet", "seed": 1, "top1": 62.0},
             {"protocol": "hard", "student": "convnet", "seed": 0, "top1": 40.0},
             {"protocol": "kd", "student": "lenet", "seed": 0, "top1": 30.0}]
    baselines = {"random-real": {"cells": [{"protocol": "kd", "student": "convnet", "seed": 0, "top1": 50.0},
                                           {"protocol": "kd", "student": "convnet", "seed": 1, "top1": 52.0},
                                           {"protocol": "hard", "student": "convnet", "seed": 0, "top1": 45.0}]},
                 "full-real": {"cells": [{"protocol": "hard", "student": "convnet", "seed": 0, "top1": 90.0}]}}
    rows = {(r["protocol"], r["student"]): r for r in fairness_rows(cells, baselines)}
    assert list(rows) == [("kd", "convnet"), ("hard", "convnet"), ("kd", "lenet")]
    kd = rows[("kd", "convnet")]
    assert kd["n"] == 2 and kd["top1"] == 61.0 and kd["random_top1"] == 51.0
    assert kd["ior"] == pytest.approx(0.10) and kd["hlr"] == pytest.approx(0.50)  # HLR from the hard cells
    assert kd["lrs"] == pytest.approx(want)
    assert rows[("hard", "convnet")]["ior"] == pytest.approx(-0.05)
    lenet = rows[("kd", "lenet")]
    assert lenet["random_top1"] is None and lenet["ior"] is None and lenet["hlr"] is None and lenet["lrs"] is None


@pytest.mark.parametrize(("method", "augment"), [("dm", "dsa"), ("mtt", "dsa"), ("dwa", "auto"), ("herding", "auto")])
def test_the_random_real_baseline_trains_its_hard_students_as_the_methods(tmp_path, method, augment):
    """Random real images under the same protocol: a DSA-evaluated method's baseline gets DSA too (with the method's
    strategy); for the others random-real's own `auto` already is the same, and the config (and its hash) is kept."""
    from pipeline.run.base import RunContext
    from pipeline.run.stages.baseline import random_real_config

    cfg = fast_config(f"recover.method={method}")
    child = random_real_config(RunContext(run_dir=tmp_path, config=cfg, run_id="t"))
    assert child.recover.method == "random-real" and child.eval.baselines == []
    assert child.train.hard_augment == augment
    if augment == "dsa":
        assert child.train.hard_dsa_strategy == "color_crop_cutout_scale_rotate"  # the demo's digits strategy
    else:
        assert child.train == cfg.train
