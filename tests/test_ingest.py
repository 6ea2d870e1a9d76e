"""Ingest: shards, indexes, bad input, resume."""

from __future__ import annotations

import json
import tarfile

import pytest

from manifests.store import ManifestStore
from pipeline.commands.recipes import load_config
from pipeline.config import ConfigError
from pipeline.data.shards import read_index, read_member
from pipeline.run.runner import StageFailed, run_pipeline
from tests.helpers import make_image_folder


def _ingest(data_dir, run_dir, *extra):
    cfg = load_config("demo", overrides=[f"data.source={data_dir}", "data.shard_size=5", *extra])
    return run_pipeline(cfg, run_dir, stages=["ingest"], progress=False)


def test_ingest_folder_with_corrupt_and_non_image(image_folder, tmp_path, caplog):
    ctx = _ingest(image_folder, tmp_path / "run", "data.max_bad_fraction=0.2")
    meta = json.loads((ctx.path("real", "classes.json")).read_text())
    assert meta["classes"] == ["n00000000", "n00000001", "n00000002"]
    assert meta["counts"] == {"train": 18, "val": 6}  # the truncated JPEG is skipped
    stage = ctx.store.load("ingest", "_stage")
    assert stage.metrics["bad_images"] == 1 and stage.metrics["non_image_files"] == 2
    bad = [b for r in ctx.store.records("ingest") for b in r.metrics["bad"]]
    assert len(bad) == 1 and "bad_0.JPEG" in bad[0]
    # shards hold many classes (interleaved), keys have no dots, the parquet index points at the bytes
    names = meta["shards"]["train"]
    index = read_index([ctx.path("real", f"{n}.parquet") for n in names])
    assert index.num_rows == 18 and sorted(set(index.column("cls").to_pylist())) == [0, 1, 2]
    first = ctx.path("real", f"{names[0]}.parquet")
    assert len(set(read_index([first]).column("cls").to_pylist())) > 1
    row = index.slice(0, 1).to_pylist()[0]
    data = read_member(ctx.path("real"), row["shard"], row["offset"], row["size"])
    assert data[:2] == b"\xff\xd8"  # JPEG bytes kept as they were
    with tarfile.open(ctx.path("real", row["shard"])) as tar:
        assert tar.extractfile(f"{row['key']}.jpg").read() == data
        assert all("." not in m.name.split(".", 1)[0] for m in tar.getmembers())


def test_shards_read_back_with_webdataset(image_folder, tmp_path):
    import webdataset as wds

    ctx = _ingest(image_folder, tmp_path / "run", "data.max_bad_fraction=0.2")
    urls = [str(ctx.path("real", f"{n}.tar")) for n in json.loads(ctx.path("real", "classes.json").read_text())
            ["shards"]["val"]]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "cls", "json")
    items = list(ds)
    assert len(items) == 6 and sorted(int(c) for _, c, _ in items) == [0, 0, 1, 1, 2, 2]
    assert all(img.size == (40, 40) and "source" in meta for img, _, meta in items)


def test_shards_read_back_with_dali(image_folder, tmp_path):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def

    ctx = _ingest(image_folder, tmp_path / "run", "data.max_bad_fraction=0.2")
    names = json.loads(ctx.path("real", "classes.json").read_text())["shards"]["train"]

    @pipeline_def(batch_size=18, num_threads=1, device_id=None)
    def pipe():
        img, cls = fn.readers.webdataset(paths=[str(ctx.path("real", f"{n}.tar")) for n in names],
                                         index_paths=[str(ctx.path("real", f"{n}.idx")) for n in names],
                                         ext=["jpg;png", "cls"], missing_component_behavior="error")
        return fn.decoders.image(img, device="cpu"), cls

    p = pipe()
    p.build()
    images, classes = p.run()
    labels = sorted(int(bytes(classes.at(i)).decode()) for i in range(18))
    assert labels == sorted([0] * 6 + [1] * 6 + [2] * 6)
    assert images.at(0).shape == (40, 40, 3)


def test_too_many_bad_images_stops_with_examples(tmp_path):
    data = make_image_folder(tmp_path / "d", corrupt=3)
    with pytest.raises(ConfigError, match=r"3 of 27 images are unreadable.*bad_0\.JPEG"):
        _ingest(data, tmp_path / "run")  # default max_bad_fraction 0.01
    assert not ManifestStore(tmp_path / "run").stage_done("ingest", "x")


@pytest.mark.parametrize("breakage, message", [
    ("no_val", r"val is missing"),
    ("empty_class", r"holds no images"),
    ("class_mismatch", r"only in train: \['n00000002'\]"),
])
def test_bad_layouts_have_clear_errors(tmp_path, breakage, message):
    import shutil

    data = make_image_folder(tmp_path / "d")
    if breakage == "no_val":
        shutil.rmtree(data / "val")
    elif breakage == "empty_class":
        for f in (data / "train" / "n00000001").iterdir():
            f.unlink()
    else:
        shutil.rmtree(data / "val" / "n00000002")
    with pytest.raises(ConfigError, match=message):
        _ingest(data, tmp_path / "run")
    assert not (tmp_path / "run" / "real").exists()


def test_resume_runs_only_the_missing_unit(tmp_path):
    data = make_image_folder(tmp_path / "d")
    ctx = _ingest(data, tmp_path / "run")
    records = {r.unit: r for r in ctx.store.records("ingest")}
    assert len(records) == 6  # 18 train / 5 + 6 val / 5
    victim = "train-000001"
    (ctx.path("manifests", "ingest", f"{victim}.json")).unlink()
    (ctx.path("manifests", "ingest", "_stage.json")).unlink()
    mtimes = {u: ctx.path("manifests", "ingest", f"{u}.json").stat().st_mtime_ns for u in records if u != victim}
    ctx2 = _ingest(data, tmp_path / "run")
    after = {r.unit: r for r in ctx2.store.records("ingest")}
    assert set(after) == set(records)
    assert {u: ctx.path("manifests", "ingest", f"{u}.json").stat().st_mtime_ns for u in mtimes} == mtimes
    assert after[victim].outputs == records[victim].outputs  # same bytes again (deterministic)
    assert ctx2.store.load("ingest", "_stage").metrics["ran"] == 1


def test_demo_ingest_is_deterministic(tmp_path):
    cfg = load_config("demo")
    a = run_pipeline(cfg, tmp_path / "a", stages=["ingest"], progress=False)
    b = run_pipeline(cfg, tmp_path / "b", stages=["ingest"], progress=False)
    ra = {r.unit: r.outputs for r in a.store.records("ingest")}
    rb = {r.unit: r.outputs for r in b.store.records("ingest")}
    assert ra == rb and len(ra) >= 2
    meta = json.loads(a.path("real", "classes.json").read_text())
    assert meta["num_classes"] == 10 and meta["counts"]["train"] + meta["counts"]["val"] == 1797


def test_failed_unit_is_reported(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "d")
    import pipeline.run.stages.ingest as ing

    real = ing.write_shard

    def flaky(folder, name, samples):
        if name == "val-000000":
            raise OSError("simulated disk error")
        return real(folder, name, samples)

    monkeypatch.setattr(ing, "write_shard", flaky)
    with pytest.raises(StageFailed, match=r"1 of 6 units failed \(val-000000\).*simulated disk error"):
        _ingest(data, tmp_path / "run")
    store = ManifestStore(tmp_path / "run")
    assert [r.unit for r in store.failures("ingest")] == ["val-000000"]
    monkeypatch.setattr(ing, "write_shard", real)
    ctx = _ingest(data, tmp_path / "run")
    assert ctx.store.failures("ingest") == [] and ctx.store.load("ingest", "_stage").metrics["ran"] == 1


def test_worker_that_cannot_start_fails_the_stage_cleanly(tmp_path, monkeypatch):
    import pipeline.run.stages.ingest as ing

    def broken(self, ctx):
        raise RuntimeError("cannot open the worker")

    monkeypatch.setattr(ing.IngestStage, "open_worker", broken)
    with pytest.raises(StageFailed, match="cannot open the worker"):
        run_pipeline(load_config("demo"), tmp_path / "run", stages=["ingest"], progress=False)
    assert len(ManifestStore(tmp_path / "run").failures("ingest")) == 8


@pytest.mark.parametrize("where", ["file", "class"])
def test_a_name_that_is_not_utf8_is_refused_naming_it(tmp_path, where, capsys):
    """A file (or class folder) whose name is not valid UTF-8 stops ingest with its bytes named and exit 2, before
    anything is written (it used to crash with a raw UnicodeEncodeError naming nothing)."""
    import os

    from pipeline.commands.cli import main

    data = make_image_folder(tmp_path / "d")
    good = data / "train" / "n00000001" / "img_000.JPEG"
    if where == "file":
        os.rename(good, os.path.join(os.fsencode(good.parent), b"caf\xe9.JPEG"))
    else:
        for split in ("train", "val"):
            os.rename(data / split / "n00000001", os.path.join(os.fsencode(data / split), b"n0000000\xe9"))
    with pytest.raises(ConfigError, match=r"not valid UTF-8; rename it"):
        _ingest(data, tmp_path / "run")
    assert not (tmp_path / "run" / "real").exists()
    rc = main(["run", "--data-dir", str(data), "--run-dir", str(tmp_path / "cli"), "--stages", "ingest",
               "--set", "executor.kind=local", "--set", "data.num_workers=0", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and ("caf\\xe9.JPEG" in err if where == "file" else "n0000000\\xe9" in err), err


@pytest.mark.parametrize("inside", ["train", "", "val/n00000000"])
def test_a_run_directory_inside_the_data_folder_is_refused_before_it_is_created(tmp_path, inside):
    data = make_image_folder(tmp_path / "d")
    before = sorted(p.relative_to(data).as_posix() for p in data.rglob("*"))
    run_dir = data / inside / "myrun" if inside else data
    with pytest.raises(ConfigError, match="is inside the data folder"):
        _ingest(data, run_dir)
    assert sorted(p.relative_to(data).as_posix() for p in data.rglob("*")) == before  # nothing created there


def test_images_in_a_sub_folder_of_a_class_folder_are_counted_and_named_in_a_warning(tmp_path, caplog):
    """torchvision's ImageFolder reads them; ingest reads only a class folder's own files, and says so."""
    import logging
    import shutil

    data = make_image_folder(tmp_path / "d")
    sub = data / "train" / "n00000001" / "extra"
    sub.mkdir()
    shutil.copy(data / "train" / "n00000001" / "img_000.JPEG", sub / "img_900.JPEG")
    with caplog.at_level(logging.WARNING):
        ctx = _ingest(data, tmp_path / "run")
    assert "1 sub-folder(s) of class folders are not read (train/n00000001/extra)" in caplog.text
    assert ctx.store.load("ingest", "_stage") is not None  # the run goes on with the class folders' own files
