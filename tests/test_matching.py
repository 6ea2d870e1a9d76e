"""Matching recover methods (DC, DSA, DM, DataDAM): loss functions, loops and workers on tiny real digits.

3 classes of scikit-learn's digits, upsampled to 16 px, 3 channels, 8-bit like ingested images; small
ConvNets (width 16). Workers run on a hand-made `RecoverEnv` with a stand-in real pool.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import pipeline.methods.datadam  # noqa: F401 - registers datadam
import pipeline.methods.dc  # noqa: F401 - registers dc, dsa
import pipeline.methods.dm  # noqa: F401 - registers dm
from pipeline.core.imageops import normalize
from pipeline.core.seeding import generator
from pipeline.methods.base import get_method
from pipeline.methods.datadam import DataDamConfig
from pipeline.methods.dc import DcConfig, DsaConfig
from pipeline.methods.dm import DmConfig
from pipeline.methods.env import RecoverEnv
from pipeline.methods.matching import (
    DC_LOOPS,
    AttentionSpec,
    DistributionMatching,
    GradientMatching,
    NetSpec,
    RealImages,
    attention_map,
    dc_loops,
    distribution_matching,
    fresh_net,
    gradient_distance,
    gradient_matching,
    matching_loss,
    siamese_views,
)
from pipeline.run.unit_state import UnitCheckpoint

RES, CLASSES, PER_CLASS = 16, 3, 40
MEAN, STD = (0.1, 0.1, 0.1), (0.25, 0.25, 0.25)
SPEC = NetSpec(num_classes=CLASSES, resolution=RES, width=16)
DIGITS = "color_crop_cutout_scale_rotate"  # the official strategy for digits: no flip


def g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """[3 * 40, 3, 16, 16] images in [0, 1] (multiples of 1/255) and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    xs, ys = [], []
    for c in range(CLASSES):
        x = torch.tensor(d.images[d.target == c][:PER_CLASS], dtype=torch.float32) / 16.0
        x = F.interpolate(x[:, None], size=RES, mode="bilinear", align_corners=False).clamp(0, 1)
        xs.append((x.expand(-1, 3, -1, -1) * 255).round() / 255)
        ys.append(torch.full((x.shape[0],), c))
    return torch.cat(xs), torch.cat(ys)


class TinyPool:
    """Stand-in for `RealPool`: rows, seeded class orders, normalized batches, labels."""

    def __init__(self, seed: int = 0) -> None:
        self.images, self.labels = digits()
        self.seed = seed

    def rows(self, cls: int) -> list[int]:
        return (self.labels == cls).nonzero().flatten().tolist()

    def class_rows(self, cls: int, purpose: str) -> list[int]:
        rows = self.rows(cls)
        order = torch.randperm(len(rows), generator=generator(self.seed, "recover", purpose, cls)).tolist()
        return [rows[i] for i in order]

    def batch(self, rows: list[int]) -> torch.Tensor:
        return normalize(self.images[rows], MEAN, STD)

    def label(self, row: int) -> int:
        return int(self.labels[row])


@pytest.fixture(scope="module")
def pool() -> TinyPool:
    return TinyPool()


@pytest.fixture(scope="module")
def real(pool) -> RealImages:
    return RealImages.from_normalized([pool.batch(pool.rows(c)) for c in range(CLASSES)], MEAN, STD)


def env_for(pool: TinyPool, init: str) -> RecoverEnv:
    return RecoverEnv(seed=0, device=torch.device("cpu"), resolution=RES, mean=MEAN, std=STD, init=init, real=pool)


def first_last(h: torch.Tensor, n: int = 5) -> tuple[float, float]:
    return float(h[:n].mean()), float(h[-n:].mean())


# ----------------------------------------------------------------------------------------------
# Loss functions


def test_dc_distance_is_zero_for_identical_gradients():
    net = fresh_net(SPEC, g(0))
    grads = [torch.randn(p.shape, generator=g(i)) for i, p in enumerate(net.parameters())]
    assert float(gradient_distance(grads, [t.clone() for t in grads])) == pytest.approx(0.0, abs=1e-5)
    # Positive multiples too: the distance is a cosine per output row.
    assert float(gradient_distance([3.0 * t for t in grads], grads)) == pytest.approx(0.0, abs=1e-5)


def test_dc_distance_matches_a_hand_computation():
    conv_s = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 1.0]]]])  # [out 2, in 1, 1, 2]
    conv_r = torch.tensor([[[[0.0, 1.0]]], [[[1.0, 1.0]]]])
    lin_s = torch.tensor([[1.0, 2.0, 2.0]])  # [out 1, in 3]
    lin_r = torch.tensor([[-1.0, -2.0, -2.0]])
    bias_s, bias_r = torch.tensor([1.0, 5.0]), torch.tensor([-3.0, 0.5])  # 1-D: ignored
    # conv rows: orthogonal (1 - 0) + parallel (1 - 1); linear row: opposite (1 - (-1)) = 2; eps 1e-6 aside.
    expected = 1.0 + 0.0 + 2.0
    got = gradient_distance([conv_s, lin_s, bias_s], [conv_r, lin_r, bias_r])
    assert float(got) == pytest.approx(expected, abs=1e-5)
    a, b = torch.tensor([[3.0, 4.0]]), torch.tensor([[4.0, 3.0]])
    assert float(gradient_distance([a], [b])) == pytest.approx(1 - 24 / (25 + 1e-6), abs=1e-7)
    assert float(gradient_distance([bias_s], [bias_r])) == 0.0


def test_dm_and_datadam_losses_are_zero_when_synthetic_equals_real(real):
    net = fresh_net(SPEC, g(1)).train()
    reals = [real.sample(k, 8, g(k)) for k in range(CLASSES)]
    syns = [r.clone() for r in reals]
    v_r, v_s = siamese_views(reals, syns, g(2), DIGITS)  # one draw per class on both: still equal
    for attention in (None, AttentionSpec()):
        for a, b in ((reals, syns), (v_r, v_s)):
            assert float(matching_loss(net, a, b, attention)["total"].detach()) == pytest.approx(0.0, abs=1e-8)
    other = [real.sample(k, 8, g(10 + k)) for k in range(CLASSES)]
    assert float(matching_loss(net, reals, other)["total"].detach()) > 0


def test_dm_loss_is_the_squared_distance_of_class_mean_embeddings(real):
    net = fresh_net(SPEC, g(3)).train()
    reals = [real.sample(k, 6, g(k)) for k in range(CLASSES)]
    syns = [torch.randn(2, 3, RES, RES, generator=g(20 + k)) for k in range(CLASSES)]
    with torch.no_grad():
        expected = sum(((net.embed(r).mean(0) - net.embed(s).mean(0)) ** 2).sum() for r, s in zip(reals, syns, strict=True))
        got = matching_loss(net, reals, syns)["total"]
    torch.testing.assert_close(got, expected)


def test_attention_map_sums_powers_over_channels_and_normalizes():
    f = torch.tensor([[[[1.0, -2.0]], [[2.0, 0.0]]]])  # [1, 2 channels, 1, 2]
    for p in (1.0, 4.0):
        a = torch.tensor([1 + 2**p, 2**p])
        torch.testing.assert_close(attention_map(f, p), (a / a.norm()).view(1, 2))


def test_datadam_loss_combines_attention_of_all_but_the_last_relu_and_the_embedding(real):
    spec = NetSpec(num_classes=CLASSES, resolution=RES, width=8, depth=3)
    net = fresh_net(spec, g(4)).train()
    reals = [real.sample(k, 5, g(k)) for k in range(CLASSES)]
    syns = [torch.randn(2, 3, RES, RES, generator=g(30 + k)) for k in range(CLASSES)]
    att = AttentionSpec(p=4.0, lam=0.01, scale=100.0)
    with torch.no_grad():
        out = matching_loss(net, reals, syns, att)
        dm = matching_loss(net, reals, syns)["total"]
        relus: list[list[torch.Tensor]] = [[], []]
        for side, batch in enumerate((reals, syns)):
            for x in batch:
                acts, h = [], x
                for m in net.features:
                    h = m(h)
                    if isinstance(m, torch.nn.ReLU):
                        acts.append(attention_map(h, 4.0).mean(0))
                relus[side].append(acts)
    expected_att = sum(((relus[0][k][layer] - relus[1][k][layer]) ** 2).sum()
                       for k in range(CLASSES) for layer in range(2))  # depth 3: the first 2 ReLUs
    torch.testing.assert_close(out["attention"], expected_att)
    torch.testing.assert_close(out["embedding"], dm)
    torch.testing.assert_close(out["total"], 100.0 * (expected_att + 0.01 * dm))


def test_dc_loops_table_and_interpolation():
    for ipc, loops in {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}.items():
        assert dc_loops(ipc) == loops == DC_LOOPS[ipc]
    # outer = IPC; inner linear in IPC between the neighbouring entries, rounded; 10 above 50.
    assert dc_loops(2) == (2, round(1 + 49 / 9))  # 6.44 -> 6
    assert dc_loops(5) == (5, 23)  # 1 + 49 * 4 / 9 = 22.8
    assert dc_loops(15) == (15, 38)  # 37.5 rounds half up
    assert dc_loops(25) == (25, 23)  # 22.5 -> 23
    assert dc_loops(45) == (45, 13)  # 12.5 -> 13
    assert dc_loops(100) == (100, 10)
    inner = [dc_loops(i)[1] for i in range(10, 51)]
    assert all(a >= b for a, b in zip(inner, inner[1:], strict=False))  # monotone between entries
    with pytest.raises(ValueError):
        dc_loops(0)


def test_fresh_net_is_seeded_by_the_generator_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b = fresh_net(SPEC, g(7)), fresh_net(SPEC, g(7))
    c = fresh_net(SPEC, g(8))
    assert torch.equal(torch.get_rng_state(), state)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_real_sampling_follows_the_official_permutation(real):
    x = real.sample(0, 10, g(0))
    assert x.shape == (10, 3, RES, RES)
    everything = real.sample(0, 1000, g(0))  # fewer than asked: all of the class, each once
    assert everything.shape[0] == PER_CLASS
    assert len({tuple(v.flatten()[:40].tolist()) for v in everything}) == PER_CLASS
    # uint8 round trip of 8-bit images is exact
    pool = TinyPool()
    torch.testing.assert_close(real.sample(1, 1000, g(1)).sort(0).values,
                               pool.batch(pool.rows(1))[torch.randperm(PER_CLASS, generator=g(1))].sort(0).values)


# ----------------------------------------------------------------------------------------------
# Loops: the loss falls on tiny data


def held_out_loss(real: RealImages, x: torch.Tensor, ipc: int, attention: AttentionSpec | None) -> float:
    """The matching loss of x against all real images on 4 fixed networks, without augmentation (no DSA noise)."""
    gen = g(123)
    total = 0.0
    for _ in range(4):
        net = fresh_net(SPEC, gen).train()
        with torch.no_grad():
            reals = [real.sample(k, PER_CLASS, gen) for k in range(CLASSES)]
            total += float(matching_loss(net, reals, list(x.split(ipc)), attention)["total"])
    return total / 4


def test_dm_loss_falls(real):
    init = torch.cat([real.sample(k, 2, g(k)) for k in range(CLASSES)])  # real init, the default
    cfg = DistributionMatching(iterations=40, batch_real=32, strategy=DIGITS)
    x, hist = distribution_matching(init, 2, real, SPEC, g(1), cfg)
    first, last = first_last(hist["total"])
    assert last < first
    assert held_out_loss(real, x, 2, None) < 0.8 * held_out_loss(real, init, 2, None)
    assert x.shape == init.shape and not x.requires_grad


@pytest.mark.parametrize("p", [1.0, 4.0])  # the official code's exponent and the paper's
def test_datadam_loss_falls(real, p):
    init = torch.randn(2 * CLASSES, 3, RES, RES, generator=g(5))
    att = AttentionSpec(p=p)
    cfg = DistributionMatching(iterations=40, batch_real=32, strategy=DIGITS, attention=att)
    x, hist = distribution_matching(init, 2, real, SPEC, g(1), cfg)
    assert set(hist) == {"total", "attention", "embedding"}
    first, last = first_last(hist["total"])
    assert last < 0.9 * first
    assert held_out_loss(real, x, 2, att) < 0.8 * held_out_loss(real, init, 2, att)


@pytest.mark.parametrize("strategy", [None, DIGITS])  # DC, DSA
def test_gradient_matching_loss_falls(real, strategy):
    noise = torch.randn(2 * CLASSES, 3, RES, RES, generator=g(5))
    outer, inner = dc_loops(2)
    cfg = GradientMatching(iterations=30, outer_loop=outer, inner_loop=inner, batch_real=32, strategy=strategy)
    x, hist = gradient_matching(noise, 2, real, SPEC, g(1), cfg)
    first, last = first_last(hist["total"])
    assert last < 0.9 * first
    assert torch.isfinite(x).all()


def test_gradient_matching_with_batchnorm_networks_runs(real):
    spec = NetSpec(num_classes=CLASSES, resolution=RES, width=8, norm="batch")
    noise = torch.randn(CLASSES, 3, RES, RES, generator=g(5))
    cfg = GradientMatching(iterations=2, outer_loop=2, inner_loop=1, batch_real=16)
    x, hist = gradient_matching(noise, 1, real, spec, g(1), cfg)
    assert torch.isfinite(hist["total"]).all() and not torch.equal(x, noise)


# ----------------------------------------------------------------------------------------------
# Workers: registration, outputs, determinism


TINY = {
    "dm": DmConfig(width=16, iterations=3, batch_real=16, strategy=DIGITS),
    "datadam": DataDamConfig(width=16, iterations=3, batch_real=16, strategy=DIGITS),
    "dc": DcConfig(width=16, iterations=2, batch_real=16),
    "dsa": DsaConfig(width=16, iterations=2, batch_real=16, strategy=DIGITS),
}


def test_methods_are_registered_as_whole_class_needing_real_images():
    inits = {"dm": "real", "datadam": "real", "dc": "noise", "dsa": "real"}
    for name, init in inits.items():
        m = get_method(name)
        assert m.whole_class and m.needs.real_images and not m.needs.teacher and m.synthesizes
        assert m.default_init == init
        assert {k for k, _, doc in m.config_fields() if doc} == {k for k, _, _ in m.config_fields()}


@pytest.mark.parametrize("name", sorted(TINY))
def test_worker_outputs_and_same_seed_same_bytes(pool, name):
    method = get_method(name)
    env = env_for(pool, method.default_init)
    classes, ipc = range(0, CLASSES), range(0, 2)
    state = torch.get_rng_state()
    out = method.open(env, TINY[name]).run(classes, ipc, g(11), "c0000-0002_ipc000-001")
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert out.classes == [0, 0, 1, 1, 2, 2] and out.ipc_index == [0, 1, 0, 1, 0, 1]
    assert all(img.shape == (3, RES, RES) and img.dtype == torch.float32 for img in out.images)
    assert all(float(img.min()) >= 0.0 and float(img.max()) <= 1.0 for img in out.images)
    m = out.metrics
    assert m["image_iterations"] == 6 * TINY[name].iterations
    assert math.isfinite(m["loss_first"]) and math.isfinite(m["loss_last"])
    again = method.open(env, TINY[name]).run(classes, ipc, g(11), "c0000-0002_ipc000-001")
    assert all(torch.equal(a, b) for a, b in zip(out.images, again.images, strict=True))
    assert m == again.metrics
    other = method.open(env, TINY[name]).run(classes, ipc, g(12), "c0000-0002_ipc000-001")
    assert not all(torch.equal(a, b) for a, b in zip(out.images, other.images, strict=True))


def test_real_init_starts_from_the_random_real_picks(pool):
    """The starting images: real = `env.real_init(classes, j)` (random-real's picks), class-major; noise = a
    standard normal from the unit's generator."""
    from pipeline.methods.dm import initial_images

    env = env_for(pool, "real")
    x = initial_images(env, range(1, 3), range(0, 3), g(0))
    assert x.shape == (6, 3, RES, RES)
    for j in range(3):
        picks = env.real_init(range(1, 3), j)
        torch.testing.assert_close(x[j], picks[0])  # class 1, ipc j
        torch.testing.assert_close(x[3 + j], picks[1])  # class 2, ipc j
    noise = initial_images(env_for(pool, "noise"), range(1, 3), range(0, 3), g(0))
    torch.testing.assert_close(noise, torch.randn(6, 3, RES, RES, generator=g(0)))


def test_dc_worker_reports_its_loops_and_datadam_its_lr(pool):
    env = env_for(pool, "noise")
    out = get_method("dc").open(env, TINY["dc"]).run(range(0, 2), range(0, 2), g(0), "u")
    assert (out.metrics["outer_loop"], out.metrics["inner_loop"]) == dc_loops(2)
    custom = DcConfig(width=8, iterations=1, batch_real=8, outer_loop=3, inner_loop=1)
    out = get_method("dc").open(env, custom).run(range(0, 2), range(0, 1), g(0), "u")
    assert (out.metrics["outer_loop"], out.metrics["inner_loop"]) == (3, 1)
    worker = get_method("datadam").open(env, DataDamConfig())
    assert worker.image_lr(10) == 1.0 and worker.image_lr(100) == 10.0


def test_config_validation():
    for cfg in (DmConfig(), DataDamConfig(), DcConfig(), DsaConfig()):
        cfg.validate()
    bad = [DmConfig(strategy="color_blur"), DmConfig(norm="layer"), DmConfig(iterations=0), DcConfig(lr_img=0),
           DcConfig(outer_loop=-1), DsaConfig(strategy="spin"), DataDamConfig(p=0), DataDamConfig(depth=1),
           DmConfig(momentum=1.0)]
    for cfg in bad:
        with pytest.raises(ValueError):
            cfg.validate()
    DmConfig(strategy="none").validate()


# ----------------------------------------------------------------------------------------------
# Checkpoints inside a unit: a loop stopped mid-way and resumed gives the bytes of one that never stopped


class _Killed(Exception):
    pass


class _DyingCheckpoint(UnitCheckpoint):
    """Saves after every iteration, then stops the loop (as a SIGKILL would) right after save number `die_after`."""

    def __init__(self, path, die_after: int) -> None:  # noqa: ANN001
        super().__init__(path, "tag", every_s=0)
        self.die_after = die_after

    def save(self, state) -> None:  # noqa: ANN001
        super().save(state)
        if self.saves == self.die_after:
            raise _Killed


RESUMABLE = {
    "dm": DistributionMatching(iterations=5, batch_real=8, strategy=DIGITS),
    "datadam": DistributionMatching(iterations=5, batch_real=8, strategy=DIGITS, attention=AttentionSpec(p=4.0)),
    "dc": GradientMatching(iterations=4, outer_loop=2, inner_loop=1, batch_real=8),
    "dsa": GradientMatching(iterations=4, outer_loop=2, inner_loop=1, batch_real=8, strategy=DIGITS),
}


def _loop(name: str, init: torch.Tensor, real: RealImages, ckpt):  # noqa: ANN001, ANN202
    spec = NetSpec(num_classes=CLASSES, resolution=RES, width=8)
    cfg = RESUMABLE[name]
    if isinstance(cfg, GradientMatching):
        return gradient_matching(init, 2, real, spec, g(3), cfg, ckpt=ckpt)
    return distribution_matching(init, 2, real, spec, g(3), cfg, ckpt=ckpt)


@pytest.mark.parametrize("name", sorted(RESUMABLE))
def test_a_loop_killed_after_a_checkpoint_resumes_to_the_same_bytes(real, tmp_path, name):
    init = torch.randn(2 * CLASSES, 3, RES, RES, generator=g(5))
    want_x, want_hist = _loop(name, init, real, None)
    path = tmp_path / "unit.pt"
    with pytest.raises(_Killed):
        _loop(name, init, real, _DyingCheckpoint(path, die_after=2))
    assert path.is_file()
    again = UnitCheckpoint(path, "tag", every_s=-1)  # the next run: reads the file, saves no more
    x, hist = _loop(name, init, real, again)
    assert again.resumed_at == 2 and again.saves == 0
    assert torch.equal(x, want_x)
    assert set(hist) == set(want_hist) and all(torch.equal(hist[k], want_hist[k]) for k in hist)
    # without the momentum buffer or the generator state the continuation differs: the test can tell
    state = torch.load(path, weights_only=True)
    state["gen"] = g(99).get_state()
    torch.save(state, path)
    x, _ = _loop(name, init, real, UnitCheckpoint(path, "tag", every_s=-1))
    assert not torch.equal(x, want_x)


def test_a_checkpoint_of_another_shape_is_refused(real, tmp_path):
    path = tmp_path / "unit.pt"
    init = torch.randn(2 * CLASSES, 3, RES, RES, generator=g(5))
    with pytest.raises(_Killed):
        _loop("dm", init, real, _DyingCheckpoint(path, die_after=1))
    cfg = DistributionMatching(iterations=5, batch_real=8, strategy=DIGITS)
    with pytest.raises(ValueError, match="another unit; delete it"):
        distribution_matching(init[:CLASSES], 1, real, NetSpec(num_classes=CLASSES, resolution=RES, width=8), g(3),
                              cfg, ckpt=UnitCheckpoint(path, "tag", every_s=-1))
