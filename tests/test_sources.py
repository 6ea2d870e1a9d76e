"""Ingest sources: the same images as an ImageFolder, an ILSVRC / Kaggle download, WebDataset shards and Hugging Face
parquet files ingest to shards that decode to the same (class, pixels) per split; bad rows are counted and reported;
class names reach classes.json; `auto` names what it found."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.commands.cli import main
from pipeline.commands.recipes import load_config
from pipeline.config import ConfigError
from pipeline.data.images import decode_rgb
from pipeline.data.shards import read_index, read_member
from pipeline.data.sources import detect
from pipeline.run.runner import run_pipeline
from tests.helpers import make_image_folder

CLASSES = ["n00000000", "n00000001", "n00000002"]
NAMES = ["tench", "goldfish", "great white shark"]


def _folder(tmp_path: Path) -> Path:
    """3 classes x (6 train, 2 val) JPEGs, plus one RGBA PNG in train of class 1 (a re-encoded member)."""
    root = make_image_folder(tmp_path / "folder", classes=3, per_class=6, val_per_class=2)
    arr = np.random.default_rng(7).integers(0, 255, size=(30, 20, 4), dtype=np.uint8)
    Image.fromarray(arr, mode="RGBA").save(root / "train" / CLASSES[1] / "zz_rgba.png")
    return root


def _images(root: Path) -> dict[str, list[tuple[str, int, bytes]]]:
    """(file name, class, bytes) per split of an ImageFolder."""
    return {split: [(p.name, CLASSES.index(p.parent.name), p.read_bytes())
                    for c in CLASSES for p in sorted((root / split / c).iterdir())] for split in ("train", "val")}


def _ingest(data: Path, run_dir: Path, *extra: str):
    cfg = load_config("demo", overrides=[f"data.source={data}", "data.shard_size=5", *extra])
    return run_pipeline(cfg, run_dir, stages=["ingest"], progress=False)


def _decoded(ctx) -> dict[str, Counter]:
    """Per split, the multiset of (class, sha256 of the decoded RGB pixels) of the ingested shards."""
    meta = json.loads(ctx.path("real", "classes.json").read_text())
    out = {}
    for split in ("train", "val"):
        index = read_index([ctx.path("real", f"{n}.parquet") for n in meta["shards"][split]])
        out[split] = Counter(
            (row["cls"], hashlib.sha256(decode_rgb(read_member(ctx.path("real"), row["shard"], row["offset"],
                                                               row["size"])).tobytes()).hexdigest())
            for row in index.to_pylist())
    return out


def make_ilsvrc(src: Path, root: Path) -> Path:
    """The Kaggle layout of an ImageFolder: CLS-LOC/train/<wnid>/, a flat val/ and its CSV, the synset mapping."""
    data = root / "ILSVRC" / "Data" / "CLS-LOC"
    shutil.copytree(src / "train", data / "train")
    (data / "val").mkdir(parents=True)
    rows = []
    for n, (_, cls, raw) in enumerate(_images(src)["val"]):
        image_id = f"ILSVRC2012_val_{n + 1:08d}"
        (data / "val" / f"{image_id}.JPEG").write_bytes(raw)
        rows.append((image_id, f"{CLASSES[cls]} 1 2 30 40 {CLASSES[cls]} 3 4 20 20"))
    with (root / "LOC_val_solution.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ImageId", "PredictionString"])
        w.writerows(rows)
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{c} {n}\n" for c, n in zip(CLASSES, NAMES, strict=True)))
    return root


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_wds(src: Path, root: Path, per_shard: int = 7) -> Path:
    """timm-style shards: `imagenet-<split>-NNNN.tar` with `<key>.jpg|png`, `.cls`, `.json`; classes.txt beside."""
    root.mkdir(parents=True)
    for split, items in _images(src).items():
        name = "train" if split == "train" else "validation"
        for s in range(0, len(items), per_shard):
            with tarfile.open(root / f"imagenet-{name}-{s // per_shard:04d}.tar", "w") as tar:
                for j, (fname, cls, raw) in enumerate(items[s:s + per_shard]):
                    key = f"{split}_{s + j:06d}" if j else f"part/{split}_{s + j:06d}"  # keys may hold folders
                    ext = fname.rsplit(".", 1)[1].lower().replace("jpeg", "jpg")
                    _tar_add(tar, f"{key}.{ext}", raw)
                    _tar_add(tar, f"{key}.cls", str(cls).encode())
                    _tar_add(tar, f"{key}.json", json.dumps({"filename": fname}).encode())
    (root / "classes.txt").write_text("".join(f"{c}\t{n}\n" for c, n in zip(CLASSES, NAMES, strict=True)))
    return root


def make_parquet(src: Path, root: Path, rows_per_group: int = 4) -> Path:
    """Hugging Face layout: data/{train,validation}-0000N-of-0000M.parquet, `image` {bytes, path}, `label`, the
    ClassLabel names in the schema metadata as `datasets` writes them."""
    (root / "data").mkdir(parents=True)
    hf = {"info": {"features": {"image": {"_type": "Image"},
                                "label": {"names": NAMES, "_type": "ClassLabel"}}}}
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("label", pa.int64())], metadata={b"huggingface": json.dumps(hf).encode()})
    for split, items in _images(src).items():
        name = "train" if split == "train" else "validation"
        halves = [items[: len(items) // 2], items[len(items) // 2:]]
        for k, part in enumerate(halves):
            table = pa.Table.from_pylist([{"image": {"bytes": raw, "path": fname}, "label": cls}
                                          for fname, cls, raw in part], schema=schema)
            pq.write_table(table, root / "data" / f"{name}-{k:05d}-of-00002.parquet", row_group_size=rows_per_group)
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The ImageFolder ingest: the pixels every other format must give."""
    tmp = tmp_path_factory.mktemp("ref")
    folder = _folder(tmp)
    ctx = _ingest(folder, tmp / "run")
    return folder, _decoded(ctx), json.loads(ctx.path("real", "classes.json").read_text())


@pytest.mark.parametrize("fmt", ["ilsvrc", "webdataset", "parquet"])
def test_every_format_ingests_to_the_imagefolder_pixels(reference, tmp_path, fmt):
    folder, pixels, meta = reference
    maker = {"ilsvrc": make_ilsvrc, "webdataset": make_wds, "parquet": make_parquet}[fmt]
    data = maker(folder, tmp_path / fmt)
    assert detect(data)[0] == fmt
    ctx = _ingest(data, tmp_path / "run")  # data.format=auto
    got = json.loads(ctx.path("real", "classes.json").read_text())
    assert got["num_classes"] == 3 and got["counts"] == meta["counts"] and got["format"] == fmt
    assert got["class_names"] == NAMES
    assert got["classes"] == (list(CLASSES) if fmt != "parquet" else ["0000", "0001", "0002"])
    assert _decoded(ctx) == pixels
    stage = ctx.store.load("ingest", "_stage").metrics
    assert stage["bad_images"] == 0 and stage["bad_rows"] == 0 and stage["format"] == fmt
    if fmt == "parquet":  # whole row groups per shard, each read once: no row group is split over two shards
        shard_of = {}
        for shard, meta_bytes in _members(ctx, "json"):
            group = json.loads(meta_bytes)["source"].rsplit("/", 1)[0]
            assert shard_of.setdefault(group, shard) == shard, group
        groups = sum(pq.ParquetFile(f).metadata.num_row_groups for f in (data / "data").iterdir())
        assert len(shard_of) == groups == 3 + 3 + 1 + 1  # train: files of 9 and 10 rows in groups of 4; val: of 3


def _members(ctx, ext: str) -> list[tuple[str, bytes]]:
    meta = json.loads(ctx.path("real", "classes.json").read_text())
    out = []
    for split in ("train", "val"):
        for n in meta["shards"][split]:
            with tarfile.open(ctx.path("real", f"{n}.tar")) as tar:
                out += [(n, tar.extractfile(m).read()) for m in tar if m.name.endswith("." + ext)]
    return out


def test_the_same_source_ingests_to_the_same_bytes(reference, tmp_path, caplog):
    data = make_parquet(reference[0], tmp_path / "pq")  # stored sorted by class, row groups of 4: a warning
    with caplog.at_level(logging.WARNING):
        a, b = _ingest(data, tmp_path / "a"), _ingest(data, tmp_path / "b")
    assert "stores this split sorted by class; raise data.shard_size" in caplog.text
    names = json.loads(a.path("real", "classes.json").read_text())["shards"]["train"]
    assert all(a.path("real", f"{n}.tar").read_bytes() == b.path("real", f"{n}.tar").read_bytes() for n in names)


def test_ilsvrc_bad_rows_are_counted_and_named(reference, tmp_path, caplog):
    data = make_ilsvrc(reference[0], tmp_path / "kaggle")
    val = data / "ILSVRC" / "Data" / "CLS-LOC" / "val"
    (val / "ILSVRC2012_val_99999999.JPEG").write_bytes((val / "ILSVRC2012_val_00000001.JPEG").read_bytes())
    with (data / "LOC_val_solution.csv").open("a") as fh:
        fh.write("ILSVRC2012_val_00000002,n09999999 1 1 2 2\n")  # a second row for image 2, an unknown wnid
        fh.write("ILSVRC2012_val_77777777,n00000000 1 1 2 2\n")  # an entry without an image
    train0 = data / "ILSVRC" / "Data" / "CLS-LOC" / "train" / CLASSES[0]
    raw = (train0 / "img_000.JPEG").read_bytes()
    (train0 / "truncated.JPEG").write_bytes(raw[: len(raw) // 3])
    with caplog.at_level(logging.WARNING):
        ctx = _ingest(data, tmp_path / "run", "data.max_bad_fraction=0.2")
    stage = ctx.store.load("ingest", "_stage").metrics
    assert stage["bad_rows"] == 2 and stage["bad_images"] == 1  # no CSV entry, unknown wnid; the truncated JPEG
    text = caplog.text
    assert "no entry for ILSVRC2012_val_99999999" in text and "'n09999999'" in text and "truncated.JPEG" in text
    assert "1 LOC_val_solution.csv entries have no image" in text
    meta = json.loads(ctx.path("real", "classes.json").read_text())
    assert meta["counts"] == {"train": 19, "val": 5}
    with pytest.raises(ConfigError, match="data.max_bad_fraction"):  # 3 of 27 > 1 %
        _ingest(data, tmp_path / "strict")


def test_webdataset_and_parquet_bad_rows(reference, tmp_path):
    wds_dir = make_wds(reference[0], tmp_path / "wds")
    with tarfile.open(wds_dir / "imagenet-train-0099.tar", "w") as tar:
        good = (reference[0] / "train" / CLASSES[0] / "img_000.JPEG").read_bytes()
        _tar_add(tar, "nolabel.jpg", good)
        _tar_add(tar, "outside.jpg", good)
        _tar_add(tar, "outside.cls", b"7")
        _tar_add(tar, "broken.jpg", good[:100])
        _tar_add(tar, "broken.cls", b"1")
        _tar_add(tar, "onlylabel.cls", b"1")
    ctx = _ingest(wds_dir, tmp_path / "run-wds", "data.max_bad_fraction=0.3")
    stage = ctx.store.load("ingest", "_stage").metrics
    assert stage["bad_rows"] == 3 and stage["bad_images"] == 1
    assert json.loads(ctx.path("real", "classes.json").read_text())["counts"]["train"] == 19

    pq_dir = make_parquet(reference[0], tmp_path / "pq")
    schema = pq.ParquetFile(next((pq_dir / "data").glob("train-00000*"))).schema_arrow
    rows = [{"image": {"bytes": good, "path": "a.jpg"}, "label": None},
            {"image": {"bytes": good, "path": "b.jpg"}, "label": 3},
            {"image": {"bytes": b"not an image", "path": "c.jpg"}, "label": 0},
            {"image": {"bytes": None, "path": "/somewhere/d.jpg"}, "label": 0}]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), pq_dir / "data" / "train-extra.parquet")
    ctx = _ingest(pq_dir, tmp_path / "run-pq", "data.max_bad_fraction=0.3")
    stage = ctx.store.load("ingest", "_stage").metrics
    assert stage["bad_rows"] == 2 and stage["bad_images"] == 2
    bad = [b for r in ctx.store.records("ingest") for b in r.metrics["bad"]]
    assert any("only a path: '/somewhere/d.jpg'" in b for b in bad)


def test_a_changed_shard_file_is_named_and_missing_pieces_are_clear(reference, tmp_path, capsys):
    data = make_parquet(reference[0], tmp_path / "pq")
    run_dir = tmp_path / "run"
    argv = ["run", "--run-dir", str(run_dir), "--data-dir", str(data), "--stages", "ingest", "--no-progress",
            "--set", "data.shard_size=5", "--set", "data.num_workers=0", "--set", "executor.kind=local"]
    assert main(argv) == 0
    victim = data / "data" / "validation-00001-of-00002.parquet"
    pq.write_table(pq.read_table(victim).slice(0, 1), victim)
    capsys.readouterr()
    assert main(argv) == 2
    assert "files changed in 'data/validation-00001-of-00002.parquet' (val)" in capsys.readouterr().err

    kaggle = make_ilsvrc(reference[0], tmp_path / "kaggle")
    (kaggle / "LOC_val_solution.csv").unlink()
    with pytest.raises(ConfigError, match="LOC_val_solution.csv"):
        _ingest(kaggle, tmp_path / "r2", "data.format=ilsvrc")
    shards = make_wds(reference[0], tmp_path / "w2")
    for p in shards.glob("*validation*"):
        p.unlink()
    with pytest.raises(ConfigError, match="no val shards"):
        _ingest(shards, tmp_path / "r3", "data.format=webdataset")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="found none of the layouts"):
        detect(tmp_path / "empty")
    with pytest.raises(ConfigError, match="data.format"):
        load_config("demo", overrides=["data.format=zip"])


def test_a_parquet_source_runs_every_stage_and_its_names_reach_the_grids_summary_and_collect(reference, tmp_path,
                                                                                            capsys):
    from manifests.collect import collect_main
    from pipeline.commands.report import format_summary
    from tests.helpers import fast_config

    data = make_parquet(reference[0], tmp_path / "pq")
    cfg = fast_config(f"data.source={data}", "data.shard_size=5", "recover.classes_per_shard=3", "squeeze.batch_size=8")
    ctx = run_pipeline(cfg, tmp_path / "run", progress=False)
    summary = json.loads(ctx.path("results", "summary.json").read_text())
    assert summary["class_names"] == NAMES and summary["num_classes"] == 3
    assert "classes: tench, goldfish, great white shark" in format_summary(summary)
    overview = Image.open(ctx.path("results", "grids", "overview.png"))
    plain = Image.open(ctx.path("results", "grids", "class-0000.png"))
    assert overview.width > plain.width * max(1, 256 // plain.height)  # the names' column
    assert collect_main([str(ctx.run_dir)]) == 0
    assert "class-0002 (great white shark)" in capsys.readouterr().out
    out = tmp_path / "export"
    assert main(["export", str(ctx.run_dir), "--out", str(out)]) == 0
    assert (out / "classes.txt").read_text().splitlines() == [f"{i:04d}\t{n}" for i, n in enumerate(NAMES)]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["0000", "0001", "0002"]
    assert main(["export", str(ctx.run_dir), "--out", str(out), "--force"]) == 0  # still a previous export


def test_a_names_file_whose_ids_cannot_name_folders_is_refused(reference, tmp_path):
    data = make_wds(reference[0], tmp_path / "wds")
    (data / "classes.txt").write_text("a/b tench\nc goldfish\nd shark\n")
    with pytest.raises(ConfigError, match="class id 'a/b' cannot name a folder"):
        _ingest(data, tmp_path / "run")


@pytest.mark.parametrize("fmt", ["ilsvrc", "webdataset", "parquet"])
def test_the_imagenet_recipe_ingests_each_layout_from_the_command_line(reference, tmp_path, fmt):
    maker = {"ilsvrc": make_ilsvrc, "webdataset": make_wds, "parquet": make_parquet}[fmt]
    data = maker(reference[0], tmp_path / fmt)
    run_dir = tmp_path / "run"
    assert main(["run", "--recipe", "imagenet1k-rn18-ipc10-dwa", "--data-dir", str(data), "--run-dir", str(run_dir),
                 "--stages", "ingest", "--no-progress", "--set", "executor.kind=local"]) == 0
    meta = json.loads((run_dir / "real" / "classes.json").read_text())
    assert meta["format"] == fmt and meta["counts"] == reference[2]["counts"] and meta["dataset"] == "imagenet-1k"


def test_shard_files_take_their_split_from_their_name_or_folder(tmp_path):
    from pipeline.data.sources.base import files_matching

    for rel in ("data/train-00000-of-00002.parquet", "data/validation-00000-of-00001.parquet", "data/test-0.parquet",
                "train/part-0.parquet", "val/part-0.parquet", "other/val/part-1.parquet", "other/part-2.parquet"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    found = {s: [str(p.relative_to(tmp_path)) for p in v] for s, v in files_matching(tmp_path, ".parquet").items()}
    assert found == {"train": ["data/train-00000-of-00002.parquet", "train/part-0.parquet"],
                     "val": ["data/validation-00000-of-00001.parquet", "other/val/part-1.parquet", "val/part-0.parquet"]}
    assert detect(tmp_path) == ("parquet", "*.parquet files")  # train/ and val/ hold no class folders
