"""Top-k fp16 soft labels, KD loss, parquet round trip; student optimizer and schedule (pipeline.optim)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.augment import ViewConfig, draw_views
from pipeline.optim import cosine_schedule, make_optimizer, param_groups
from pipeline.softlabels import (
    full_logit_bytes,
    kd_loss,
    read_soft_labels,
    teacher_probs,
    topk_fp16,
    write_soft_labels,
)


def _logits(b: int, c: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, c, generator=torch.Generator().manual_seed(seed)) * 4.0


def test_topk_with_k_equal_c_is_full_fp16_softmax() -> None:
    logits = _logits(6, 12)
    idx, vals = topk_fp16(logits, 12)
    assert idx.dtype == torch.int32 and vals.dtype == torch.float16 and idx.shape == (6, 12)
    for t in (1.0, 20.0):
        full = F.softmax(logits.half().float() / t, dim=1)
        assert torch.allclose(teacher_probs(idx, vals, 12, t), full, atol=1e-6, rtol=0)
    # k larger than C is clipped.
    idx2, _ = topk_fp16(logits, 50)
    assert idx2.shape == (6, 12)


def test_topk_below_c_is_normalized_and_zero_elsewhere() -> None:
    logits = _logits(5, 30, seed=1)
    idx, vals = topk_fp16(logits, 4)
    assert torch.equal(idx.long(), logits.topk(4, dim=1).indices)
    probs = teacher_probs(idx, vals, 30, 3.0)
    assert torch.allclose(probs.sum(1), torch.ones(5), atol=1e-6)
    kept = torch.zeros(5, 30, dtype=torch.bool).scatter_(1, idx.long(), True)
    assert (probs[~kept] == 0).all() and (probs[kept] > 0).all()


def test_kd_loss_zero_iff_student_matches_teacher() -> None:
    logits = _logits(4, 10, seed=2)
    idx, vals = topk_fp16(logits, 10)
    target = teacher_probs(idx, vals, 10, 20.0)
    same = kd_loss(logits.half().float(), target, 20.0)
    assert same.abs().item() < 1e-6
    other = kd_loss(_logits(4, 10, seed=3), target, 20.0)
    assert other.item() > 1e-4
    # batchmean: the loss of a duplicated batch is the same.
    double = kd_loss(torch.cat([_logits(4, 10, seed=3)] * 2), torch.cat([target] * 2), 20.0)
    assert torch.allclose(double, other)


def _write_views(
    path: Path, epochs: int, n: int, c: int, k: int
) -> tuple[list, list, list, torch.Tensor, torch.Tensor, int]:
    cfg = ViewConfig(resolution=32)
    image_ids, epoch_ids, params = [], [], []
    for e in range(epochs):
        ids = list(range(n))
        image_ids += ids
        epoch_ids += [e] * n
        params += draw_views(11, e, ids, n, cfg)
    idx, vals = topk_fp16(_logits(len(params), c, seed=4), k)
    size = write_soft_labels(
        str(path), image_ids, epoch_ids, params, idx, vals, metadata={"num_classes": str(c)}
    )
    return image_ids, epoch_ids, params, idx, vals, size


def test_parquet_round_trip_is_exact(tmp_path: Path) -> None:
    path = tmp_path / "labels.parquet"
    image_ids, epoch_ids, params, idx, vals, size = _write_views(path, epochs=3, n=7, c=50, k=5)
    assert size == path.stat().st_size > 0
    table = read_soft_labels([str(path)])
    assert len(table) == 21 and table.metadata == {"num_classes": "50"}
    for i, e, p in zip(image_ids, epoch_ids, params, strict=True):
        assert table.params(e, i) == p
    # lookup in any order, any batch size
    got_idx, got_vals = table.lookup(2, [6, 0, 3])
    rows = [14 + 6, 14 + 0, 14 + 3]
    assert got_idx.dtype == torch.int64 and got_vals.dtype == torch.float32
    assert torch.equal(got_idx, idx[rows].long())
    assert torch.equal(got_vals.half().view(torch.int16), vals[rows].view(torch.int16))  # bitwise fp16
    with pytest.raises(KeyError, match=r"\(3, 0\)"):
        table.lookup(3, [0])
    with pytest.raises(KeyError, match=r"\(0, 99\)"):
        table.params(0, 99)


def test_read_several_files_and_reject_duplicates(tmp_path: Path) -> None:
    cfg = ViewConfig(resolution=8, mix="mixup")
    idx, vals = topk_fp16(_logits(4, 20), 3)
    for e in range(2):
        write_soft_labels(
            str(tmp_path / f"e{e}.parquet"),
            [0, 1, 2, 3],
            [e] * 4,
            draw_views(0, e, range(4), 4, cfg),
            idx,
            vals,
        )
    table = read_soft_labels([str(tmp_path / "e0.parquet"), str(tmp_path / "e1.parquet")])
    assert len(table) == 8 and table.params(1, 2) == draw_views(0, 1, [2], 4, cfg)[0]
    with pytest.raises(ValueError, match="duplicate"):
        read_soft_labels([str(tmp_path / "e0.parquet")] * 2)


def test_topk_storage_is_far_smaller_than_full_logits(tmp_path: Path) -> None:
    n, epochs, c = 60, 4, 1000
    *_, size = _write_views(tmp_path / "big.parquet", epochs=epochs, n=n, c=c, k=10)
    full = full_logit_bytes(n, epochs, c)
    assert full == n * epochs * (2 * c + 29)
    assert full / size > 10, (full, size)
    # The published anchor: ImageNet IPC 10, 300 epochs, full fp16 logits = 5.67 GiB.
    assert full_logit_bytes(10_000, 300, 1000) / 2**30 == pytest.approx(5.67, abs=0.01)


# ------------------------------------------------------------------------------------- pipeline.optim


def test_param_groups_exclude_1d_from_decay() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LayerNorm(4), nn.Linear(4, 2)
    )
    groups = param_groups(model, 0.05)
    by_decay = {g["weight_decay"]: g["params"] for g in groups}
    no_decay_ids = {id(p) for p in by_decay[0.0]}
    decay_ids = {id(p) for p in by_decay[0.05]}
    for p in model.parameters():
        assert (id(p) in no_decay_ids) == (p.ndim <= 1)
        assert (id(p) in decay_ids) == (p.ndim > 1)
    opt = make_optimizer(model)
    assert isinstance(opt, torch.optim.AdamW)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_cosine_schedule_decays_to_zero() -> None:
    model = nn.Linear(2, 2)
    opt = make_optimizer(model, lr=1e-3)
    epochs = 8
    sched = cosine_schedule(opt, epochs)
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[epochs // 2] == pytest.approx(0.5e-3)
    assert all(a > b for a, b in itertools.pairwise(lrs))
    assert lrs[-1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * (epochs - 1) / epochs)))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
