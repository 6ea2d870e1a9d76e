"""Small homes of repeated ideas in pipeline/data: the class map, the synthetic-set index, RGB decoding."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from manifests.schema import FileRef, Record
from pipeline.config import ConfigError
from pipeline.data.classmap import IngestMissingError, read_class_map, write_class_map
from pipeline.data.images import IMAGE_EXTS, SOURCE_IMAGE_SUFFIXES, decode_rgb, decode_rgb_image
from pipeline.data.sharding import shard_paths
from pipeline.data.shards import Sample, write_shard
from pipeline.data.synthetic import synthetic_index, synthetic_index_paths


def test_missing_class_map_says_run_ingest(tmp_path: Path) -> None:
    real = tmp_path / "run" / "real"
    with pytest.raises(IngestMissingError, match=r"real/classes\.json is missing: run the ingest stage first"):
        read_class_map(real)
    # The CLI's usage error (exit 2), and what the loaders raised before (a missing file).
    assert issubclass(IngestMissingError, ConfigError) and issubclass(IngestMissingError, FileNotFoundError)
    with pytest.raises(FileNotFoundError):
        shard_paths(real, "val")


def test_class_map_roundtrip(tmp_path: Path) -> None:
    meta = {"classes": ["a", "b"], "num_classes": 2, "shards": {"train": ["train-000000"], "val": []}}
    path = write_class_map(tmp_path, meta)
    assert path == tmp_path / "classes.json"
    assert path.read_text() == json.dumps(meta, indent=1)  # the bytes ingest always wrote
    assert read_class_map(tmp_path) == meta
    assert shard_paths(tmp_path, "train") == [tmp_path / "train-000000.tar"]


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (i, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _recover_record(run_dir: Path, unit: str, n: int) -> Record:
    paths = write_shard(run_dir / "synthetic", unit, [Sample(f"{unit}_{i}", i, _png(i), "png", {}) for i in range(n)])
    return Record(run_id="r", stage="recover", unit=unit, status="done", config_hash="h", seed=0,
                  outputs=tuple(FileRef.of(p, run_dir) for p in paths))


def test_synthetic_index_follows_unit_keys_and_parquet_outputs(tmp_path: Path) -> None:
    recs = [_recover_record(tmp_path, "c0002", 1), _recover_record(tmp_path, "c0000", 2)]
    (tmp_path / "synthetic" / "stale.parquet").write_bytes(b"left by an older configuration")
    assert synthetic_index_paths(tmp_path, recs) == [tmp_path / "synthetic" / "c0000.parquet",
                                                     tmp_path / "synthetic" / "c0002.parquet"]
    assert synthetic_index(tmp_path, recs).column("key").to_pylist() == ["c0000_0", "c0000_1", "c0002_0"]


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "CMYK", "LA"])
def test_decode_rgb_array_and_image_agree_with_plain_convert(mode: str) -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (9, 7, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if mode == "CMYK" else "PNG")
    data = buf.getvalue()
    plain = Image.open(io.BytesIO(data)).convert("RGB")  # what both old decoders amounted to
    assert decode_rgb_image(data).mode == "RGB"
    assert np.array_equal(np.asarray(decode_rgb_image(data)), np.asarray(plain))
    assert np.array_equal(decode_rgb(data), np.asarray(plain))
    resized = np.asarray(plain.resize((5, 5), Image.Resampling.BILINEAR))
    assert decode_rgb(data, 5).dtype == np.uint8 and np.array_equal(decode_rgb(data, 5), resized)


def test_one_set_of_image_extensions() -> None:
    assert {f".{e}" for e in IMAGE_EXTS} <= SOURCE_IMAGE_SUFFIXES
    assert all(s == s.lower() and s.startswith(".") for s in SOURCE_IMAGE_SUFFIXES)
