"""Selection methods (herding, k-center): the greedy rules, the teacher features they run on, the real-init helpers
of `RecoverEnv` (correct rows, selections), and both methods end to end through the recover stage on the demo.

The rules are checked on hand-made points with known answers and against a plain-Python re-statement on small
random sets; the environment helpers on stand-in pools and teachers whose outputs the tests control.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.imageops import normalize
from pipeline.core.seeding import generator
from pipeline.methods import herding as herding_method  # noqa: F401 - registers "herding"
from pipeline.methods import kcenter as kcenter_method  # noqa: F401 - registers "k-center"
from pipeline.methods.base import get_method
from pipeline.methods.env import RecoverEnv, last_linear
from pipeline.methods.selection import herding, k_center

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

# ------------------------------------------------------------------------------------ the rules themselves

LINE = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [10.0, 0.0]])  # mean (3.2, 0)


def brute_herding(points: list[list[float]], k: int) -> list[int]:
    """The herding rule restated: at step t, the unchosen x minimizing ||mu - (s + x) / (t + 1)||."""
    n, d = len(points), len(points[0])
    mu = [sum(p[i] for p in points) / n for i in range(d)]
    s, chosen = [0.0] * d, []
    for t in range(min(k, n)):
        gaps = {i: math.dist(mu, [(s[a] + points[i][a]) / (t + 1) for a in range(d)])
                for i in range(n) if i not in chosen}
        best = min(gaps, key=lambda i: (gaps[i], i))
        chosen.append(best)
        s = [s[i] + points[best][i] for i in range(d)]
    return chosen


def brute_k_center(points: list[list[float]], k: int, start: int) -> list[int]:
    """The k-center rule restated: the unchosen point farthest from its nearest chosen point."""
    chosen = [start]
    while len(chosen) < min(k, len(points)):
        rest = [i for i in range(len(points)) if i not in chosen]
        far = {i: min(math.dist(points[i], points[c]) for c in chosen) for i in rest}
        chosen.append(max(rest, key=lambda i: (far[i], -i)))  # ties to the lowest index
    return chosen


def test_herding_on_a_line_picks_the_point_nearest_the_mean_then_keeps_the_running_mean_closest():
    # mean 3.2: 3 first; then (3 + x) / 2 nearest 3.2 -> x = 2; (5 + x) / 3 -> x = 1 (4.6 - 1 < 10 - 4.6);
    # (6 + x) / 4 -> x = 10; then 0. DeepCore's argmax would start from the outlier 10.
    assert herding(LINE, 5) == [3, 2, 1, 4, 0]
    assert herding(LINE, 2) == [3, 2]


def test_herding_in_2d_keeps_the_running_mean_nearest_the_class_mean_at_every_step():
    pts = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 4.0], [2.5, 3.0], [9.0, 9.0]])  # mean (3.25, 3.33)
    order = herding(pts, 6)
    mu = pts.double().mean(0)
    assert order[0] == int(torch.linalg.norm(pts.double() - mu, dim=1).argmin()) == 4
    for t in range(1, 6):
        mean_here = pts[order[: t + 1]].double().mean(0)
        others = [i for i in range(6) if i not in order[:t]]
        best = min(float(torch.linalg.norm(mu - pts[order[:t] + [i]].double().mean(0))) for i in others)
        assert float(torch.linalg.norm(mu - mean_here)) == pytest.approx(best, abs=1e-12)
    assert sorted(order) == list(range(6))


def test_k_center_on_a_line_takes_the_extremes_after_the_start():
    # From 2: the far end 10, then the near end 0, then 1 and 3 (both 1 away; the lower index first).
    assert k_center(LINE, 5, start=2) == [2, 4, 0, 1, 3]
    assert k_center(LINE, 3, start=4) == [4, 0, 3]  # from 10: then 0, then 3 (3 from 0, 7 from 10)


@pytest.mark.parametrize("seed", range(6))
def test_both_rules_match_their_brute_force_restatement_on_random_sets(seed):
    g = torch.Generator().manual_seed(seed)
    n, d = 9, 1 + seed % 4
    pts = torch.randn(n, d, generator=g)
    as_list = pts.double().tolist()
    start = int(torch.randint(n, (), generator=g))
    for k in range(n + 1):
        assert herding(pts, k) == brute_herding(as_list, k)
        assert k_center(pts, k, start) == (brute_k_center(as_list, k, start) if k else [])
    # Prefix-stable: the first k picks do not depend on the budget (slicing a full-IPC selection is exact).
    assert herding(pts, 4) == herding(pts, n)[:4]
    assert k_center(pts, 4, start) == k_center(pts, n, start)[:4]


def test_no_repeats_with_duplicate_points_and_k_above_n_returns_every_point_once():
    pts = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [5.0, 5.0]])
    for order in (herding(pts, 10), k_center(pts, 10, start=0), k_center(pts, 10, start=3)):
        assert sorted(order) == [0, 1, 2, 3]
    assert herding(pts, 0) == [] and k_center(pts, 0, start=0) == []
    with pytest.raises(ValueError, match="outside"):
        k_center(pts, 2, start=4)
    with pytest.raises(ValueError, match="matrix"):
        herding(pts[0], 1)


# ------------------------------------------------------------------ stand-ins for the pool and the teacher

class StubPool:
    """Stand-in for `RealPool` (rows, seeded class orders, normalized batches) over images given per row."""

    def __init__(self, images: torch.Tensor, labels: list[int], seed: int = 0) -> None:
        self.images, self.labels, self.seed = images, labels, seed

    def rows(self, cls: int) -> list[int]:
        return [r for r, c in enumerate(self.labels) if c == cls]

    def class_rows(self, cls: int, purpose: str) -> list[int]:
        rows = self.rows(cls)
        g = generator(self.seed, "recover", purpose, cls)
        return [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]

    def batch(self, rows: list[int]) -> torch.Tensor:
        return self.images[rows]

    def label(self, row: int) -> int:
        return self.labels[row]


class StubTeacher(nn.Module):
    """Predicts `preds[row]` for the image of each row (whose pixels all hold the row id): the head's input is the
    one-hot prediction, so features and predictions are both under the test's control."""

    def __init__(self, preds: list[int], num_classes: int) -> None:
        super().__init__()
        self.register_buffer("table", torch.tensor(preds))
        self.head = nn.Linear(num_classes, num_classes)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(num_classes))
            self.head.bias.zero_()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        rows = x[:, 0, 0, 0].round().long()
        return self.head(F.one_hot(self.table[rows], self.head.in_features).float())


def row_images(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()


# Rows 0..17, class r % 3. Class 0: rows 0, 3, 6 right, 9, 12, 15 wrong; class 1: all right; class 2: none right.
LABELS = [r % 3 for r in range(18)]
PREDS = [0, 1, 0, 0, 1, 1, 0, 1, 1, 2, 1, 0, 1, 1, 1, 2, 1, 0]


def stub_env(**kw) -> RecoverEnv:
    pool = StubPool(row_images(len(LABELS)), LABELS)
    return RecoverEnv(seed=0, device=torch.device("cpu"), resolution=4, mean=MEAN, std=STD, init="real",
                      teacher=StubTeacher(PREDS, 3), real=pool, **kw)


def test_correct_rows_keep_only_correctly_classified_rows_in_the_real_pick_order():
    env = stub_env()
    pool = env.require_real()
    for c, right in ((0, {0, 3, 6}), (1, set(pool.rows(1))), (2, set())):
        expected = [r for r in pool.class_rows(c, "real-pick") if r in right]
        assert env.correct_rows(c) == expected
        assert all(PREDS[r] == c for r in env.correct_rows(c))
    # One teacher pass per class (6 images, one chunk each), whatever was asked since.
    assert env.teacher.calls == 3


def test_features_are_the_last_linear_input_computed_once_per_class_and_cached_lru():
    env = stub_env(feature_batch=4, feature_cache_classes=2)
    rows, feats = env.features(0)
    assert rows == [0, 3, 6, 9, 12, 15]
    assert feats.dtype == torch.float32 and feats.shape == (6, 3)
    assert torch.equal(feats, F.one_hot(torch.tensor([PREDS[r] for r in rows]), 3).float())
    assert env.teacher.calls == 2  # 6 images in chunks of 4
    env.features(0)
    env.features(1)
    assert env.teacher.calls == 4  # class 0 came from the cache
    env.features(2)  # evicts class 0 (least recently used), keeps 1
    env.features(1)
    assert env.teacher.calls == 6
    env.features(0)
    assert env.teacher.calls == 8
    assert env.teacher.training  # left in the mode it was found in (the forward ran in eval mode)


@pytest.mark.parametrize("arch,dim", [("convnet", 2048), ("resnet18", 512)])
def test_features_of_the_project_convnet_and_torchvision_resnet18_are_the_head_input(arch, dim):
    from pipeline.models import build_model

    torch.manual_seed(0)
    teacher = build_model(arch, 10, 32).eval()
    images = normalize(torch.rand(7, 3, 32, 32, generator=torch.Generator().manual_seed(1)), MEAN, STD)
    pool = StubPool(images, [0, 1, 0, 1, 0, 0, 1])
    env = RecoverEnv(seed=0, device=torch.device("cpu"), resolution=32, mean=MEAN, std=STD, teacher=teacher,
                     real=pool, feature_batch=2)
    rows, feats = env.features(0)
    assert rows == [0, 2, 4, 5]
    assert feats.shape == (4, dim)
    head = last_linear(teacher)
    assert head is (teacher.classifier if arch == "convnet" else teacher.fc)
    with torch.no_grad():
        logits = teacher(images[rows])
        assert torch.allclose(head(feats), logits, atol=1e-4)
        if arch == "convnet":
            assert torch.allclose(feats, teacher.embed(images[rows]), atol=1e-5)


def test_init_rows_for_every_kind():
    env = stub_env()
    pool = env.require_real()
    classes = range(3)
    for j in range(8):
        real = env.init_rows("real", classes, j)
        assert real == [pool.class_rows(c, "real-pick")[j % 6] for c in classes]
        assert torch.equal(env.real_init(classes, j), pool.batch(real))  # real_init is the "real" kind
        correct = env.init_rows("real-correct", classes, j)
        assert correct[0] == env.correct_rows(0)[j % 3]
        assert correct[1] == env.correct_rows(1)[j % 6]
        assert correct[2] == real[2]  # no correct row: falls back to the real pick
        for kind in ("herding", "k-center"):
            picks = env.init_rows(f"real-{kind}", classes, j)
            assert picks == [env.selected_rows(kind, c, 6)[j % 6] for c in classes]
    assert torch.equal(env.init_batch(classes, 2, "real-herding"), pool.batch(env.init_rows("real-herding", classes, 2)))
    with pytest.raises(ValueError, match="unknown real init"):
        env.init_rows("real-nope", classes, 0)


def test_selected_rows_follow_the_rules_on_the_features_and_do_not_depend_on_how_they_grew():
    grown, at_once = stub_env(), stub_env()
    for c in range(3):
        rows, feats = at_once.features(c)
        assert at_once.selected_rows("herding", c, 6) == [rows[i] for i in herding(feats, 6)]
        start = int(torch.randint(len(rows), (), generator=generator(0, "recover", "k-center", c)))
        assert at_once.selected_rows("k-center", c, 6) == [rows[i] for i in k_center(feats, 6, start)]
    for c in range(3):
        for kind in ("herding", "k-center"):
            for k in (1, 2, 3, 5, 9):  # grown step by step, past the class size
                assert grown.selected_rows(kind, c, k) == at_once.selected_rows(kind, c, 6)[:k]


def images_of(out) -> torch.Tensor:
    return torch.stack(out.images)


@pytest.mark.parametrize("kind", ["herding", "k-center"])
def test_worker_outputs_the_selection_in_order_repeats_short_classes_and_any_ipc_split_agrees(kind):
    env = stub_env()
    worker = get_method(kind).open(env, None)
    gen = torch.Generator()
    whole = worker.run(range(0, 2), range(0, 8), gen, "u")
    assert whole.classes == [0] * 8 + [1] * 8 and whole.ipc_index == list(range(8)) * 2
    assert whole.metrics["short_classes"] == [0, 1]  # 6 images each, IPC 8
    assert {"selection_seconds", "feature_seconds"} <= set(whole.metrics)
    for c in range(2):
        order = env.selected_rows(kind, c, 8)
        assert len(order) == 6 and len(set(order)) == 6
        expected = [order[j % 6] for j in range(8)]  # all six, then again from the start
        pixels = images_of(whole)[c * 8:(c + 1) * 8]
        assert torch.allclose(pixels, (row_images(18)[expected] * 0.25 + 0.5).clamp(0, 1))
    split = [worker.run(range(0, 2), r, gen, "u") for r in (range(0, 3), range(3, 8))]
    for c in range(2):
        parts = [images_of(p)[[i for i, cc in enumerate(p.classes) if cc == c]] for p in split]
        assert torch.equal(torch.cat(parts), images_of(whole)[c * 8:(c + 1) * 8])
    assert worker.run(range(0, 2), range(0, 3), gen, "u").metrics["short_classes"] == []


def test_methods_are_registered_as_teacher_selections():
    for name, key in (("herding", "herding"), ("k-center", "k_center")):
        m = get_method(name)
        assert m.needs.teacher and m.needs.real_images and not m.needs.bn_teacher
        assert not m.synthesizes and m.whole_class and m.default_init == "real" and m.config_key == key


# ------------------------------------------------------------------------------ end to end on the demo

@pytest.mark.parametrize("kind", ["herding", "k-center"])
def test_recover_stage_selects_real_images_of_the_class_deterministically(kind, teacher_run, tmp_path):
    from manifests.store import ManifestStore
    from pipeline.data.shards import IndexedImages, read_index
    from pipeline.data.synthetic import decode_rgb, synthetic_index
    from pipeline.run.runner import run_pipeline
    from pipeline.run.stages.recover import open_env
    from tests.helpers import clone_run, fast_config

    cfg = fast_config(f"recover.method={kind}")  # ipc 2, 2 shards of 5 classes: 2 whole-class units
    runs = []
    for name in ("a", "b"):
        ctx = run_pipeline(cfg, clone_run(teacher_run, tmp_path / name), stages=["recover"], progress=False)
        recs = ManifestStore(ctx.run_dir).records("recover")
        runs.append({r.unit: sorted((o.uri, o.sha256) for o in r.outputs) for r in recs})
    assert runs[0] == runs[1] and len(runs[0]) == 2  # same bytes twice
    for r in recs:
        assert r.metrics["images"] == 10 and r.metrics["image_iterations"] == 0
        assert r.metrics["images_per_s"] > 0 and r.metrics["selection_seconds"] >= 0
        assert r.metrics["short_classes"] == []

    run_dir = ctx.run_dir
    meta = json.loads((run_dir / "real" / "classes.json").read_text())
    real = IndexedImages(run_dir / "real", read_index([run_dir / "real" / f"{n}.parquet"
                                                       for n in meta["shards"]["train"]]))
    syn = IndexedImages(run_dir / "synthetic", synthetic_index(run_dir, recs))
    env = open_env(ctx, torch.device("cpu"))
    picks = {c: env.selected_rows(kind, c, 2) for c in range(10)}
    seen: dict[int, list[int]] = {}
    for i in range(len(syn)):
        c, j = int(syn.cls[i]), int(syn.keys[i].split("_i")[1])
        row = picks[c][j]  # ipc index j = position in the selection
        assert int(real.cls[row]) == c
        assert np.array_equal(decode_rgb(syn.raw(i)), decode_rgb(real.raw(row)))
        seen.setdefault(c, []).append(row)
    assert sorted(seen) == list(range(10)) and all(len(set(v)) == 2 for v in seen.values())
