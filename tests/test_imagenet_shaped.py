"""An ImageNet-shaped run end to end: 1000 synset-named classes of JPEGs (2 train and 1 val image each, 24 x 20 px)
through every stage at 16 px with `rded` and with `dwa` at IPC 1 and minimal schedules, then `collect`.

What it guards is the shape of ImageNet-1K, not accuracy: 1000 classes in 10 recover units of 100 classes,
1000-class soft labels, class names that are WordNet ids, non-square JPEGs, one candidate per class once the
holdout slice has taken the other. The folder is made once for the module and read by both runs; they share one
random-real baseline folder (`eval.baseline_dir`), so the second run reuses the first's baseline and `collect` counts
it once.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from manifests.store import STAGE_RECORD, ManifestStore
from pipeline.commands.cli import main
from pipeline.data.shards import IndexedImages
from pipeline.data.synthetic import decode_rgb, synthetic_index

pytestmark = pytest.mark.slow  # 71 s on 2 cores that also ran another job (both runs and collect; module fixture)

CLASSES = 1000
STAGES = ("ingest", "squeeze", "recover", "relabel", "train", "baseline", "evaluate")
SYNSET = re.compile(r"n\d{8}")
# the smallest schedules that still run every stage: a 1-epoch ConvNet teacher (BatchNorm, which DWA needs), IPC 1 in
# units of 100 classes, 2 DWA iterations with one ascent step, a 1-epoch MLP student under kd, random-real only
SETTINGS = ("data.resolution=16", "data.num_workers=0", "executor.kind=local", "squeeze.epochs=1",
            "recover.ipc=1", "recover.ipc_per_unit=1", "recover.classes_per_shard=100", "recover.dwa.iterations=2",
            "recover.dwa.steps=1", "train.arch=mlp", "train.epochs=1", "eval.protocols=[kd]",
            "eval.baselines=[random-real]")


def synsets(n: int) -> list[str]:
    """n distinct WordNet-style ids in ascending order, the first ImageNet-1K's first (n01440764)."""
    return [f"n{1440764 + 7919 * i:08d}" for i in range(n)]


def make_imagenet_folder(root: Path) -> Path:
    """train/<synset>/*.JPEG (2 each) and val/<synset>/*.JPEG (1 each): 24 x 20 px noise, JPEG quality 90."""
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 2), ("val", 1)):
        for name in synsets(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{name}_{i}.JPEG", format="JPEG", quality=90)
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The generated folder, then a run of every stage with rded and one with dwa on it (in that order)."""
    base = tmp_path_factory.mktemp("imagenet-shaped")
    data = make_imagenet_folder(base / "imagenet")
    out = {}
    for method in ("rded", "dwa"):
        run_dir = base / f"run-{method}"
        argv = ["run", "--recipe", "demo", "--data-dir", str(data), "--run-dir", str(run_dir), "--no-progress"]
        for item in (*SETTINGS, f"recover.method={method}", f"eval.baseline_dir={base / 'baselines'}"):
            argv += ["--set", item]
        assert main(argv) == 0, method
        out[method] = run_dir
    return out


@pytest.mark.parametrize("method", ["rded", "dwa"])
def test_every_stage_runs_on_1000_synset_classes_in_10_units_of_100(runs: dict[str, Path], method: str) -> None:
    run_dir = runs[method]
    store = ManifestStore(run_dir)
    meta = json.loads((run_dir / "real" / "classes.json").read_text())
    assert meta["classes"] == synsets(CLASSES) and all(SYNSET.fullmatch(c) for c in meta["classes"])
    assert meta["num_classes"] == CLASSES and meta["counts"]["train"] == 2 * CLASSES
    assert meta["counts"]["val"] == CLASSES
    for stage in STAGES:  # every stage ran to its end (the runner writes this record last)
        assert store.load(stage, STAGE_RECORD) is not None, stage
    units = store.records("recover")
    assert [r.unit for r in units] == [f"c{c:04d}-{c + 99:04d}_ipc000-000" for c in range(0, CLASSES, 100)]
    assert all(r.metrics["images"] == 100 for r in units)
    if method == "rded":  # one candidate per class (the holdout slice took the other), 5 crops, one 16-px patch
        assert all(r.metrics["factor"] == 1 and r.metrics["candidates_scored"] == 500
                   and r.metrics["teacher_forwards_per_image"] == 5.0 and r.metrics["short_classes"] == []
                   for r in units)
    else:
        assert all(r.metrics["image_iterations"] == 100 * 2 for r in units)

    index = synthetic_index(run_dir, units)
    assert sorted(index.column("cls").to_pylist()) == list(range(CLASSES))
    images = IndexedImages(run_dir / "synthetic", index)
    assert {decode_rgb(images.raw(i)).shape for i in (0, 499, 999)} == {(16, 16, 3)}

    soft = [run_dir / o.uri for r in store.records("relabel") for o in r.outputs if o.uri.endswith(".parquet")]
    assert soft
    for path in soft:  # every view labelled over all 1000 classes (top_k 0 = all)
        meta_kv = pq.read_metadata(path).metadata
        assert meta_kv[b"num_classes"] == b"1000" and meta_kv[b"top_k"] == b"1000"
        first = pq.read_table(path, columns=["topk_idx"]).column("topk_idx")[0].as_py()
        assert first == list(range(CLASSES))
    assert sum(pq.read_metadata(p).num_rows for p in soft) == CLASSES  # 1000 images x 1 epoch

    summary = json.loads((run_dir / "results" / "summary.json").read_text())
    assert (summary["method"], summary["ipc"], summary["num_classes"]) == (method, 1, CLASSES)
    assert summary["num_images"] == CLASSES and summary["val_images"] == CLASSES
    assert 0.0 <= summary["top1"] <= 100.0 and summary["dataset"] == "imagenet"


def test_collect_counts_both_runs_and_their_shared_baseline_once(runs: dict[str, Path], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results.md"
    assert main(["collect", str(runs["rded"]), str(runs["dwa"]), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "2 run(s) counted" in err and "0 run(s) left out" in err and "appears in 2 runs" not in err
    table = out.read_text()
    for method in ("rded", "dwa", "random-real"):
        row = next(line for line in table.splitlines() if f"| kd | {method} |" in line)
        assert row.startswith("| imagenet | convnet | mlp |") and "(n=1)" in row, row
