"""Loaders over real shards: exact-once evaluation, equal batch counts per rank, PIL vs DALI agreement."""

from __future__ import annotations

import io
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.data.loaders import PAD_LABEL, eval_batches, make_loader, rank_range, shard_paths
from pipeline.data.shards import Sample, write_shard

BATCH = 64


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo digits ingested into shards (val: 256 + 103 samples, 32 px PNG)."""
    from pipeline.commands.recipes import load_config
    from pipeline.run.runner import run_pipeline

    run = tmp_path_factory.mktemp("loaders") / "run"
    run_pipeline(load_config("demo"), run, stages=["ingest"], progress=False)
    return run / "real"


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """40 JPEGs of 80x80 px, 4 classes, in 3 shards; one greyscale and one CMYK image among them."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(40):
        cls = i % 4
        base = np.zeros((80, 80, 3), dtype=np.float32)
        base[..., cls % 3] = 200.0
        noise = rng.normal(0, 30, size=(10, 10, 3)).repeat(8, 0).repeat(8, 1)
        img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
        if i == 5:
            img = img.convert("L")
        elif i == 6:
            img = img.convert("CMYK")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        samples.append(Sample(f"img{i:04d}", cls, buf.getvalue(), "jpg", {}))
    folder = tmp_path_factory.mktemp("jpeg")
    for s, chunk in enumerate((samples[:16], samples[16:32], samples[32:])):
        write_shard(folder, f"val-{s:06d}", chunk)
    return [folder / f"val-{s:06d}.tar" for s in range(3)]


def index_labels(shards: list[Path]) -> Counter:
    return Counter(c for p in shards for c in pq.read_table(p.with_suffix(".parquet")).column("cls").to_pylist())


def collect(loader) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(loader)
    assert len(batches) == len(loader)
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def test_shard_paths_follow_class_map(real_dir: Path) -> None:
    val = shard_paths(real_dir, "val")
    assert [p.name for p in val] == ["val-000000.tar", "val-000001.tar"]
    assert all(p.is_file() for p in val)
    assert len(shard_paths(real_dir, "train")) == 6
    with pytest.raises(ValueError, match="test"):
        shard_paths(real_dir, "test")


def test_pil_eval_reads_every_sample_once(real_dir: Path) -> None:
    val = shard_paths(real_dir, "val")
    truth = index_labels(val)
    n = sum(truth.values())
    x, y = collect(make_loader(val, train=False, batch_size=BATCH, resolution=32, backend="pil"))
    assert x.shape == (eval_batches(n, BATCH, 1) * BATCH, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert Counter(y[y >= 0].tolist()) == truth
    assert int((y == PAD_LABEL).sum()) == len(y) - n


@pytest.mark.parametrize("backend", ["pil", "dali"])
def test_loader_normalizes_with_the_given_mean_and_std(real_dir: Path, backend: str) -> None:
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    val = shard_paths(real_dir, "val")
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # CIFAR-10's, as its official teachers
    x0, y0 = collect(make_loader(val, train=False, batch_size=BATCH, resolution=32, backend=backend))
    x1, y1 = collect(make_loader(val, train=False, batch_size=BATCH, resolution=32, backend=backend,
                                 mean=mean, std=std))
    assert torch.equal(y0, y1)
    m0, s0 = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    m1, s1 = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    # Same pixels, other normalization: x1 = (x0 * s0 + m0 - m1) / s1.
    assert torch.allclose(x1, (x0 * s0 + m0 - m1) / s1, atol=1e-4)
    assert not torch.allclose(x0, x1)


@pytest.mark.parametrize("backend", ["pil", "dali"])
def test_eval_two_ranks_partition_the_samples(real_dir: Path, backend: str) -> None:
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    val = shard_paths(real_dir, "val")
    truth = index_labels(val)
    n = sum(truth.values())
    seen: Counter = Counter()
    counts = []
    for rank in range(2):
        loader = make_loader(val, train=False, batch_size=BATCH, resolution=32, rank=rank, world_size=2,
                             backend=backend)
        _, y = collect(loader)
        counts.append(len(loader))
        start, stop = rank_range(n, rank, 2)
        assert int((y >= 0).sum()) == stop - start
        seen.update(y[y >= 0].tolist())
    assert counts[0] == counts[1] == eval_batches(n, BATCH, 2)
    assert seen == truth


@pytest.mark.parametrize("backend", ["pil", "dali"])
def test_train_two_ranks_equal_batches(real_dir: Path, backend: str) -> None:
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    train = shard_paths(real_dir, "train")
    n = sum(index_labels(train).values())
    per_rank = []
    for rank, res in ((0, 32), (1, 72)):  # both transform families
        loader = make_loader(train, train=True, batch_size=BATCH, resolution=res, rank=rank, world_size=2,
                             num_samples=n, backend=backend, seed=3)
        batches = list(loader)
        per_rank.append((len(loader), len(batches)))
        for x, y in batches:
            assert x.shape == (BATCH, 3, res, res) and x.dtype == torch.float32
            assert y.shape == (BATCH,) and y.dtype == torch.int64
            assert 0 <= int(y.min()) and int(y.max()) <= 9
        x = torch.cat([b[0] for b in batches])
        assert -2.2 < float(x.mean()) < 1.0 and 0.3 < float(x.std()) < 3.0  # normalized, not [0, 255]
    assert per_rank[0] == per_rank[1] == (n // (BATCH * 2),) * 2


def test_pil_train_is_reproducible_per_epoch(real_dir: Path) -> None:
    train = shard_paths(real_dir, "train")
    kwargs = dict(train=True, batch_size=32, resolution=32, num_samples=128, backend="pil", seed=5, num_workers=1)
    loader = make_loader(train, **kwargs)
    first = [(x, y) for x, y in loader]
    again = [(x, y) for x, y in loader]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    loader.set_epoch(1)
    other = torch.cat([y for _, y in loader])
    assert not torch.equal(other, torch.cat([y for _, y in first]))


def test_dali_eval_matches_pil(real_dir: Path) -> None:
    pytest.importorskip("nvidia.dali")
    val = shard_paths(real_dir, "val")
    xp, yp = collect(make_loader(val, train=False, batch_size=BATCH, resolution=32, backend="pil"))
    xd, yd = collect(make_loader(val, train=False, batch_size=BATCH, resolution=32, backend="dali"))
    assert Counter(yd[yd >= 0].tolist()) == Counter(yp[yp >= 0].tolist()) == index_labels(val)
    mean_p, mean_d = xp[yp >= 0].mean((0, 2, 3)), xd[yd >= 0].mean((0, 2, 3))
    assert torch.allclose(mean_p, mean_d, atol=0.05), (mean_p, mean_d)


@pytest.mark.parametrize("resolution", [64, 72])
def test_jpeg_shards_both_backends(jpeg_shards: list[Path], resolution: int) -> None:
    truth = index_labels(jpeg_shards)
    backends = ["pil"]
    try:
        import nvidia.dali  # noqa: F401

        backends.append("dali")
    except ImportError:
        pass
    means = {}
    for backend in backends:
        x, y = collect(make_loader(jpeg_shards, train=False, batch_size=16, resolution=resolution,
                                   backend=backend, num_workers=2))
        assert x.shape[1:] == (3, resolution, resolution)
        assert Counter(y[y >= 0].tolist()) == truth
        means[backend] = x[y >= 0].mean((0, 2, 3))
    if "dali" in means:
        assert torch.allclose(means["pil"], means["dali"], atol=0.05), means


@pytest.mark.parametrize("backend", ["pil", "dali"])
def test_uneven_ranks_get_whole_padding_batches(jpeg_shards: list[Path], backend: str) -> None:
    """40 samples on 3 ranks with batch 13: shares 13/13/14, so ranks 0 and 1 add a batch of padding only."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    seen: Counter = Counter()
    for rank in range(3):
        loader = make_loader(jpeg_shards, train=False, batch_size=13, resolution=32, rank=rank, world_size=3,
                             backend=backend)
        assert len(loader) == 2
        _, y = collect(loader)
        assert int((y >= 0).sum()) == (14 if rank == 2 else 13)
        seen.update(y[y >= 0].tolist())
    assert seen == index_labels(jpeg_shards)


def test_train_needs_num_samples(real_dir: Path) -> None:
    with pytest.raises(ValueError, match="num_samples"):
        make_loader(shard_paths(real_dir, "train"), train=True, batch_size=8, resolution=32, backend="pil")


def test_dali_backend_without_dali_names_the_install(real_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` raise ImportError
    val = shard_paths(real_dir, "val")
    with pytest.raises(ImportError, match=r"pip install -e \.\[dali\]"):
        make_loader(val, train=False, batch_size=8, resolution=32, backend="dali")
    loader = make_loader(val, train=False, batch_size=8, resolution=32, backend="auto")
    assert loader.backend == "pil"
