"""CDA (curriculum data augmentation, Yin & Shen, TMLR 2024) as `recover.sre2l.crop_schedule=cda` (and DWA's):
the schedule against the official formula, the synthesis loop cropping by it at every iteration (one batch at a
time and several per forward), the config keys and their checks, the recover hash of runs without it unchanged,
and `distill run --set recover.sre2l.crop_schedule=cda --set recover.method=sre2l` on the demo."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

from manifests.store import ManifestStore
from pipeline.config import Config, ConfigError
from pipeline.core.imageops import normalize
from pipeline.methods.synthesis import RecoverParams, cda_min_scale, draw_augment, init_images, synthesize_batch
from pipeline.models import build_model
from tests.helpers import FAST, clone_run

RES, CLASSES = 16, 4


def _official(it: int, total: int, milestone: float, mode: str) -> float:
    """CDA/recover_cda_in1k.py (VILA-Lab/SRe2L 8d00cba), get_images: min_crop of iteration `it`."""
    min_crop = 0.08
    if it < milestone * total:
        if mode == "step":
            min_crop = 1.0
        elif mode == "linear":
            min_crop = 0.08 + (1.0 - 0.08) * (1 - it / (milestone * total))
        elif mode == "cosine":
            min_crop = 0.08 + (1.0 - 0.08) * (1 + math.cos(math.pi * it / (milestone * total))) / 2
    return min_crop


@pytest.mark.parametrize("mode", ["cosine", "linear", "step"])
@pytest.mark.parametrize("milestone", [1.0, 0.5, 0.3])
def test_the_schedule_is_the_official_one(mode, milestone):
    total = 40
    got = [cda_min_scale(it, total, milestone, 1.0, 0.08, mode) for it in range(total)]
    want = [_official(it, total, milestone, mode) for it in range(total)]
    assert got == pytest.approx(want, abs=1e-12)
    assert got[0] == pytest.approx(1.0) and min(got) >= 0.08
    assert got[int(milestone * total) + 1:] == [0.08] * len(got[int(milestone * total) + 1:])
    if mode != "step":
        assert all(a >= b for a, b in zip(got, got[1:], strict=False))  # easy to hard, never back
    assert cda_min_scale(10, 20, 1.0, 1.0, 0.08, "cosine") == pytest.approx(0.54)  # half way: the mean
    with pytest.raises(ValueError, match="CDA mode"):
        cda_min_scale(0, 10, 1.0, 1.0, 0.08, "exp")


def test_recover_params_crop_scale_per_iteration():
    plain = RecoverParams(iterations=10, crop_scale=(0.2, 1.0))
    assert all(plain.crop_scale_at(it) is plain.crop_scale for it in range(10))  # untouched without a schedule
    cda = RecoverParams(iterations=10, crop_scale=(0.2, 1.0), crop_schedule="cda", cda_milestone=0.5,
                        cda_scale_start=0.9)
    assert cda.crop_scale_at(0) == (pytest.approx(0.9), 1.0)
    assert cda.crop_scale_at(5) == (0.2, 1.0) and cda.crop_scale_at(9) == (0.2, 1.0)
    for bad, message in [({"crop_schedule": "easy"}, "crop_schedule must be"),
                         ({"crop_schedule": "cda", "crop": False}, "crop=False"),
                         ({"crop_schedule": "cda", "cda_milestone": 0.0}, "cda_milestone"),
                         ({"crop_schedule": "cda", "cda_scale_start": 0.05}, "cda_scale_start"),
                         ({"crop_schedule": "cda", "cda_mode": "exp"}, "cda_mode")]:
        with pytest.raises(ValueError, match=message):
            RecoverParams(iterations=4, crop_scale=(0.08, 1.0), **bad)


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("convnet", num_classes=CLASSES, resolution=RES)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.rand(16, 3, RES, RES, generator=g)
        loss = F.cross_entropy(model(normalize(x)), torch.randint(0, CLASSES, (16,), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_the_loop_crops_every_iteration_by_the_schedule(teacher):
    """synthesize_batch under cda = the same batch optimized with draws made at each iteration's scheduled scale;
    the first crop takes the whole image; the schedule off gives the plain loop's bytes, on other ones."""
    params = RecoverParams(iterations=12, jitter=2, crop_schedule="cda")
    plain = RecoverParams(iterations=12, jitter=2)
    targets = torch.arange(CLASSES)
    init = init_images("noise", CLASSES, RES, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(7)
    draws = [draw_augment(gen, RES, RES, params.crop_scale_at(it), params.jitter, params.flip, params.crop)
             for it in range(params.iterations)]
    assert (draws[0].h, draws[0].w) == (RES, RES)  # min scale 1.0: the whole image
    assert min(d.h * d.w for d in draws[-4:]) < RES * RES  # late crops are smaller
    out, _ = synthesize_batch(teacher, targets, init, params, torch.Generator().manual_seed(7))
    ref, _ = synthesize_batch(teacher, targets, init, params, torch.Generator().manual_seed(0), draws=[draws])
    assert torch.equal(out, ref)
    off, _ = synthesize_batch(teacher, targets, init, plain, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    fixed = [draw_augment(g, RES, RES, (0.08, 1.0), 2, True, True) for _ in range(12)]
    assert torch.equal(off, synthesize_batch(teacher, targets, init, plain, torch.Generator(), draws=[fixed])[0])
    assert not torch.equal(out, off)


def _env(teacher, groups: int):
    from pipeline.core.imageops import IMAGENET_MEAN, IMAGENET_STD
    from pipeline.methods.env import RecoverEnv

    return RecoverEnv(seed=0, device=torch.device("cpu"), resolution=RES, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                      init="noise", teacher=teacher, batches_per_forward=groups)


def test_sre2l_worker_follows_the_schedule_one_batch_or_several_per_forward(teacher):
    from pipeline.methods.sre2l import Sre2lConfig, SynthesisWorker

    cfg = Sre2lConfig(iterations=8, jitter=2, crop_schedule="cda", cda_milestone=0.5)
    runs = {g: SynthesisWorker(_env(teacher, g), cfg).run(range(CLASSES), range(2), torch.Generator().manual_seed(3),
                                                          "u") for g in (1, 2)}
    assert runs[2].metrics["batches_per_forward"] == 2 and runs[1].metrics["batches_per_forward"] == 1
    for a, b in zip(runs[1].images, runs[2].images, strict=True):
        assert (a - b).abs().max() <= 1e-4  # merged forwards: the same draws, equal up to float rounding
    base = SynthesisWorker(_env(teacher, 1), Sre2lConfig(iterations=8, jitter=2)).run(
        range(CLASSES), range(2), torch.Generator().manual_seed(3), "u")
    assert not torch.equal(base.images[0], runs[1].images[0])


def test_keys_on_sre2l_and_dwa_with_their_checks_at_load():
    from pipeline.commands.cli import main
    from pipeline.commands.recipes import load_config

    for method in ("sre2l", "dwa"):
        cfg = load_config("demo", overrides=[f"recover.method={method}", f"recover.{method}.crop_schedule=cda",
                                             f"recover.{method}.cda_milestone=0.5"])
        sec = getattr(cfg.recover, method)
        assert (sec.crop_schedule, sec.cda_milestone, sec.cda_mode, sec.cda_scale_start) == ("cda", 0.5, "cosine", 1.0)
        p = sec.recover_params()
        assert p.crop_schedule == "cda" and p.crop_scale_at(0)[0] == pytest.approx(1.0)
        assert p.crop_scale_at(sec.iterations - 1) == (0.08, 1.0)
    for override, message in [("recover.sre2l.crop_schedule=easy", r"recover\.sre2l'.*crop_schedule must be none or cda"),
                              ("recover.sre2l.cda_milestone=1.5", r"recover\.sre2l'.*cda_milestone must be in"),
                              ("recover.sre2l.cda_mode=exp", r"recover\.sre2l'.*cda_mode"),
                              ("recover.sre2l.cda_scale_start=0.01", r"recover\.sre2l'.*cda_scale_start"),
                              ("recover.sre2l.crop=false", r"recover\.sre2l'.*crop=false")]:
        sets = ["recover.method=sre2l", "recover.sre2l.crop_schedule=cda", override]
        with pytest.raises(ConfigError, match=message):
            load_config("demo", overrides=sets)
        argv = ["run", "--run-dir", "/nonexistent/never-made"]
        for s in sets:
            argv += ["--set", s]
        assert main(argv) == 2


# The recover section's hash payload of a default config before the CDA keys existed (computed at the parent
# commit of this change with `json.dumps(cfg.section_for_hash("recover"), sort_keys=True, default=str)`).
HASH_BEFORE = {"sre2l": "752d10eaa651759c", "dwa": "f1888c8fbee5223b"}


def _digest(cfg: Config) -> str:
    text = json.dumps(cfg.section_for_hash("recover"), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@pytest.mark.parametrize("method", ["sre2l", "dwa"])
def test_runs_without_cda_keep_their_recover_hash(method):
    from pipeline.methods.sre2l import Sre2lConfig

    cfg = Config()
    cfg.recover.method = method
    assert _digest(cfg) == HASH_BEFORE[method]
    sec = getattr(cfg.recover, method)
    sec.crop_schedule = "none"  # set explicitly to the default: still the old hash
    assert _digest(cfg) == HASH_BEFORE[method]
    new = {"crop_schedule", "cda_milestone", "cda_mode", "cda_scale_start"}
    assert not new & set(cfg.section_for_hash("recover")[method])
    assert new <= {f.name for f in dataclasses.fields(Sre2lConfig)}
    sec.cda_milestone = 0.5  # a key set off its default counts, whatever the schedule
    assert cfg.section_for_hash("recover")[method]["cda_milestone"] == 0.5
    sec.cda_milestone = 1.0
    sec.crop_schedule = "cda"
    hashed = cfg.section_for_hash("recover")[method]
    assert hashed["crop_schedule"] == "cda" and "cda_milestone" not in hashed and _digest(cfg) != HASH_BEFORE[method]


def test_distill_run_demo_with_sre2l_and_cda(teacher_run, tmp_path):
    """`distill run --recipe demo --set recover.sre2l.crop_schedule=cda --set recover.method=sre2l` (FAST) through
    recover, relabel and the student; its recover hash differs from the run without CDA, its images too."""
    from pipeline.commands.cli import main
    from pipeline.commands.recipes import load_config
    from pipeline.run.runner import compute_hashes, run_pipeline
    from tests.helpers import fast_config

    run_dir = clone_run(teacher_run, tmp_path / "cda")
    argv = ["run", "--recipe", "demo", "--run-dir", str(run_dir), "--no-progress"]
    for o in [*FAST, "recover.sre2l.crop_schedule=cda", "recover.method=sre2l", "recover.ipc=1",
              "recover.classes_per_shard=10"]:
        argv += ["--set", o]
    assert main(argv) == 0
    store = ManifestStore(run_dir)
    cda = store.records("recover")
    assert len(cda) == 1 and cda[0].metrics["images"] == 10 and store.records("train")
    plain_cfg = fast_config("recover.method=sre2l", "recover.ipc=1", "recover.classes_per_shard=10")
    cda_cfg = load_config("demo", overrides=[*FAST, "recover.sre2l.crop_schedule=cda", "recover.method=sre2l",
                                             "recover.ipc=1", "recover.classes_per_shard=10"])
    assert compute_hashes(plain_cfg)["recover"] != compute_hashes(cda_cfg)["recover"]
    assert cda[0].config_hash == compute_hashes(cda_cfg)["recover"]
    ctx = run_pipeline(plain_cfg, clone_run(teacher_run, tmp_path / "plain"), stages=["recover"], progress=False)
    plain = ManifestStore(ctx.run_dir).records("recover")
    assert [o.sha256 for o in plain[0].outputs] != [o.sha256 for o in cda[0].outputs]
