"""The experts stage and the trajectory-matching methods through the pipeline, on a tiny generated image folder
(3 classes, 16 px): nothing is trained for other methods, a SIGKILL mid-stage resumes to the same bytes, the
experts are shared by key, mtt and pad run end to end with the `own` protocol and the export, and bad settings
stop the load with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from manifests.store import ManifestStore
from pipeline.config import ConfigError
from pipeline.run.runner import run_pipeline
from tests.helpers import FAST, fast_config, make_image_folder, sigkill_when

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("tm") / "data", classes=3, per_class=8, size=20, val_per_class=2)


def _sets(tiny: Path, *extra: str) -> list[str]:
    return [f"data.source={tiny}", "data.resolution=16", "recover.classes_per_shard=0", "recover.ipc=1",
            "experts.num=2", "experts.epochs=3", "experts.el2n_networks=2", "experts.el2n_epoch=1", "experts.batch_size=8", "squeeze.batch_size=8", "recover.mtt.iterations=3",
            "recover.mtt.syn_steps=2", "recover.mtt.max_start_epoch=2", "recover.mtt.expert_epochs=1",
            "recover.pad.iterations=3", "recover.pad.syn_steps=2", "recover.pad.max_start_epoch=2",
            "recover.pad.expert_epochs=1", "train.hard_epochs=2", "eval.protocols=[hard,own]", *extra]


def _expert_files(run_dir: Path) -> dict[str, str]:
    return {r.unit: r.outputs[0].sha256 for r in ManifestStore(run_dir).records("experts")}


def test_no_expert_is_trained_for_a_method_without_trajectories(tiny, tmp_path):
    run_dir = tmp_path / "run"
    run_pipeline(fast_config(*_sets(tiny, "recover.method=dm")), run_dir, stages=["ingest", "experts"], progress=False)
    assert ManifestStore(run_dir).records("experts") == []
    assert not (run_dir / "experts").exists()


def test_a_sigkill_in_the_experts_stage_resumes_to_the_same_bytes(tiny, tmp_path):
    sets = _sets(tiny, "recover.method=mtt", "experts.epochs=12")
    clean = tmp_path / "clean"
    run_pipeline(fast_config(*sets), clean, stages=["ingest", "experts"], progress=False)
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "workers.cli", "run", "--run-dir", str(run_dir), "--stages", "ingest,experts",
           "--no-progress"]
    for o in [*FAST, *sets]:
        cmd += ["--set", o]
    sigkill_when(cmd, REPO, lambda: any((run_dir / "experts").glob("*/expert-*.partial.pt")),
                 tmp_path / "driver.out")
    (partial,) = (run_dir / "experts").glob("*/expert-*.partial.pt")
    run_pipeline(fast_config(*sets), run_dir, stages=["ingest", "experts"], progress=False)
    assert _expert_files(run_dir) == _expert_files(clean) and len(_expert_files(clean)) == 2
    recs = {r.unit: r for r in ManifestStore(run_dir).records("experts")}
    assert recs[partial.name.split(".")[0]].metrics.get("resumed_at_epoch", 0) >= 1
    assert not list((run_dir / "experts").glob("*/*.partial.pt")), "a finished expert leaves no partial state"


def test_mtt_and_pad_run_end_to_end_sharing_their_experts(tiny, tmp_path):
    from pipeline.commands.export import export_run
    from pipeline.data.synthetic import read_set_labels

    shared = tmp_path / "experts"
    mtt_dir, pad_dir = tmp_path / "mtt", tmp_path / "pad"
    run_pipeline(fast_config(*_sets(tiny, "recover.method=mtt", f"experts.dir={shared}")), mtt_dir, progress=False)
    summary = json.loads((mtt_dir / "results" / "summary.json").read_text())
    syn_lr = summary["learned"]["syn_lr"]
    assert syn_lr > 0 and summary["protocols"]["hard"]["lr"] == pytest.approx(syn_lr)  # MTT's evaluation lr
    assert summary["protocols"]["own"]["loss"].endswith("(the set has no learned labels)")
    assert {c["protocol"] for c in summary["cells"]} == {"hard", "own"}
    assert summary["cost"]["stages"]["experts"]["units"] == 2 and summary["cost"]["stages"]["experts"]["device_s"] > 0

    # DATM's way (pad without PAD's data schedule): the same experts as the mtt run, read back from the shared folder
    run_pipeline(fast_config(*_sets(tiny, "recover.method=pad", "experts.schedule=none", f"experts.dir={shared}")),
                 pad_dir, progress=False)
    experts = ManifestStore(pad_dir).records("experts")
    assert len(experts) == 2 and all(r.metrics["cached"] for r in experts)  # the mtt run's files, read back
    recover = ManifestStore(pad_dir).records("recover")
    labels = read_set_labels(pad_dir, recover)
    assert labels is not None and labels.shape == (3, 3)
    assert labels.argmax(1).tolist() == [0, 1, 2] or labels.std() > 0  # learned logits, one row per image
    summary = json.loads((pad_dir / "results" / "summary.json").read_text())
    assert summary["learned_labels"] and "learned labels" in summary["protocols"]["own"]["loss"]
    own = [r for r in ManifestStore(pad_dir).records("train") if r.unit.startswith("own-")]
    assert own and own[0].metrics["targets"] == "learned"
    out = export_run(pad_dir, tmp_path / "export")
    assert sorted(p.name for p in (out / "labels").iterdir()) == sorted(
        [Path(o.uri).name for r in recover for o in r.outputs if o.uri.endswith(".labels.npy")] + ["set_values.json"])


@pytest.mark.parametrize(("sets", "key"), [
    (["recover.method=mtt", "experts.epochs=10", "recover.mtt.max_start_epoch=10"], "recover.mtt.max_start_epoch"),
    (["recover.method=mtt", "experts.epochs=10", "recover.mtt.max_start_epoch=9", "recover.mtt.expert_epochs=3"],
     "recover.mtt.max_start_epoch"),
    (["recover.method=pad", "recover.pad.syn_steps=0"], "syn_steps"),
    (["recover.method=pad", "recover.ipc=10", "recover.pad.max_start_epoch=3", "recover.pad.start_upper=4"],
     "recover.pad.start_upper"),
    (["recover.method=mtt", "recover.mtt.syn_steps=-1"], "syn_steps"),
    (["experts.schedule=easy"], "experts.schedule"),
    (["recover.method=pad", "experts.difficulty=teacher-loss", "squeeze.sample_stats=false"], "experts.difficulty"),
])
def test_bad_trajectory_settings_are_refused_at_load(sets, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        fast_config(*sets)


def test_pads_start_window_keeps_datms_proportions_when_shortened():
    """auto start_upper / start_growth_iterations are the official CIFAR-10 values at the official max_start_epoch and
    iterations, and the same shares of shortened ones (the demo's window at IPC 10 once started at 10 of a bound of 3,
    past its 4-epoch experts: a run-time IndexError)."""
    from pipeline.methods.pad import PadConfig

    official = {i: (PadConfig().resolved(i)["start_upper"], PadConfig().resolved(i)["start_growth_iterations"])
                for i in (1, 10, 50)}
    assert official == {1: (0, 0), 10: (10, 1000), 50: (20, 2000)}
    short = PadConfig(iterations=100, max_start_epoch=3)
    assert (short.resolved(10)["start_upper"], short.resolved(10)["start_growth_iterations"]) == (2, 10)
    assert (short.resolved(50)["start_upper"], short.resolved(50)["start_growth_iterations"]) == (2, 20)
    assert short.resolved(1)["start_upper"] == 0
    cfg = fast_config("recover.method=pad", "recover.ipc=10", "recover.pad.max_start_epoch=3",
                      "recover.pad.expert_epochs=1", "experts.epochs=4")
    assert cfg.recover.ipc == 10  # loads: the window stays inside the experts' 4 epochs


def test_the_cli_exits_2_naming_the_key(tmp_path):
    cmd = [sys.executable, "-m", "workers.cli", "run", "--run-dir", str(tmp_path / "r"), "--no-progress",
           "--set", "recover.method=mtt", "--set", "experts.epochs=5", "--set", "recover.mtt.max_start_epoch=5"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "recover.mtt.max_start_epoch" in proc.stderr
    assert not (tmp_path / "r" / "manifests").exists()


def test_the_experts_schedule_auto_is_pad_for_pad_only():
    assert fast_config("recover.method=pad").experts.schedule == "pad"
    assert fast_config("recover.method=mtt").experts.schedule == "none"
    assert fast_config("recover.method=pad", "experts.schedule=none").experts.schedule == "none"


def test_distill_methods_lists_mtt_and_pad_with_their_keys_and_differences(capsys):
    from pipeline.commands.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "mtt: MTT" in out and "pad: PAD" in out and "needs: real images, trajectories" in out
    assert main(["methods", "pad"]) == 0
    out = capsys.readouterr().out
    for key in ("syn_steps = 80", "mask = 'loss-ratio'", "mask_ratio = -1.0", "lr_label", "loss_threshold", "memory"):
        assert key in out, key
    assert "differences from the official code:" in out and "GSAM" in out and "loss_threshold_low" in out


@pytest.mark.parametrize("difficulty", ["el2n", "teacher-loss"])
def test_pad_experts_train_on_the_easy_share_first(tiny, tmp_path, difficulty):
    """PAD's schedule, ordered by the difficulty stage's EL2N or the teacher's loss: the first epoch trains on half
    of each class, then on all of it; EL2N scores exist only under el2n."""
    import torch

    sets = _sets(tiny, "recover.method=pad", f"experts.difficulty={difficulty}", "experts.pad_init_ratio=0.5",
                 "experts.pad_add_end_epoch=1", "experts.pad_remove_epochs=[5,6]")
    run_dir = tmp_path / "run"
    run_pipeline(fast_config(*sets), run_dir, stages=["ingest", "squeeze", "difficulty", "experts"], progress=False)
    scores = ManifestStore(run_dir).records("difficulty")
    assert len(scores) == (2 if difficulty == "el2n" else 0)
    for rec in scores:
        obj = torch.load(run_dir / rec.outputs[0].uri, weights_only=True)
        assert obj["el2n"].shape == obj["rows"].shape and ((obj["el2n"] >= 0) & (obj["el2n"] <= 2 ** 0.5)).all()
    (first, *_) = ManifestStore(run_dir).records("experts")
    n = first.metrics["images_trained"]
    per_epoch = n / (0.5 + 2)  # epoch 0: half of each class; epochs 1, 2: all of it
    assert abs(n - per_epoch * 2.5) < 1e-9 and 20 <= per_epoch <= 24


def test_the_difficulty_keys_move_only_the_hashes_of_stages_that_read_them():
    from pipeline.run.runner import compute_hashes

    mtt = compute_hashes(fast_config("recover.method=mtt"))
    changed = compute_hashes(fast_config("recover.method=mtt", "experts.el2n_networks=3"))
    assert {k: v for k, v in changed.items() if k != "difficulty"} == {k: v for k, v in mtt.items() if k != "difficulty"}
    pad = compute_hashes(fast_config("recover.method=pad"))
    other = compute_hashes(fast_config("recover.method=pad", "experts.el2n_networks=3"))
    assert other["difficulty"] != pad["difficulty"] and other["experts"] != pad["experts"]
    assert other["squeeze"] == pad["squeeze"]
