"""The `hard` student protocol (DC/DSA/DM's evaluation): settings resolved per method, relabel skipped, the
student trained on the images' own labels, same bytes twice, and a killed run resuming to the same bytes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from manifests.store import ManifestStore
from pipeline.run.runner import compute_hashes, open_context, run_pipeline
from pipeline.train.hardlabel import epoch_order, lr_factor
from tests.helpers import clone_run, fast_config
from tests.test_student_stages import ROOT, _cli, _kill_at_epoch

HARD = ("train.protocol=hard", "recover.method=random-real")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


DIGITS = "color_crop_cutout_scale_rotate"
FULL = "color_crop_cutout_flip_scale_rotate"


@pytest.mark.parametrize("method, augment, hard_strategy, strategy, epochs", [
    ("dsa", "auto", "recipe", DIGITS, 1000),  # the demo's digits strategy (also DSA's own), 1000 epochs
    ("dm", "auto", "auto", "color_crop_scale", 1000),  # auto: the method's strategy (set below)
    ("dc", "auto", "recipe", "", 300),  # DC: no augmentation, 300 epochs
    ("random-real", "auto", "recipe", "", 300),
    ("random-real", "dsa", "recipe", DIGITS, 1000),  # the fair reference: the transforms the digits sets get
    ("random-real", "dsa", "auto", FULL, 1000),  # auto without a method strategy: the full official one
    ("dsa", "none", "recipe", "", 300),
])
def test_hard_settings_follow_the_methods_papers(teacher_run, method, augment, hard_strategy, strategy, epochs):
    from pipeline.run.stages.common import matrix
    from pipeline.run.stages.train import hard_spec

    own = [] if hard_strategy == "recipe" else [f"train.hard_dsa_strategy={hard_strategy}"]
    cfg = fast_config(f"recover.method={method}", "train.protocol=hard", f"train.hard_augment={augment}",
                      "recover.dm.strategy=color_crop_scale", *own)
    ctx = open_context(cfg, teacher_run)
    spec = hard_spec(ctx)
    assert (spec.dsa_strategy, spec.epochs) == (strategy, epochs)
    assert (spec.arch, spec.batch_size, spec.lr, spec.momentum, spec.weight_decay) == ("convnet-in", 256, 0.01, 0.9,
                                                                                       5e-4)
    assert matrix(ctx.config)[0].student == "convnet-in"


def test_epoch_order_covers_each_image_once_and_lr_drops_at_half():
    batches = epoch_order(10, 4, seed=0, epoch=3)
    assert [len(b) for b in batches] == [4, 4, 2] and sorted(sum(batches, [])) == list(range(10))
    assert epoch_order(10, 4, seed=0, epoch=3) == batches and epoch_order(10, 4, seed=0, epoch=4) != batches
    assert [lr_factor(e, 10) for e in (0, 4, 5, 9)] == [1.0, 1.0, 0.1, 0.1]


def test_hard_protocol_runs_end_to_end_without_relabel_and_twice_the_same(teacher_run, tmp_path):
    sets = (*HARD, "train.hard_epochs=30", "train.hard_augment=dsa")
    shas = []
    for name in ("a", "b"):
        run_dir = clone_run(teacher_run, tmp_path / name)
        run_pipeline(fast_config(*sets), run_dir, progress=False)
        shas.append(_sha(run_dir / "checkpoints" / "students" / "hard-convnet-in-s0.pt"))
        store = ManifestStore(run_dir)
        assert store.records("relabel") == []  # no soft labels under hard
        assert not list((run_dir / "soft_labels").glob("*.parquet")) if (run_dir / "soft_labels").exists() else True
        summary = json.loads((run_dir / "results" / "summary.json").read_text())
        assert summary["student"] == "convnet-in" and summary["relabel_mode"] is None
        proto = summary["protocol"]
        assert proto["name"] == "hard" and proto["loss"] == "cross-entropy on hard labels"
        assert proto["epochs"] == 30 and proto["augmentation"].startswith(f"DSA {DIGITS}")
        assert summary["top1"] > 30.0  # 20 real digits, 30 epochs: well above the 10 % of chance
        assert store.load("train", "hard-convnet-in-s0").metrics["protocol"] == "hard"
    assert shas[0] == shas[1]
    kd = compute_hashes(fast_config("recover.method=random-real"))
    hard = compute_hashes(fast_config(*sets))
    assert kd["train"] != hard["train"] and kd["recover"] == hard["recover"]


@pytest.mark.slow
def test_hard_training_killed_mid_run_resumes_to_the_same_bytes(teacher_run, tmp_path):
    epochs = 60  # killed at >= epoch 10: the resume crosses the lr drop at half
    sets = (*HARD, f"train.hard_epochs={epochs}", "train.hard_augment=dsa", "recover.ipc=4")
    clean = clone_run(teacher_run, tmp_path / "clean")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_cli(clean, "recover,relabel,train", *sets), cwd=ROOT, env=env, check=True,
                   capture_output=True)
    run_dir = clone_run(teacher_run, tmp_path / "killed")
    cfg = fast_config(*sets)
    train_hash = compute_hashes(cfg)["train"]
    ckpt = run_dir / "checkpoints" / "train-hard-convnet-in-s0-last.pt"
    killed_at = _kill_at_epoch(_cli(run_dir, "recover,relabel,train", *sets), ckpt, train_hash, 10,
                               tmp_path / "first.log")
    assert killed_at < epochs - 1
    subprocess.run(_cli(run_dir, "recover,relabel,train", *sets), cwd=ROOT, env=env, check=True, capture_output=True)
    rec = ManifestStore(run_dir).load("train", "hard-convnet-in-s0")
    assert rec.metrics["resumed_from_epoch"] == killed_at + 1
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["epoch"] == epochs - 1
    assert _sha(run_dir / "checkpoints" / "students" / "hard-convnet-in-s0.pt") == _sha(clean / "checkpoints" / "students" / "hard-convnet-in-s0.pt")
