"""Recover stage end to end on the demo teacher: determinism, unit layout, baseline, Ray, resume, bad input.

Every run starts from a clone of the session's `teacher_run` (ingest + squeeze under FAST). Under FAST the
demo has 10 classes; recover with classes_per_shard=5, ipc=2, ipc_per_unit=1 makes 4 units of 5 images.
"""

from __future__ import annotations

import json
import math
import re
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from manifests.schema import FileRef
from manifests.store import STAGE_RECORD, ManifestStore
from pipeline.config import ConfigError
from pipeline.data.shards import IndexedImages, read_index
from pipeline.data.synthetic import decode_rgb, synthetic_index
from pipeline.run.base import RunContext
from pipeline.run.runner import open_context, run_pipeline
from pipeline.run.stages.recover import STAGE, RecoverWorker, class_shards, unit_key
from tests.helpers import FAST, clone_run, fast_config, sigkill_when

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES, IPC, PER_SHARD = 10, 2, 5
UNITS = [unit_key(c0, c0 + PER_SHARD, i, i + 1) for c0 in (0, 5) for i in range(IPC)]
KEY_RE = re.compile(r"^c(\d{4})-(\d{4})_ipc(\d{3})-(\d{3})$")
RESUME_ITERS = "recover.dwa.iterations=40"  # units take a moment: long enough to kill the driver mid-stage


# ------------------------------------------------------------------------------------------------ helpers

def _recover(teacher_run: Path, dst: Path, *overrides: str, executor=None) -> RunContext:
    clone_run(teacher_run, dst)
    return run_pipeline(fast_config(*overrides), dst, stages=["recover"], executor=executor, progress=False)


def _outputs(run_dir: Path) -> dict[str, list[tuple[str, str]]]:
    """Unit key -> sorted (uri, sha256) of its record's outputs."""
    return {r.unit: sorted((o.uri, o.sha256) for o in r.outputs) for r in ManifestStore(run_dir).records("recover")}


def _unit_records(run_dir: Path) -> list[Path]:
    folder = run_dir / "manifests" / "recover"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.json") if p.stem != STAGE_RECORD and not p.name.endswith(".failed.json"))


def _stage_metrics(run_dir: Path) -> dict:
    rec = ManifestStore(run_dir).load("recover", STAGE_RECORD)
    assert rec is not None, "the recover stage record was not written"
    return rec.metrics


def _synthetic(run_dir: Path) -> tuple[IndexedImages, list[int]]:
    index = synthetic_index(run_dir, ManifestStore(run_dir).records("recover"))
    return IndexedImages(run_dir / "synthetic", index), index.column("cls").to_pylist()


def _real_train_by_class(run_dir: Path) -> dict[int, list[np.ndarray]]:
    meta = json.loads((run_dir / "real" / "classes.json").read_text())
    real = IndexedImages(run_dir / "real", read_index([run_dir / "real" / f"{n}.parquet"
                                                       for n in meta["shards"]["train"]]))
    out: dict[int, list[np.ndarray]] = {}
    for c, rows in real.rows_of_class().items():
        out[c] = [decode_rgb(real.raw(i)) for i in rows]
    return out


def _no_recover_work(run_dir: Path) -> None:
    """Nothing of the recover stage exists: no record (done, failed or stage), no synthetic file."""
    for folder in (run_dir / "manifests" / "recover", run_dir / "synthetic"):
        assert not folder.exists() or not any(folder.iterdir()), sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, teacher_run):
    """Recover runs shared by several tests, made on first use: runs(name, *overrides) -> run dir."""
    root = tmp_path_factory.mktemp("recover")
    made: dict[str, Path] = {}

    def get(name: str, *overrides: str) -> Path:
        if name not in made:
            made[name] = _recover(teacher_run, root / name, *overrides).run_dir
        return made[name]

    return get


# ------------------------------------------------------------------------------------------ pure planning

def test_class_shards_are_disjoint_contiguous_and_cover_every_class():
    for classes, per in [(10, 5), (10, 3), (7, 7), (1000, 100), (5, 1)]:
        shards = class_shards(classes, per)
        assert shards[0][0] == 0 and shards[-1][1] == classes
        assert all(a[1] == b[0] for a, b in zip(shards, shards[1:], strict=False))  # contiguous, disjoint
        assert all(0 < c1 - c0 <= per for c0, c1 in shards)
    assert class_shards(10, 3) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert unit_key(0, 100, 0, 10) == "c0000-0099_ipc000-009"


def test_plan_splits_classes_and_ipc_ranges(teacher_run):
    cfg = fast_config("recover.classes_per_shard=3", "recover.ipc=3", "recover.ipc_per_unit=2")
    units = STAGE.plan(open_context(cfg, teacher_run))
    assert [u.key for u in units] == [
        f"c{c0:04d}-{c1 - 1:04d}_ipc{i0:03d}-{i1 - 1:03d}"
        for c0, c1 in [(0, 3), (3, 6), (6, 9), (9, 10)] for i0, i1 in [(0, 2), (2, 3)]]
    assert units[0].payload == {"classes": [0, 3], "ipc": [0, 2]}
    assert units[-1].payload == {"classes": [9, 10], "ipc": [2, 3]}
    # classes_per_shard = 0 means min(100, classes): one shard of all 10 classes
    auto = STAGE.plan(open_context(fast_config("recover.classes_per_shard=0"), teacher_run))
    assert [u.key for u in auto] == ["c0000-0009_ipc000-000", "c0000-0009_ipc001-001"]


# --------------------------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("method", ["dwa", "sre2l"])
def test_recover_is_deterministic_and_seeded(runs, teacher_run, tmp_path, method):
    first = runs(method, f"recover.method={method}")
    second = _recover(teacher_run, tmp_path / "again", f"recover.method={method}").run_dir
    got, want = _outputs(second), _outputs(first)
    assert sorted(want) == UNITS
    assert got == want  # same sha256 for every output of every unit
    for uri, _ in want[UNITS[0]]:
        assert (second / uri).read_bytes() == (first / uri).read_bytes()

    # Another run seed gives other bytes (the runner would refuse a new seed in this run dir because the
    # teacher's hash covers the seed, so run the worker directly with the same teacher).
    other = clone_run(teacher_run, tmp_path / "seed1")
    cfg = fast_config(f"recover.method={method}", "seed=1")
    worker = RecoverWorker(RunContext(run_dir=other, config=cfg, run_id="seed1"))
    unit = next(u for u in STAGE.plan(open_context(cfg, other)) if u.key == UNITS[0])
    result = worker.run(unit)
    worker.close()
    tar_sha = {Path(o.uri).suffix: o.sha256 for o in result.outputs}[".tar"]
    assert tar_sha != dict((Path(u).suffix, s) for u, s in want[UNITS[0]])[".tar"]


# --------------------------------------------------------------------------------------------- unit layout

def test_unit_layout_synthetic_index_and_grids(runs):
    run_dir = runs("dwa", "recover.method=dwa")
    store = ManifestStore(run_dir)
    records = {r.unit: r for r in store.records("recover")}
    assert sorted(records) == UNITS

    # class shards from the unit keys: disjoint, contiguous, covering all classes; IPC ranges cover 0..IPC-1
    shards = sorted({(int(m[1]), int(m[2]) + 1) for m in (KEY_RE.match(k) for k in records)})
    assert shards == class_shards(NUM_CLASSES, PER_SHARD)
    covered = [c for c0, c1 in shards for c in range(c0, c1)]
    assert covered == list(range(NUM_CLASSES))

    # every image of a unit belongs to the unit's shard, one per class per IPC index
    for key, rec in records.items():
        m = KEY_RE.match(key)
        c0, c1, i0, i1 = int(m[1]), int(m[2]) + 1, int(m[3]), int(m[4]) + 1
        (pq,) = [o.uri for o in rec.outputs if o.uri.endswith(".parquet")]
        assert {Path(o.uri).suffix for o in rec.outputs} == {".tar", ".idx", ".parquet"}
        index = read_index([run_dir / pq])
        cls = index.column("cls").to_pylist()
        assert sorted(cls) == sorted(list(range(c0, c1)) * (i1 - i0))
        src = IndexedImages(run_dir / "synthetic", index)
        with tarfile.open(run_dir / "synthetic" / f"{key}.tar") as tar:
            for i, k in enumerate(src.keys):
                meta = json.loads(tar.extractfile(f"{k}.json").read())
                label = int(tar.extractfile(f"{k}.cls").read())
                assert meta["class"] == label == cls[i] and meta["unit"] == key
                assert i0 <= meta["ipc_index"] < i1 and meta["method"] == "dwa"
        assert rec.metrics["images"] == (c1 - c0) * (i1 - i0)

    src, cls = _synthetic(run_dir)
    assert len(src) == IPC * NUM_CLASSES
    assert sorted(cls) == sorted(list(range(NUM_CLASSES)) * IPC)
    assert len(set(src.keys)) == len(src.keys)

    # grids: one PNG per class (its images in a row) plus an overview, all listed in the stage record
    metrics = _stage_metrics(run_dir)
    assert metrics["units"] == 4 and metrics["ran"] == 4 and metrics["images"] == IPC * NUM_CLASSES
    grids = metrics["grids"]
    expected = ["results/grids/overview.png"] + [f"results/grids/class-{c:04d}.png" for c in range(NUM_CLASSES)]
    assert sorted(grids) == sorted(expected)
    for rel in grids:
        assert (run_dir / rel).is_file()
    by_class = src.rows_of_class()
    for c in range(NUM_CLASSES):
        grid = np.asarray(Image.open(run_dir / f"results/grids/class-{c:04d}.png").convert("RGB"))
        row = np.concatenate([decode_rgb(src.raw(i)) for i in by_class[c]], axis=1)
        assert grid.shape == (32, 32 * IPC, 3)
        assert np.array_equal(grid, row)
    overview = Image.open(run_dir / "results/grids/overview.png")
    assert overview.width * NUM_CLASSES == overview.height * IPC  # 10 class rows of IPC images, scaled up


# --------------------------------------------------------------------------------------- random-real

def test_random_real_baseline_copies_distinct_real_images_of_each_class(teacher_run, tmp_path):
    run_dir = clone_run(teacher_run, tmp_path / "rr")
    (run_dir / "checkpoints" / "teacher.pt").unlink()  # the baseline needs no teacher
    run_pipeline(fast_config("recover.method=random-real", "recover.ipc=3", "recover.ipc_per_unit=2"), run_dir,
                 stages=["recover"], progress=False)
    real = _real_train_by_class(run_dir)
    src, cls = _synthetic(run_dir)
    assert len(src) == 3 * NUM_CLASSES
    assert sorted(cls) == sorted(list(range(NUM_CLASSES)) * 3)
    matched: dict[int, list[int]] = {}
    for i, c in enumerate(cls):
        assert src.raw(i)[:8] == b"\x89PNG\r\n\x1a\n"
        img = decode_rgb(src.raw(i))
        assert img.shape == (32, 32, 3) == real[c][0].shape
        hits = [j for j, r in enumerate(real[c]) if np.array_equal(r, img)]
        assert hits, f"synthetic image {src.keys[i]} (class {c}) equals no real training image of class {c}"
        others = [o for o in real if o != c and any(np.array_equal(r, img) for r in real[o])]
        assert not others, f"synthetic image {src.keys[i]} also equals real images of classes {others}"
        matched.setdefault(c, []).append(hits[0])
        assert f"c{c:04d}_" in src.keys[i]
    for c, picks in matched.items():
        assert len(set(picks)) == len(picks) == 3, f"class {c}: repeated real images {picks}"
    for rec in ManifestStore(run_dir).records("recover"):
        assert not any(k.startswith("loss_") for k in rec.metrics)
        assert rec.metrics["image_iterations"] == 0  # nothing was optimized


# ------------------------------------------------------------------------------------------- loss metrics

@pytest.mark.parametrize("method", ["dwa", "sre2l"])
def test_unit_records_carry_loss_terms(runs, method):
    run_dir = runs(method, f"recover.method={method}")
    cfg = fast_config(f"recover.method={method}")
    records = ManifestStore(run_dir).records("recover")
    assert len(records) == 4
    for rec in records:
        m = rec.metrics
        for k in ("loss_total", "loss_ce", "loss_bn"):
            assert isinstance(m[k], float) and math.isfinite(m[k]), (k, m)
        assert m["loss_ce"] > 0 and m["loss_bn"] > 0
        # the logged terms are the parts of the optimized loss: total = ce + r_bn * bn
        assert m["loss_total"] == pytest.approx(m["loss_ce"] + getattr(cfg.recover, method).r_bn * m["loss_bn"], rel=1e-4)
        assert m["image_iterations"] == m["images"] * getattr(cfg.recover, method).iterations == 5 * 4
        assert m["device"] == "cpu" and m["seconds"] > 0
        if method == "dwa":
            # One class-balanced real subset serves all K ascent steps, so ||delta|| reaches rho
            # (fresh subsets per step reached about 0.57 rho on this teacher).
            assert 0.95 <= m["dwa_radius_ratio"] <= 1.0 + 1e-4, m
        else:
            assert "dwa_radius_ratio" not in m


def test_dwa_subset_is_class_balanced_fresh_per_batch_and_seeded(teacher_run, tmp_path):
    ctx = open_context(fast_config("recover.dwa.batch_size=10"), clone_run(teacher_run, tmp_path / "run"))
    env = RecoverWorker(ctx).env
    dwa = ctx.config.recover.dwa
    classes = range(5, 10)
    x, y = dwa.subset(env, classes, "k", 0)
    assert x.shape == (10, 3, 32, 32)
    assert sorted(y.tolist()) == [c for c in classes for _ in range(2)]  # 10 / 5 classes = 2 of each
    again, _ = dwa.subset(env, classes, "k", 0)
    other, _ = dwa.subset(env, classes, "k", 1)
    assert torch.equal(x, again) and not torch.equal(x, other)
    # The default size is the synthesis batch: one image of each class, as the official batch of real inits.
    dwa.batch_size = 0
    _, y1 = dwa.subset(env, classes, "k", 0)
    assert sorted(y1.tolist()) == list(classes)


# ------------------------------------------------------------------------------------------------ bad input

def _bn_less_teacher(ctx, device):  # noqa: ANN001, ANN202 - stands in for recover.run_teacher
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(8, NUM_CLASSES)).eval()


BAD_INPUTS = {
    "ipc0": (["recover.ipc=0"], r"recover\.ipc.*must be > 0, got 0"),
    "shard_too_big": (["recover.classes_per_shard=11"], r"classes_per_shard=11 .*\b10 classes"),
    "no_teacher": ([], r"checkpoints/teacher\.pt is missing; run again with --stages including squeeze"),
    "bn_less_teacher": ([], r"no BatchNorm2d"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_before_any_work(teacher_run, tmp_path, monkeypatch, capsys, case):
    from pipeline.commands import cli
    from pipeline.run.stages import recover

    overrides, pattern = BAD_INPUTS[case]
    run_dir = clone_run(teacher_run, tmp_path / "bad")
    if case == "no_teacher":
        (run_dir / "checkpoints" / "teacher.pt").unlink()
    if case == "bn_less_teacher":
        monkeypatch.setattr(recover, "run_teacher", _bn_less_teacher)

    with pytest.raises(ConfigError, match=pattern):
        run_pipeline(fast_config(*overrides), run_dir, stages=["recover"], progress=False)
    _no_recover_work(run_dir)

    args = ["run", "--run-dir", str(run_dir), "--stages", "recover", "--no-progress"]
    for o in [*FAST, *overrides]:
        args += ["--set", o]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("distill: error: ") and re.search(pattern, err), err
    _no_recover_work(run_dir)


def test_synthesize_batch_rejects_a_bn_less_module():
    from pipeline.methods.synthesis import RecoverParams, synthesize_batch

    teacher = _bn_less_teacher(None, None)
    before = [p.clone() for p in teacher.parameters()]
    with pytest.raises(ValueError, match="BatchNorm2d"):
        synthesize_batch(teacher, torch.arange(2), torch.zeros(2, 3, 8, 8), RecoverParams(iterations=2),
                         torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))


# ------------------------------------------------------------------------------------------------- resume

def test_driver_killed_mid_stage_then_rerun_runs_only_missing_units(teacher_run, tmp_path):
    run_dir = clone_run(teacher_run, tmp_path / "killed")
    cmd = [sys.executable, "-m", "workers.cli", "run", "--run-dir", str(run_dir), "--stages", "recover",
           "--no-progress"]
    for o in [*FAST, RESUME_ITERS]:
        cmd += ["--set", o]
    sigkill_when(cmd, REPO, lambda: bool(_unit_records(run_dir)), tmp_path / "driver.out", timeout=120)

    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in _unit_records(run_dir)}
    assert 1 <= len(before) < len(UNITS), f"kill came too late to leave work undone: {sorted(before)}"
    assert ManifestStore(run_dir).load("recover", STAGE_RECORD) is None
    done_outputs = {uri: (run_dir / uri).stat().st_mtime_ns
                    for key, outs in _outputs(run_dir).items() for uri, _ in outs}

    run_pipeline(fast_config(RESUME_ITERS), run_dir, stages=["recover"], progress=False)

    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in _unit_records(run_dir)}
    assert sorted(after) == sorted(f"{k}.json" for k in UNITS)
    for name, state in before.items():
        assert after[name] == state, f"record {name} was rewritten by the rerun"
    for uri, mtime in done_outputs.items():
        assert (run_dir / uri).stat().st_mtime_ns == mtime, f"{uri} of a finished unit was rewritten"
    metrics = _stage_metrics(run_dir)
    assert metrics["units"] == len(UNITS) and metrics["ran"] == len(UNITS) - len(before)
    assert ManifestStore(run_dir).failures("recover") == []
    for rec in ManifestStore(run_dir).records("recover"):  # every output on disk is the one its record hashed
        assert [FileRef.of(run_dir / o.uri, run_dir) for o in rec.outputs] == list(rec.outputs)
    src, cls = _synthetic(run_dir)
    assert sorted(cls) == sorted(list(range(NUM_CLASSES)) * IPC)
    assert all(decode_rgb(src.raw(i)).shape == (32, 32, 3) for i in range(len(src)))


# ----------------------------------------------------------------------------------------------------- Ray

@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024 * 1024, log_to_driver=True)
    yield ray
    ray.shutdown()


def _spy(executor, on_first=None) -> dict:
    """Wrap executor.run_units to note the live actors at each outcome and call on_first(executor) once."""
    seen: dict = {"actors": [], "outcomes": []}
    inner = executor.run_units

    def run_units(stage, ctx, units, on_outcome):  # noqa: ANN001, ANN202
        if on_first is not None:
            on_first(executor)

        def note(outcome):  # noqa: ANN001, ANN202
            seen["actors"].append(len(executor.actors))
            seen["outcomes"].append(outcome)
            on_outcome(outcome)

        return inner(stage, ctx, units, note)

    executor.run_units = run_units
    return seen


@pytest.mark.ray
def test_ray_executor_with_two_actors_matches_local(ray_cluster, runs, teacher_run, tmp_path):
    from workers import make_executor
    from workers.ray_executor import RayExecutor

    ray = ray_cluster
    gcs = ray.get_runtime_context().gcs_address
    cfg = fast_config("recover.method=dwa", "executor.kind=ray", "executor.num_workers=2")
    executor = make_executor(cfg)
    assert isinstance(executor, RayExecutor)
    seen = _spy(executor)
    try:
        ray_dir = _recover(teacher_run, tmp_path / "ray", "recover.method=dwa", "executor.kind=ray",
                           "executor.num_workers=2", executor=executor).run_dir
        assert executor.actors == []  # the stage's actors are gone when it ends
    finally:
        executor.close()
    # it joined the test's cluster (and, not owning it, left it running) rather than starting another
    assert ray.is_initialized() and ray.get_runtime_context().gcs_address == gcs
    assert max(seen["actors"]) == 2 and len(seen["outcomes"]) == 4 and all(o.ok for o in seen["outcomes"])
    local = _outputs(runs("dwa", "recover.method=dwa"))
    assert _outputs(ray_dir) == local
    assert _stage_metrics(ray_dir)["ran"] == 4


@pytest.mark.ray
def test_ray_kill_of_an_actor_mid_stage_retries_and_matches_clean_run(ray_cluster, runs, teacher_run, tmp_path):
    from workers.ray_executor import RayExecutor

    ray = ray_cluster
    overrides = ("recover.method=dwa", "executor.kind=ray", "executor.num_workers=2", "executor.max_attempts=2")
    cfg = fast_config(*overrides)
    killed: list[str] = []
    errors: list[BaseException] = []

    def kill_one(executor: RayExecutor) -> None:
        def target() -> None:
            try:
                deadline = time.monotonic() + 120
                while not executor.in_flight():
                    if time.monotonic() > deadline:
                        raise TimeoutError("no unit was ever in flight")
                    time.sleep(0.01)
                # the oldest unit in flight: its fresh actor is still opening its worker (loading the teacher
                # and the real index), so the kill lands inside the unit
                key, actor = next(iter(executor.in_flight().items()))
                killed.append(key)
                ray.kill(actor)
            except BaseException as exc:  # noqa: BLE001 - reported by the test below
                errors.append(exc)

        threading.Thread(target=target, daemon=True).start()

    executor = RayExecutor(cfg)
    seen = _spy(executor, on_first=kill_one)
    try:
        run_dir = _recover(teacher_run, tmp_path / "kill", *overrides, executor=executor).run_dir
        assert executor.actors == []
    finally:
        executor.close()
    assert not errors and len(killed) == 1
    store = ManifestStore(run_dir)
    records = {r.unit: r for r in store.records("recover")}
    assert sorted(records) == UNITS and store.failures("recover") == []
    assert records[killed[0]].attempt == 2, {k: r.attempt for k, r in records.items()}
    assert all(r.attempt == 1 for k, r in records.items() if k != killed[0])
    assert len(seen["outcomes"]) == 4  # one outcome per unit: the lost attempt was retried, not reported
    assert _stage_metrics(run_dir)["ran"] == 4
    # the retried unit's bytes equal an uninterrupted local run's
    assert _outputs(run_dir) == _outputs(runs("dwa", "recover.method=dwa"))


# ------------------------------------------------------------------------------------------ recover.compile


@pytest.mark.slow
def test_compile_on_is_recorded_and_a_failed_compile_under_auto_gives_the_eager_bytes(runs, teacher_run, tmp_path,
                                                                                      monkeypatch, caplog):
    """recover.compile=on runs the compiled objective (recorded per unit); under auto, a unit big enough to compile
    whose compile fails logs it once and gives exactly the bytes of compile=off (the batch is redone from the
    same generator state)."""
    on = _recover(teacher_run, tmp_path / "on", "recover.compile=on").run_dir
    assert all(r.metrics["compiled"] is True for r in ManifestStore(on).records("recover"))
    off = runs("dwa-off", "recover.compile=off")
    assert not any(r.metrics["compiled"] for r in ManifestStore(off).records("recover"))

    import pipeline.methods.sre2l as sre2l

    def broken(fn, **_):
        def call(*args, **kwargs):
            raise RuntimeError("no C++ compiler (test)")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(sre2l, "AUTO_COMPILE_MIN", 1)  # the FAST units (4 iterations) qualify for auto
    with caplog.at_level("WARNING"):
        auto = _recover(teacher_run, tmp_path / "auto", "recover.compile=auto").run_dir
    assert "torch.compile failed (RuntimeError: no C++ compiler (test)); running eagerly" in caplog.text
    assert _outputs(auto) == _outputs(off)
    assert not any(r.metrics["compiled"] for r in ManifestStore(auto).records("recover"))


# ------------------------------------------------------------------------------ recover.batches_per_forward


@pytest.mark.slow
def test_sre2l_batches_sharing_a_forward_match_one_batch_per_forward_and_halve_when_memory_runs_out(
        teacher_run, tmp_path, monkeypatch, caplog):
    """recover.batches_per_forward=2 optimizes a unit's two IPC batches in one teacher forward, each with its own CE
    and BN statistics and the draws it has alone: the pixels match one batch per forward (to one level of 255,
    float rounding) and repeat to the same bytes. A merged forward that runs out of memory is halved and redone,
    which gives exactly the bytes of one batch per forward (nothing is drawn again). (Repeatability: the merged
    path is `synthesize_batch(draws=...)`, whose bytes repeat like every recover call's.)"""
    common = ("recover.method=sre2l", "recover.ipc=2", "recover.ipc_per_unit=2", "recover.sre2l.iterations=6")
    one = _recover(teacher_run, tmp_path / "one", *common).run_dir  # auto on a CPU: one batch per forward
    two = _recover(teacher_run, tmp_path / "two", *common, "recover.batches_per_forward=2").run_dir
    assert {r.metrics["batches_per_forward"] for r in ManifestStore(two).records("recover")} == {2}
    assert {r.metrics["batches_per_forward"] for r in ManifestStore(one).records("recover")} == {1}
    (a, ca), (b, cb) = _synthetic(one), _synthetic(two)
    assert ca == cb and len(ca) == 10 * 2
    diffs = [np.abs(decode_rgb(a.raw(i)).astype(int) - decode_rgb(b.raw(i)).astype(int)).max() for i in range(len(ca))]
    assert max(diffs) <= 1, diffs
    # Each batch's loss summary is read from its own column of the merged loss curves.
    x_units, y_units = ({r.unit: {k: v for k, v in r.metrics.items() if k.startswith("loss_")}
                         for r in ManifestStore(d).records("recover")} for d in (one, two))
    assert x_units.keys() == y_units.keys() and x_units
    for key, x in x_units.items():
        y = y_units[key]
        assert x.keys() == y.keys() and {"loss_ce", "loss_ce_first", "loss_bn"} <= x.keys(), x.keys()
        assert all(y[k] == pytest.approx(x[k], rel=1e-3, abs=1e-5) for k in x), (x, y)

    import pipeline.methods.synthesis as synthesis

    real = synthesis.synthesize_batch

    def small_memory(*args, draws=None, **kwargs):
        if draws is not None and len(draws) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return real(*args, draws=draws, **kwargs)

    monkeypatch.setattr(synthesis, "synthesize_batch", small_memory)
    with caplog.at_level("WARNING"):
        halved = _recover(teacher_run, tmp_path / "halved", *common, "recover.batches_per_forward=2").run_dir
    assert "2 batches in one forward ran out of GPU memory; going on with 1" in caplog.text
    assert _outputs(halved) == _outputs(one)
    assert {r.metrics["batches_per_forward"] for r in ManifestStore(halved).records("recover")} == {1}


def test_batches_per_forward_auto_merges_on_a_gpu_only_and_never_for_dwa():
    from pipeline.methods.sre2l import AUTO_FORWARD_IMAGES, forward_groups

    assert forward_groups(0, "cpu", 100, 10, dwa=False) == 1  # auto on a CPU: it does not pay there
    assert forward_groups(0, "cuda", 100, 10, dwa=False) == AUTO_FORWARD_IMAGES // 100 == 10
    assert forward_groups(0, "cuda", 100, 4, dwa=False) == 4  # no more than the unit's batches
    assert forward_groups(0, "cuda", 2000, 10, dwa=False) == 1  # a batch above the cap stays alone
    assert forward_groups(3, "cpu", 10, 10, dwa=False) == 3  # an explicit count applies on any device
    assert forward_groups(3, "cuda", 100, 10, dwa=True) == forward_groups(0, "cuda", 100, 10, dwa=True) == 1
