"""RDED (`pipeline.methods.rded`): the crop windows, patches, teacher input, selection and stitching on tiny tensors,
the worker against a step-by-step recomputation on the demo's real images and teacher, the config checks, and
`distill run --recipe demo --set recover.method=rded` end to end, the same bytes twice."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from manifests.store import ManifestStore
from pipeline.config import ConfigError
from pipeline.core.seeding import generator
from pipeline.methods import get_method
from pipeline.methods.rded import RdedConfig, RdedWorker, crop_patches, draw_boxes, pick, stitch, teacher_input
from tests.helpers import FAST, clone_run, fast_config

TINY = ["recover.method=rded", "recover.rded.candidates=8", "recover.rded.crops=2"]


# ------------------------------------------------------------------------------------------ pure compute

def test_crop_windows_are_square_inside_the_image_within_the_scale_and_seeded():
    boxes = draw_boxes(torch.Generator().manual_seed(3), 60, 90, 200, (0.08, 1.0))
    assert boxes == draw_boxes(torch.Generator().manual_seed(3), 60, 90, 200, (0.08, 1.0))
    assert boxes != draw_boxes(torch.Generator().manual_seed(4), 60, 90, 200, (0.08, 1.0))
    for top, left, h, w in boxes:
        assert h == w and 0 <= top <= 60 - h and 0 <= left <= 90 - w
        assert h * w <= 60 * 90 and h * w >= 0.08 * 60 * 90 - 2 * h  # whole pixels: rounded sides
    tiny = draw_boxes(torch.Generator().manual_seed(0), 50, 50, 100, (0.3, 0.3))
    assert {h for _, _, h, _ in tiny} == {round((0.3 * 2500) ** 0.5)}


def test_patches_are_torchvisions_antialiased_resized_crop():
    from torchvision.transforms.functional import resized_crop

    image = torch.randint(0, 256, (3, 41, 57), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    boxes = [(0, 0, 41, 41), (5, 9, 20, 20), (30, 50, 7, 7)]
    got = crop_patches(image, boxes, 16)
    assert got.shape == (3, 3, 16, 16) and got.min() >= 0 and got.max() <= 1
    for k, (t, le, h, w) in enumerate(boxes):
        ref = resized_crop(image.float() / 255, t, le, h, w, [16, 16], antialias=True)
        assert torch.allclose(got[k], ref.clamp(0, 1), atol=1e-6)


def test_teacher_input_pads_with_zeros_as_the_official_code_or_resizes():
    x = torch.ones(2, 3, 3, 5)
    padded = teacher_input(x, 8, "pad")
    assert padded.shape == (2, 3, 8, 8)
    # official pad(): top = (8 - 3) // 2 = 2 rows, bottom 3; left (8 - 5) // 2 = 1 column, right 2
    assert padded[0, 0].nonzero()[:, 0].unique().tolist() == [2, 3, 4]
    assert padded[0, 0].nonzero()[:, 1].unique().tolist() == [1, 2, 3, 4, 5]
    assert padded.sum() == x.sum()
    resized = teacher_input(x, 8, "resize")
    assert resized.shape == (2, 3, 8, 8) and torch.allclose(resized, torch.ones_like(resized))
    same = torch.rand(1, 3, 8, 8)
    assert teacher_input(same, 8, "pad") is same and teacher_input(same, 8, "resize") is same


def test_pick_keeps_each_images_best_crop_ranked_then_second_best_then_repeats():
    ce = torch.tensor([[0.9, 0.2, 0.5],   # image 0: best crop 1 (0.2), then 2 (0.5)
                       [0.1, 0.8, 0.7],   # image 1: best crop 0 (0.1), then 2 (0.7)
                       [0.4, 0.4, 0.3]])  # image 2: best crop 2 (0.3), then 0 (0.4, tie with 1: the lower index)
    assert pick(ce, 2) == ([(1, 0), (0, 1)], False)
    assert pick(ce, 3) == ([(1, 0), (0, 1), (2, 2)], False)
    assert pick(ce, 5) == ([(1, 0), (0, 1), (2, 2), (2, 0), (0, 2)], True)
    full, short = pick(ce, 11)
    assert short and full[:9] == pick(ce, 9)[0] and full[9:] == full[:2]  # all 9 crops, then from the start


def test_stitch_puts_the_patches_ranked_j_ipc_plus_j_in_image_j_row_major():
    ipc, f, p = 3, 2, 4
    patches = torch.arange(ipc * f * f, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, p, p)
    out = stitch(patches, ipc, f, 8)
    assert out.shape == (ipc, 3, 8, 8)
    for j in range(ipc):
        cells = [out[j, 0, :4, :4], out[j, 0, :4, 4:], out[j, 0, 4:, :4], out[j, 0, 4:, 4:]]
        assert [float(c.unique()) for c in cells] == [j, ipc + j, 2 * ipc + j, 3 * ipc + j]
    odd = stitch(patches, ipc, f, 7)  # 7 px: the first row and column of cells get 4 px, the others 3
    assert float(odd[0, 0, 3, 3]) == 0 and float(odd[0, 0, 3, 4]) == ipc and float(odd[0, 0, 4, 0]) == 2 * ipc
    with pytest.raises(ValueError, match="patches"):
        stitch(patches[:5], ipc, f, 8)


# ------------------------------------------------------------------------------------------ the worker

def _recompute(env, cfg: RdedConfig, classes: range, ipc: int) -> torch.Tensor:
    """The unit's images, step by step: each class's candidates and every window drawn from the class's own
    generator (run seed, "rded", class), every crop padded and scored by the teacher one by one, each image's best
    crop, the best ipc x f^2, stitched."""
    from pipeline.core.imageops import normalize

    pool, f = env.require_real(), cfg.resolved_factor(env.resolution)
    size, res = env.resolution // f, env.resolution
    out = []
    for c in classes:
        gen = generator(env.seed, "rded", c)
        rows = pool.rows(c)
        rows = [rows[i] for i in torch.randperm(len(rows), generator=gen)[:cfg.candidates].tolist()]
        best = []
        for arr in pool.decoded(rows):
            boxes = draw_boxes(gen, arr.shape[0], arr.shape[1], cfg.crops, (cfg.crop_scale_min, cfg.crop_scale_max))
            scored = []
            for k, patch in enumerate(crop_patches(torch.tensor(arr).permute(2, 0, 1), boxes, size)):
                lo, hi = (res - size) // 2, res - size - (res - size) // 2
                x = F.pad(normalize(patch[None], env.mean, env.std), (lo, hi, lo, hi))
                with torch.no_grad():
                    ce = float(F.cross_entropy(env.teacher.eval()(x), torch.tensor([c])))
                scored.append((ce, k, patch))
            best.append(min(scored, key=lambda s: (s[0], s[1])))
        ranked = sorted(range(len(best)), key=lambda i: (best[i][0], i))[:ipc * f * f]
        out.append(stitch(torch.stack([best[i][2] for i in ranked]), ipc, f, res))
    return torch.cat(out)


@pytest.fixture(scope="module")
def demo_env(teacher_run, tmp_path_factory):
    """The demo's real pool and teacher (FAST), as the recover stage opens them for rded."""
    from pipeline.run.runner import run_pipeline
    from pipeline.run.stages.recover import open_env

    run_dir = clone_run(teacher_run, tmp_path_factory.mktemp("rded") / "env")
    ctx = run_pipeline(fast_config(*TINY), run_dir, stages=["recover"], progress=False)
    return ctx, open_env(ctx, torch.device("cpu"))


@pytest.mark.parametrize("factor, candidates", [(2, 8), (1, 6)])
def test_worker_keeps_the_teachers_best_crops_and_stitches_them(demo_env, factor, candidates):
    _, env = demo_env
    cfg = RdedConfig(candidates=candidates, crops=3, factor=factor)
    worker = get_method("rded").open(env, cfg)
    assert isinstance(worker, RdedWorker)
    out = worker.run(range(3, 5), range(0, 2), generator(0, "recover", "k"), "k")
    assert out.classes == [3, 3, 4, 4] and out.ipc_index == [0, 1, 0, 1] and out.labels is None
    ref = _recompute(env, cfg, range(3, 5), 2)
    assert torch.allclose(torch.stack(out.images), ref, atol=1e-6)
    m = out.metrics
    assert m["candidates_scored"] == 2 * candidates * 3 and m["teacher_forwards_per_image"] == candidates * 3 / 2
    assert m["factor"] == factor and m["patch_px"] == 32 // factor and m["image_iterations"] == 0
    assert m["short_classes"] == [] and m["kept_ce_mean"] >= 0
    again = worker.run(range(3, 5), range(0, 2), generator(0, "recover", "k"), "k")
    assert all(torch.equal(a, b) for a, b in zip(out.images, again.images, strict=True))
    # another split into units (class 4 alone, or with class 5) picks the same patches for the same class
    alone = worker.run(range(4, 6), range(0, 2), generator(0, "recover", "other"), "other")
    assert torch.equal(alone.images[0], out.images[2]) and torch.equal(alone.images[1], out.images[3])


def test_a_class_with_too_few_candidates_takes_second_best_crops_and_says_so(demo_env):
    _, env = demo_env
    out = RdedWorker(env, RdedConfig(candidates=3, crops=2, factor=2)).run(range(0, 2), range(0, 1),
                                                                           generator(0, "x"), "x")
    # IPC 1 at factor 2 needs 4 patches of 3 images: the best crop of each, then one second-best
    assert len(out.images) == 2 and out.metrics["short_classes"] == [0, 1]
    assert all(img.shape == (3, 32, 32) for img in out.images)


def test_registered_as_a_whole_class_teacher_method_that_synthesizes_nothing():
    m = get_method("rded")
    assert m.needs.teacher and m.needs.real_images and not m.needs.bn_teacher and m.whole_class
    assert not m.synthesizes and m.default_init == "real" and m.config_key == "rded"
    keys = {k: v for k, v, _ in m.config_fields()}
    assert keys == {"candidates": 300, "crops": 5, "factor": 0, "crop_scale_min": 0.08, "crop_scale_max": 1.0,
                    "score": "pad"}
    assert RdedConfig().resolved_factor(224) == 2 and RdedConfig().resolved_factor(128) == 2
    assert RdedConfig().resolved_factor(64) == 1 and RdedConfig().resolved_factor(32) == 1
    assert RdedConfig(factor=3).resolved_factor(32) == 3


@pytest.mark.parametrize("override, message", [
    ("recover.rded.candidates=0", r"recover\.rded'.*candidates must be >= 1"),
    ("recover.rded.crops=0", r"recover\.rded'.*crops must be >= 1"),
    ("recover.rded.factor=-1", r"recover\.rded'.*factor must be >= 0"),
    ("recover.rded.factor=33", r"recover\.rded\.factor'.*do not fit data\.resolution=32"),
    ("recover.rded.crop_scale_min=0", r"recover\.rded'.*crop_scale_min"),
    ("recover.rded.crop_scale_max=1.5", r"recover\.rded'.*crop_scale_max"),
    ("recover.rded.score=blur", r"recover\.rded'.*score must be one of pad, resize"),
    ("recover.init=noise", r"recover\.init'.*rded crops random real images"),
])
def test_bad_settings_are_refused_at_load_naming_the_key(override, message):
    from pipeline.commands.cli import main
    from pipeline.commands.recipes import load_config

    with pytest.raises(ConfigError, match=message):
        load_config("demo", overrides=["recover.method=rded", override])
    assert main(["run", "--run-dir", "/nonexistent/never-made", "--set", "recover.method=rded", "--set", override]) == 2


# ------------------------------------------------------------------------------ end to end on the demo

def test_distill_run_demo_with_rded_end_to_end_and_the_same_bytes_twice(teacher_run, demo_env, tmp_path):
    """`distill run --recipe demo --set recover.method=rded` (FAST, 8 candidates, 2 crops): recover, relabel, the
    student and the summary; its recover shards are the bytes of another run's (`demo_env`'s)."""
    from pipeline.commands.cli import main
    from pipeline.data.shards import IndexedImages, read_index
    from pipeline.data.synthetic import decode_rgb, synthetic_index

    run_dir = clone_run(teacher_run, tmp_path / "run")
    args = ["run", "--recipe", "demo", "--run-dir", str(run_dir), "--no-progress"]
    for o in [*FAST, *TINY]:
        args += ["--set", o]
    assert main(args) == 0
    store = ManifestStore(run_dir)
    recs = store.records("recover")
    assert [r.unit for r in recs] == ["c0000-0004_ipc000-001", "c0005-0009_ipc000-001"]  # whole-class units
    for r in recs:
        assert r.metrics["images"] == 10 and r.metrics["factor"] == 1 and r.metrics["images_per_s"] > 0
        assert r.metrics["candidates_scored"] == 5 * 8 * 2 and r.metrics["teacher_forwards_per_image"] == 8.0
    summary = json.loads((run_dir / "results" / "summary.json").read_text())
    assert "rded" in json.dumps(summary)
    assert store.records("relabel") and store.records("train")

    ctx, _ = demo_env  # the same settings in another directory: the same shards
    other = {r.unit: sorted((o.uri, o.sha256) for o in r.outputs) for r in ManifestStore(ctx.run_dir).records("recover")}
    assert {r.unit: sorted((o.uri, o.sha256) for o in r.outputs) for r in recs} == other

    meta = json.loads((run_dir / "real" / "classes.json").read_text())
    syn = IndexedImages(run_dir / "synthetic", synthetic_index(run_dir, recs))
    real = IndexedImages(run_dir / "real", read_index([run_dir / "real" / f"{n}.parquet"
                                                       for n in meta["shards"]["train"]]))
    assert sorted(int(c) for c in syn.cls) == sorted(list(range(10)) * 2)
    images = [decode_rgb(syn.raw(i)) for i in range(len(syn))]
    assert all(a.shape == (32, 32, 3) and a.std() > 0 for a in images)
    # crops, not the real images themselves (a crop of all of an image is possible, but not for most of 20)
    reals = {decode_rgb(real.raw(i)).tobytes() for i in range(len(real))}
    assert sum(a.tobytes() in reals for a in images) < len(images) // 2
