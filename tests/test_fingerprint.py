"""The data folder is fingerprinted at ingest: a rerun on a changed folder is refused naming the change unless
--fresh, which redoes ingest and everything after it; `data.dataset` is named after a folder run under the demo
recipe. Runs go through the `distill` command in this process (`pipeline.commands.cli.main`) on small generated folders."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from manifests.store import ManifestStore
from pipeline.commands.cli import main
from pipeline.commands.recipes import load_config
from tests.helpers import FAST, make_image_folder


def _run(run_dir: Path, data: Path, stages: str = "ingest", *extra: str) -> list[str]:
    argv = ["run", "--run-dir", str(run_dir), "--data-dir", str(data), "--stages", stages, "--no-progress"]
    for item in (*FAST, "data.shard_size=5", *extra):
        argv += ["--set", item]
    return argv


def _add_images(folder: Path, n: int, start: int = 100) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(n):
        arr = rng.integers(0, 255, size=(40, 40, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img_{start + i:03d}.JPEG", format="JPEG", quality=90)


def _last_error(err: str) -> str:
    return err.strip().splitlines()[-1]


def test_a_changed_data_folder_is_refused_naming_each_change_unless_fresh(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    data = make_image_folder(tmp_path / "mydigits", classes=3, per_class=6)
    run_dir = tmp_path / "run"
    assert main(_run(run_dir, data)) == 0
    classes_json = run_dir / "real" / "classes.json"
    before = classes_json.read_bytes()
    assert json.loads(before)["num_classes"] == 3
    assert main(_run(run_dir, data)) == 0  # unchanged: the rerun skips every unit
    assert ManifestStore(run_dir).load("ingest", "_stage").metrics["ran"] == 0

    _add_images(data / "train" / "n00000003", 4)  # a new class in both splits
    _add_images(data / "val" / "n00000003", 2)
    capsys.readouterr()
    assert main(_run(run_dir, data)) == 2
    msg = _last_error(capsys.readouterr().err)
    assert msg.startswith("distill: error: ") and "class 'n00000003' added" in msg and "--fresh" in msg
    assert classes_json.read_bytes() == before  # nothing was rewritten

    _add_images(data / "train" / "n00000001", 3)  # and 3 more images in class 1, one fewer in val of class 2
    (data / "val" / "n00000002" / "img_000.JPEG").unlink()
    assert main(_run(run_dir, data)) == 2
    msg = _last_error(capsys.readouterr().err)
    assert "class 'n00000003' added" in msg
    assert "3 files added in class 'n00000001' (train)" in msg
    assert "1 file removed in class 'n00000002' (val)" in msg
    assert classes_json.read_bytes() == before

    assert main([*_run(run_dir, data), "--fresh"]) == 0
    meta = json.loads(classes_json.read_text())
    assert meta["num_classes"] == 4 and meta["classes"][-1] == "n00000003"
    assert meta["counts"] == {"train": 3 * 6 + 3 + 4, "val": 3 * 2 - 1 + 2}
    assert main(_run(run_dir, data)) == 0  # the new folder is now the recorded one


def test_a_file_rewritten_in_place_counts_as_a_change(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_image_folder(tmp_path / "d", classes=2, per_class=5)
    run_dir = tmp_path / "run"
    assert main(_run(run_dir, data)) == 0
    img = data / "train" / "n00000000" / "img_001.JPEG"
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # same name and size, newer
    capsys.readouterr()
    assert main(_run(run_dir, data)) == 2
    assert "files changed in class 'n00000000' (train)" in _last_error(capsys.readouterr().err)


def test_the_fingerprint_is_recorded_and_is_each_ingest_units_input(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "d", classes=2, per_class=5, non_image=1)
    run_dir = tmp_path / "run"
    assert main(_run(run_dir, data)) == 0
    fp = json.loads((run_dir / "real" / "source.json").read_text())
    assert fp["source"] == str(data.resolve()) and fp["classes"] == ["n00000000", "n00000001"]
    # the images only (the non-image file is not ingested): count, bytes, a sha256 of (name, size, mtime)
    cls0 = fp["splits"]["train"]["n00000000"]
    images = sorted((data / "train" / "n00000000").glob("*.JPEG"))
    assert cls0["files"] == 5 == len(images) and cls0["bytes"] == sum(p.stat().st_size for p in images)
    assert fp["files"] == 2 * 5 + 2 * 2 and len(fp["sha256"]) == 64
    store = ManifestStore(run_dir)
    stage = store.load("ingest", "_stage")
    assert {o.uri for o in stage.outputs} == {"real/classes.json", "real/source.json"}
    for rec in store.records("ingest"):
        assert [(i.uri, i.sha256, i.bytes) for i in rec.inputs] == [(fp["source"], fp["sha256"], fp["bytes"])]


def test_fresh_after_a_data_change_redoes_the_teacher_instead_of_resuming_it(tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture[str]) -> None:
    data = make_image_folder(tmp_path / "d", classes=3, per_class=6, size=32)
    run_dir = tmp_path / "run"
    sq = ("ingest,squeeze", "squeeze.batch_size=8")
    assert main(_run(run_dir, data, *sq)) == 0
    assert (run_dir / "checkpoints" / "squeeze-last.pt").is_file()  # what a rerun would resume from
    shutil.copytree(data / "train" / "n00000002", data / "train" / "n00000003")
    shutil.copytree(data / "val" / "n00000002", data / "val" / "n00000003")
    capsys.readouterr()
    assert main(_run(run_dir, data, *sq)) == 2
    assert "class 'n00000003' added" in _last_error(capsys.readouterr().err)
    assert main([*_run(run_dir, data, *sq), "--fresh"]) == 0
    rec = ManifestStore(run_dir).load("squeeze", "train")
    # trained again from epoch 0 on 4 classes (resuming the 3-class checkpoint would have failed or been stale)
    assert rec.metrics["resumed_from_epoch"] is None
    assert {i.uri for i in rec.inputs} >= {"real/classes.json", "real/source.json"}
    import torch

    assert torch.load(run_dir / "checkpoints" / "teacher.pt", weights_only=True)["classifier.bias"].shape == (4,)


def test_dataset_is_named_after_a_folder_run_under_the_demo_recipe(tmp_path: Path) -> None:
    folder = tmp_path / "mydigits"
    assert load_config("demo").data.dataset == "digits"  # the bundled digits keep their name
    assert load_config("demo", overrides=[f"data.source={folder}"]).data.dataset == "mydigits"
    assert load_config("demo", overrides=[f"data.source={folder}/"]).data.dataset == "mydigits"
    set_too = load_config("demo", overrides=[f"data.source={folder}", "data.dataset=digits"])
    assert set_too.data.dataset == "digits"  # set explicitly: kept
    named = load_config("imagenet1k-rn18-ipc10-dwa", overrides=[f"data.source={folder}"])
    assert named.data.dataset == "imagenet-1k"  # a recipe of a named data set keeps its name
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(f"recipe: demo\ndata: {{source: {folder}}}\n")
    assert load_config(config_file=str(yaml_file)).data.dataset == "mydigits"
    yaml_file.write_text(f"recipe: demo\ndata: {{source: {folder}, dataset: mine}}\n")
    assert load_config(config_file=str(yaml_file)).data.dataset == "mine"


def test_the_resolved_config_and_class_map_carry_the_folder_name(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "mydigits", classes=2, per_class=5)
    run_dir = tmp_path / "run"
    assert main(_run(run_dir, data)) == 0
    assert json.loads((run_dir / "config.json").read_text())["data"]["dataset"] == "mydigits"
    assert json.loads((run_dir / "real" / "classes.json").read_text())["dataset"] == "mydigits"
