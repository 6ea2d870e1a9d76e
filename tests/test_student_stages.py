"""Relabel, student training, squeeze resume/import and the full pipeline (behaviour, under FAST settings)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from itertools import chain
from pathlib import Path

import pytest
import torch

from pipeline.augment.views import ViewConfig
from pipeline.commands.recipes import load_config
from pipeline.config import ConfigError
from pipeline.models import build_model
from pipeline.run.runner import compute_hashes, open_context, run_pipeline
from pipeline.run.stages.train import student_job
from pipeline.softlabels import ViewSource, full_target, read_soft_labels, teacher_probs
from pipeline.train.ddp import launch_local
from pipeline.train.jobs import synthetic_index
from pipeline.train.student import (
    ViewBatches,
    epoch_batches,
    load_teacher,
    render_views,
    train_student,
)
from tests.helpers import FAST, clone_run, fast_config, make_image_folder

ROOT = Path(__file__).resolve().parents[1]
TOPK = "relabel.top_k=10"  # = the digits' class count: stored labels keep every logit


@pytest.fixture(scope="module")
def relabeled_run(teacher_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clone of the teacher run with recover and stored relabel done (top_k = 10); do not modify."""
    run_dir = clone_run(teacher_run, tmp_path_factory.mktemp("relabeled") / "run")
    run_pipeline(fast_config(TOPK), run_dir, stages=["recover", "relabel"], progress=False)
    return run_dir


# ----------------------------------------------------------------------------- helpers


def _cli(run_dir: Path, stages: str, *sets: str, fresh: bool = False, data_dir: Path | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "workers.cli", "run", "--run-dir", str(run_dir), "--stages", stages,
           "--no-progress"]
    if data_dir is not None:
        cmd += ["--data-dir", str(data_dir)]
    for item in (*FAST, *sets):
        cmd += ["--set", item]
    return cmd + (["--fresh"] if fresh else [])


def _epoch_of(ckpt: Path, config_hash: str) -> int | None:
    """The epoch of a checkpoint written under `config_hash`, None if there is none (yet)."""
    if not ckpt.exists():
        return None
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError):
        return None
    return int(state["epoch"]) if state.get("config_hash") == config_hash else None


def _kill_at_epoch(cmd: list[str], ckpt: Path, config_hash: str, min_epoch: int, log: Path,
                   timeout: float = 120.0) -> int:
    """Start `cmd`, SIGKILL it once `ckpt` holds epoch >= min_epoch; return the checkpoint's epoch after death."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        try:
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"run ended (rc {proc.returncode}) before a checkpoint of epoch >= {min_epoch}:\n"
                                f"{log.read_text()[-3000:]}")
                assert time.time() < deadline, f"no checkpoint of epoch >= {min_epoch} in {timeout}s"
                epoch = _epoch_of(ckpt, config_hash)
                if epoch is not None and epoch >= min_epoch:
                    break
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run was not killed mid-run"
    final = _epoch_of(ckpt, config_hash)
    assert final is not None
    return final


def _cli_in_process(cmd: list[str]) -> int:
    """The same `distill` command line, run in this process (saves starting another interpreter)."""
    from workers.cli import main

    assert cmd[1:3] == ["-m", "workers.cli"]
    return main(cmd[3:])


# ----------------------------------------------------------------------------- 1. stored == online


def test_stored_and_online_relabel_give_the_same_targets(relabeled_run: Path) -> None:
    ctx = open_context(fast_config(TOPK), relabeled_run)
    job = student_job(ctx)
    from pipeline.data.synthetic import load_images

    images, _ = load_images(Path(job.synthetic_dir), synthetic_index(job), None)
    n, c, k, temp, seed = len(images), job.data.num_classes, job.top_k, job.temperature, job.data.seed
    assert k == c == 10 and n == 20
    cfg = job.views
    # the student's checks pass: same C, same T, and every row's views are the student's
    table = read_soft_labels(list(job.soft_labels), num_classes=c, temperature=temp, views=ViewSource(seed, n, cfg))
    assert table.k == k and len(table) == n * job.epochs
    teacher = load_teacher(job, torch.device("cpu"))
    ids = list(range(n))
    stored_by_epoch = []
    for epoch in range(job.epochs):
        with torch.no_grad():
            logits = teacher(render_views(images, ids, seed, epoch, cfg)).float()
        online = full_target(logits, temp)  # what online mode trains on
        stored = table.targets(epoch, ids)  # what stored mode trains on
        torch.testing.assert_close(stored, online, atol=1e-5, rtol=0)  # fp16 logits: ~1e-6 at T 20
        # at T = 1, where differences are not flattened (k = C: no log_z needed)
        idx, vals, _ = table.lookup(epoch, ids)
        torch.testing.assert_close(teacher_probs(idx, vals, c, 1.0), full_target(logits, 1.0), atol=1e-4, rtol=0)
        stored_by_epoch.append(teacher_probs(idx, vals, c, 1.0))
    # the comparison is not vacuous: views (and so targets) change from epoch to epoch
    assert (stored_by_epoch[0] - stored_by_epoch[1]).abs().max() > 1e-2


def test_views_rendered_on_the_device_match_the_stored_labels_and_train_a_student(relabeled_run: Path,
                                                                                  tmp_path: Path) -> None:
    """train.views_on_device=on (what auto does on a GPU), forced here on the CPU: relabel renders each batch of
    views in one call on the device and the student trains on the same; their soft labels are the per-view
    loop's (`off`) to fp16 rounding, and the student's views agree with the loop's to 2 float32 ulps."""
    on_dir = clone_run(relabeled_run, tmp_path / "on")
    ctx = run_pipeline(fast_config(TOPK, "train.views_on_device=on"), on_dir, stages=["relabel", "train"],
                       fresh=True, progress=False)
    job = student_job(ctx)
    assert job.views_on_device == "on"
    train = ctx.store.load("train", "kd-convnet-s0")
    assert train is not None and train.metrics["epochs"] == 2
    off_job = student_job(open_context(fast_config(TOPK), relabeled_run))
    from pipeline.data.synthetic import load_images

    images, _ = load_images(Path(job.synthetic_dir), synthetic_index(job), None)
    n, c, temp, seed = len(images), job.data.num_classes, job.temperature, job.data.seed
    on = read_soft_labels(list(job.soft_labels), num_classes=c, temperature=temp, views=ViewSource(seed, n, job.views))
    off = read_soft_labels(list(off_job.soft_labels), num_classes=c, temperature=temp,
                           views=ViewSource(seed, n, off_job.views))
    ids = list(range(n))
    for epoch in range(job.epochs):
        torch.testing.assert_close(on.targets(epoch, ids), off.targets(epoch, ids), atol=1e-4, rtol=0)
        batched = render_views(images, ids, seed, epoch, job.views, batched=True)
        loop = render_views(images, ids, seed, epoch, job.views)
        assert (batched - loop).abs().max() <= 1e-6  # normalized pixels: 2 ulps in [0, 1], times 1 / std


def test_student_refuses_soft_labels_of_other_views_or_temperature(relabeled_run: Path, tmp_path: Path) -> None:
    job = replace(student_job(open_context(fast_config(TOPK), relabeled_run)),
                  output=str(tmp_path / "student.pt"), checkpoint=str(tmp_path / "train-last.pt"))
    with pytest.raises(ValueError) as err:  # labels made for seed 0, a student with seed 1
        train_student(replace(job, data=replace(job.data, seed=job.data.seed + 1)))
    msg = str(err.value)
    assert "soft labels were made for other views: seed/resolution/mix settings differ; rerun relabel" in msg
    assert msg.startswith(job.soft_labels[0])
    with pytest.raises(ValueError) as err:
        train_student(replace(job, temperature=4.0))
    assert all(s in str(err.value) for s in (job.soft_labels[0], "T = 20.0", "T = 4.0"))
    assert not (tmp_path / "train-last.pt").exists()


def test_relabel_reports_what_the_stored_targets_lose(relabeled_run: Path, tmp_path: Path) -> None:
    metrics = ("soft_label_tv", "soft_label_kl", "soft_label_residual_mass")
    exact = open_context(fast_config(TOPK), relabeled_run).store.load("relabel", "_stage").metrics
    assert exact["top_k"] == 10 and all(exact[m] == 0.0 for m in metrics), exact
    run_dir = clone_run(relabeled_run, tmp_path / "run")
    cfg = fast_config("relabel.top_k=3")
    ctx = run_pipeline(cfg, run_dir, stages=["relabel"], fresh=True, progress=False)
    rec = ctx.store.load("relabel", "_stage").metrics
    assert rec["top_k"] == 3 and all(rec[m] > 1e-4 for m in metrics), rec
    assert rec["soft_label_tv"] < rec["soft_label_residual_mass"] < 1.0  # better than renormalising
    units = ctx.store.records("relabel")
    assert sum(u.metrics["measured_views"] for u in units) == 20 * 2  # fewer views than the sample size: all
    # the stored targets are still distributions over the 10 classes
    job = student_job(ctx)
    table = read_soft_labels(list(job.soft_labels), num_classes=10, temperature=job.temperature)
    probs = table.targets(1, list(range(20)))
    assert table.k == 3 and probs.shape == (20, 10)
    torch.testing.assert_close(probs.sum(1), torch.ones(20), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- 2. batch-free views


@pytest.mark.parametrize("mix", ["cutmix", "mixup"])
def test_views_do_not_depend_on_batching(mix: str) -> None:
    n, seed = 13, 7
    images = torch.randint(0, 256, (n, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cfg = ViewConfig(resolution=32, crop_scale=(0.25, 1.0), mix=mix, mix_alpha=1.0)
    ids = list(range(n))
    for epoch in (0, 3):
        whole = render_views(images, ids, seed, epoch, cfg)
        for bs in (3, 7):
            parts = torch.cat([render_views(images, ids[s:s + bs], seed, epoch, cfg) for s in range(0, n, bs)])
            assert torch.equal(parts, whole), (bs, epoch)
        # the student's batches (shuffled order, wrap-around padding, two ranks) render the same views
        for world, rank in ((1, 0), (2, 0), (2, 1)):
            seen = set()
            for x, b_ids in ViewBatches(images, epoch_batches(n, 4, world, rank, seed, epoch), seed, epoch, cfg):
                assert torch.equal(x, whole[b_ids]), (world, rank, epoch)
                seen.update(b_ids.tolist())
            assert seen
        assert not torch.equal(whole, render_views(images, ids, seed, epoch + 1, cfg))


@pytest.mark.parametrize("n,global_batch", [(13, 4), (13, 6), (13, 5), (13, 32), (20, 8)])
def test_epoch_batches_cover_every_image_with_equal_counts_per_rank(n: int, global_batch: int) -> None:
    seed = 3
    orders = []
    for epoch in range(3):
        one = epoch_batches(n, global_batch, 1, 0, seed, epoch)
        two = [epoch_batches(n, global_batch, 2, r, seed, epoch) for r in (0, 1)]
        assert len(one) == len(two[0]) == len(two[1]) == math.ceil(n / global_batch)
        assert set(chain(*one)) == set(range(n))
        assert set(chain(*two[0], *two[1])) == set(range(n))
        for b, batch in enumerate(one):
            assert len(batch) == global_batch
            assert sorted(two[0][b] + two[1][b]) == sorted(batch)
            assert len(two[0][b]) >= len(two[1][b]) >= len(two[0][b]) - 1 > 0
        orders.append(one)
    assert orders[0] != orders[1]  # a new order each epoch


# ----------------------------------------------------------------------------- 3. DDP ranks agree


def test_two_gloo_ranks_keep_identical_parameters(relabeled_run: Path, tmp_path: Path) -> None:
    from tests.student_helpers import train_and_dump

    ctx = open_context(fast_config(TOPK), relabeled_run)
    job = replace(student_job(ctx), output=str(tmp_path / "student.pt"), checkpoint=str(tmp_path / "train-last.pt"))
    metrics = launch_local(train_and_dump, {"args": job, "out": str(tmp_path)}, 2)
    assert metrics["world_size"] == 2 and metrics["resumed_from_epoch"] is None
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    expected_steps = job.epochs * math.ceil(20 / job.batch_size)
    assert [r["steps"] for r in ranks] == [expected_steps, expected_steps]
    # parameters and buffers (BatchNorm running statistics, which each rank updates with its own batches)
    s0, s1 = ({**r["params"], **r["buffers"]} for r in ranks)
    assert s0.keys() == s1.keys() and any("running_mean" in k for k in s0)
    for key in s0:
        assert torch.equal(s0[key], s1[key]), f"ranks differ at {key}"
    init = build_model(job.arch, job.data.num_classes, job.data.resolution).state_dict()
    assert all(not torch.equal(init[k], s0[k]) for k in init if "running" in k or k.endswith("weight"))
    saved = torch.load(job.output, weights_only=True)  # what rank 0 saved is what both ranks hold
    assert saved.keys() == s0.keys() and all(torch.equal(saved[k], s0[k]) for k in saved)
    assert torch.load(job.checkpoint, weights_only=True)["epoch"] == job.epochs - 1


# ----------------------------------------------------------------------------- 4./5. kill and resume


def test_train_killed_mid_run_resumes_from_its_last_epoch(relabeled_run: Path, tmp_path: Path) -> None:
    run_dir = clone_run(relabeled_run, tmp_path / "run")
    sets = (TOPK, "train.epochs=12")
    train_hash = compute_hashes(fast_config(*sets))["train"]
    ckpt = run_dir / "checkpoints" / "train-kd-convnet-s0-last.pt"
    # --fresh: train.epochs changes the relabel hash; the rerun must not need it (same hashes)
    killed_at = _kill_at_epoch(_cli(run_dir, "recover,relabel,train", *sets, fresh=True), ckpt, train_hash, 1,
                               tmp_path / "first.log")
    assert killed_at < 11
    store = open_context(fast_config(*sets), run_dir).store
    assert store.load("train", "kd-convnet-s0") is None
    assert _cli_in_process(_cli(run_dir, "recover,relabel,train", *sets)) == 0
    rec = store.load("train", "kd-convnet-s0")
    assert rec is not None and rec.status == "done" and rec.config_hash == train_hash
    assert rec.metrics["resumed_from_epoch"] == killed_at + 1 >= 2
    assert rec.metrics["epochs"] == 12
    assert _epoch_of(ckpt, train_hash) == 11
    assert (run_dir / "checkpoints" / "students" / "kd-convnet-s0.pt").is_file()


def test_squeeze_killed_mid_run_resumes_from_its_last_epoch(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", classes=3, per_class=40, size=32, val_per_class=4)
    run_dir = tmp_path / "run"
    sets = ("squeeze.epochs=6",)
    cfg = load_config("demo", overrides=[f"data.source={data}", *FAST, *sets])
    sq_hash = compute_hashes(cfg)["squeeze"]
    ckpt = run_dir / "checkpoints" / "squeeze-last.pt"
    cmd = _cli(run_dir, "ingest,squeeze", *sets, data_dir=data)
    killed_at = _kill_at_epoch(cmd, ckpt, sq_hash, 1, tmp_path / "first.log")
    assert killed_at < 5
    store = open_context(cfg, run_dir).store
    assert store.load("squeeze", "train") is None
    assert _cli_in_process(cmd) == 0
    rec = store.load("squeeze", "train")
    assert rec is not None and rec.config_hash == sq_hash
    assert rec.metrics["resumed_from_epoch"] == killed_at + 1 >= 2
    assert rec.metrics["epochs"] == 6 and "teacher_top1" in rec.metrics
    assert (run_dir / "checkpoints" / "teacher.pt").is_file()
    assert _epoch_of(ckpt, sq_hash) == 5


# ----------------------------------------------------------------------------- 6. imported teachers


def test_import_with_wrong_class_count_fails_naming_shapes_and_file(teacher_run: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = clone_run(teacher_run, tmp_path / "run")
    weights = tmp_path / "seven_classes.pt"
    torch.save(build_model("convnet", 7, 32).state_dict(), weights)
    capsys.readouterr()
    assert _cli_in_process(_cli(run_dir, "squeeze", f"squeeze.weights={weights}", fresh=True)) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # the CLI's own one-line message
    assert last.startswith("distill: error: ")
    feat = build_model("convnet", 10, 32).state_dict()["classifier.weight"].shape[1]
    assert f"classifier.weight: expected (10, {feat}), found (7, {feat})" in last
    assert "classifier.bias: expected (10), found (7)" in last
    assert str(weights) in last
    store = open_context(fast_config(f"squeeze.weights={weights}"), run_dir).store
    assert store.load("squeeze", "import") is None and store.failures("squeeze")


def test_import_of_a_matching_state_dict_is_evaluated(teacher_run: Path, tmp_path: Path) -> None:
    run_dir = clone_run(teacher_run, tmp_path / "run")
    weights = tmp_path / "teacher_copy.pt"
    weights.write_bytes((teacher_run / "checkpoints" / "teacher.pt").read_bytes())
    ctx = run_pipeline(fast_config(f"squeeze.weights={weights}"), run_dir, stages=["squeeze"], fresh=True,
                       progress=False)
    rec = ctx.store.load("squeeze", "import")
    assert rec is not None and rec.status == "done"
    trained = open_context(fast_config(), teacher_run).store.load("squeeze", "train")
    # the same weights on the same val set: the same accuracy as when they were trained
    assert rec.metrics["teacher_top1"] == trained.metrics["teacher_top1"]
    assert rec.metrics["weights"] == str(weights)
    src = torch.load(weights, weights_only=True)
    out = torch.load(run_dir / "checkpoints" / "teacher.pt", weights_only=True)
    assert src.keys() == out.keys() and all(torch.equal(src[k], out[k]) for k in src)


def test_torchvision_weights_missing_from_cache_fail_without_network(teacher_run: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.request

    run_dir = clone_run(teacher_run, tmp_path / "run")
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))

    def no_network(*_a: object, **_k: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    cfg = fast_config("squeeze.arch=resnet18", "squeeze.weights=ResNet18_Weights.IMAGENET1K_V1")
    with pytest.raises(ConfigError) as err:
        run_pipeline(cfg, run_dir, stages=["squeeze"], fresh=True, progress=False)
    msg = str(err.value)
    assert "ResNet18_Weights.IMAGENET1K_V1" in msg
    assert "local cache" in msg and str(home) in msg
    assert "cannot download" in msg
    assert list(home.rglob("*")) == []


# ----------------------------------------------------------------------------- 7. full pipeline


SUMMARY_FIELDS = ("method", "ipc", "num_classes", "num_images", "teacher", "student", "teacher_top1", "top1", "top5",
                  "holdout_top1", "epochs", "relabel_mode", "seed", "wall_s", "protocol", "cells", "baselines",
                  "fairness", "cost")


def test_full_fast_pipeline_summary_and_online_mode(relabeled_run: Path, tmp_path: Path) -> None:
    run_dir = clone_run(relabeled_run, tmp_path / "stored")
    cfg = fast_config(TOPK)
    ctx = run_pipeline(cfg, run_dir, progress=False)
    summary = json.loads((run_dir / "results" / "summary.json").read_text())
    missing = [f for f in SUMMARY_FIELDS if f not in summary]
    assert not missing, missing
    assert summary["method"] == cfg.recover.method and summary["ipc"] == 2
    assert summary["num_classes"] == 10 and summary["num_images"] == 20
    assert summary["teacher"] == summary["student"] == "convnet"
    assert summary["teacher_top1"] == ctx.store.load("squeeze", "train").metrics["teacher_top1"]
    assert 0.0 <= summary["top1"] <= summary["top5"] <= 100.0
    assert [(c["protocol"], c["student"], c["seed"]) for c in summary["cells"]] == [("kd", "convnet", 0)]
    assert summary["cells"][0]["top1"] == summary["top1"] and 0.0 <= summary["holdout_top1"] <= 100.0
    assert summary["baselines"] == {} and summary["cost"]["device"] == "cpu" and summary["cost"]["device_hours"] > 0
    assert summary["epochs"] == 2 and summary["relabel_mode"] == "stored" and summary["seed"] == cfg.seed
    stages = ("ingest", "squeeze", "difficulty", "experts", "recover", "relabel", "train", "baseline", "evaluate")
    assert set(summary["wall_s"]) == set(stages)  # difficulty and experts: 0 units for this method
    assert all(isinstance(summary["wall_s"][s], (int, float)) and summary["wall_s"][s] >= 0 for s in stages)
    assert summary["protocol"]["epochs"] == 2 and summary["protocol"]["relabel_mode"] == "stored"
    relabel = ctx.store.load("relabel", "_stage").metrics
    files = sorted((run_dir / "soft_labels").glob("*.parquet"))
    assert files and relabel["soft_label_bytes"] == sum(f.stat().st_size for f in files)
    assert relabel["full_logit_bytes"] == 20 * 2 * (2 * 10 + 29)

    online_dir = clone_run(run_dir, tmp_path / "online")
    online_cfg = fast_config(TOPK, "relabel.mode=online")
    before = (online_dir / "checkpoints" / "students" / "kd-convnet-s0.pt").stat().st_mtime_ns
    octx = run_pipeline(online_cfg, online_dir, fresh=True, progress=False)
    soft = online_dir / "soft_labels"
    assert not soft.exists() or not any(soft.iterdir())
    orel = octx.store.load("relabel", "_stage").metrics
    assert orel["units"] == 0 and orel["soft_label_bytes"] == 0 and orel["mode"] == "online"
    train = octx.store.load("train", "kd-convnet-s0")
    assert train is not None and train.config_hash == octx.hashes["train"] and train.metrics["epochs"] == 2
    assert (online_dir / "checkpoints" / "students" / "kd-convnet-s0.pt").stat().st_mtime_ns != before
    osummary = json.loads((online_dir / "results" / "summary.json").read_text())
    assert osummary["relabel_mode"] == "online" and 0.0 <= osummary["top1"] <= 100.0


def test_saved_weights_are_byte_identical_across_runs(tmp_path: Path) -> None:
    """torch.save through a temp name must not leak the (pid-dependent) temp name into the archive."""
    import torch

    from pipeline.train.trainloop import save_atomic

    state = {"w": torch.arange(6.0).reshape(2, 3)}
    save_atomic(state, tmp_path / "a.pt")
    save_atomic(state, tmp_path / "b.pt")  # another name, as another run's checkpoint or temp file would have
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["w"], state["w"])
