"""What the plug-in contract offers a method beyond images, and what the run machinery derives from it:

artifacts named in `Needs` (handed over by `RecoverEnv.artifact`, turned into the recover stage's dependencies),
every class in one unit, label vectors and per-set values stored and verified with the set, the public teacher
forward and uncropped real images, the init kinds derived from the registry, and a stage added by registering it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from manifests.store import ManifestStore
from pipeline.config import ConfigError
from pipeline.data.synthetic import read_set_labels, set_values
from pipeline.methods import base
from pipeline.methods.base import MethodOutput, Needs
from pipeline.run import graph
from pipeline.run.base import Stage, Unit, UnitResult
from pipeline.run.runner import compute_hashes, run_pipeline
from tests.helpers import clone_run, fast_config


class _LabelWorker:
    """A toy method: the first real image of each class, labelled with the teacher's softmax on it."""

    def __init__(self, env, cfg):  # noqa: ANN001 - the plug-in protocol's arguments
        self.env = env
        self.sizes: list[tuple[int, int]] = []

    def run(self, classes, ipc, gen, unit_key):  # noqa: ANN001, ANN201
        env, pool = self.env, self.env.require_real()
        assert env.artifact("teacher") is env.teacher
        out = MethodOutput(metrics={"image_iterations": 0}, values={"lr": 0.5, "classes": len(classes)})
        for j in ipc:
            rows = [pool.rows(c)[j] for c in classes]
            self.sizes += [a.shape[:2] for a in pool.decoded(rows)]
            x = pool.batch(rows)
            probs = env.teacher_logits(x, batch=3).softmax(1)
            img = (x * torch.tensor(env.std).view(1, 3, 1, 1) + torch.tensor(env.mean).view(1, 3, 1, 1)).clamp(0, 1)
            out.add(img, classes, [j] * len(classes), labels=probs)
        return out


def _register(monkeypatch, name: str, needs: Needs, **flags) -> None:
    monkeypatch.setitem(base._REGISTRY, name, base.Method(name=name, description="toy", needs=needs,
                                                          open=_LabelWorker, default_init="real",
                                                          synthesizes=False, **flags))


def test_labels_values_and_one_unit_of_every_class_are_stored_and_verified(teacher_run, tmp_path, monkeypatch):
    _register(monkeypatch, "toy-labels", Needs(teacher=True, real_images=True), whole_class=True, all_classes=True)
    run_dir = clone_run(teacher_run, tmp_path / "run")
    cfg = fast_config("recover.method=toy-labels")  # FAST has recover.classes_per_shard=5: not used here
    ctx = run_pipeline(cfg, run_dir, stages=["recover"], progress=False)
    records = ManifestStore(run_dir).records("recover")
    assert [r.unit for r in records] == ["c0000-0009_ipc000-001"]  # one unit: all 10 classes, all IPC
    assert records[0].metrics["set_values"] == {"lr": 0.5, "classes": 10}
    assert set_values(records) == {"lr": 0.5, "classes": 10}
    labels = read_set_labels(run_dir, records)
    assert labels.shape == (20, 10) and labels.dtype == torch.float32
    torch.testing.assert_close(labels.sum(1), torch.ones(20))
    # the labels are the teacher's softmax on each stored image's real source, in image-id order
    from pipeline.run.stages.recover import open_env

    env = open_env(ctx, torch.device("cpu"))
    rows = [env.real.rows(c)[j] for j in range(2) for c in range(10)]
    expected = env.teacher_logits(env.real.batch(rows)).softmax(1)
    from pipeline.data.synthetic import synthetic_index

    keys = synthetic_index(run_dir, records).column("key").to_pylist()
    assert keys == [f"c{c:04d}_i{j:04d}" for j in range(2) for c in range(10)]  # the method's order, rows aligned
    torch.testing.assert_close(labels, expected)
    # the labels file is an output of the unit's record: a changed one is found and the unit runs again
    out = [o for o in records[0].outputs if o.uri.endswith(".labels.npy")]
    assert len(out) == 1 and out[0].sha256
    path = run_dir / out[0].uri
    arr = np.load(path)
    arr[0, 0] += 1.0
    np.save(path, arr)
    run_pipeline(cfg, run_dir, stages=["recover"], progress=False)
    again = ManifestStore(run_dir).records("recover")
    assert again[0].ended > records[0].ended  # recomputed
    torch.testing.assert_close(read_set_labels(run_dir, again), labels)


def test_teacher_logits_and_uncropped_images(teacher_run, tmp_path, monkeypatch):
    from pipeline.run.runner import open_context
    from pipeline.run.stages.recover import open_env

    _register(monkeypatch, "toy-labels", Needs(teacher=True, real_images=True))
    ctx = open_context(fast_config("recover.method=toy-labels"), clone_run(teacher_run, tmp_path / "run"))
    env = open_env(ctx, torch.device("cpu"))
    rows = env.real.rows(3)[:7]
    x = env.real.batch(rows)
    env.teacher.train()
    chunked = env.teacher_logits(x, batch=2)
    assert env.teacher.training  # its mode is restored
    env.teacher.eval()
    with torch.no_grad():
        whole = env.teacher(x).float()
    torch.testing.assert_close(chunked, whole)
    assert chunked.shape == (7, 10)
    arrays = env.real.decoded(rows)
    assert all(a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3 for a in arrays)
    with pytest.raises(RuntimeError, match="did not declare it"):
        env.artifact("trajectories")


def test_an_artifact_no_stage_makes_is_refused_naming_it(teacher_run, tmp_path, monkeypatch):
    _register(monkeypatch, "toy-needs", Needs(real_images=True, artifacts=("trajectories-v9",)))
    with pytest.raises(ConfigError, match="'trajectories-v9', which no stage makes"):
        run_pipeline(fast_config("recover.method=toy-needs"), clone_run(teacher_run, tmp_path / "run"),
                     stages=["recover"], progress=False)


def test_recover_depends_on_the_teacher_only_when_its_method_or_init_uses_it(tmp_path):
    def hashes(*sets: str) -> dict[str, str]:
        return compute_hashes(fast_config(*sets))

    for method, uses_teacher in (("dm", False), ("random-real", False), ("dwa", True), ("herding", True)):
        a, b = hashes(f"recover.method={method}"), hashes(f"recover.method={method}", "squeeze.epochs=3")
        assert a["squeeze"] != b["squeeze"]
        assert (a["recover"] != b["recover"]) is uses_teacher, method
        c = hashes(f"recover.method={method}", "data.resolution=28")  # the data always counts
        assert a["recover"] != c["recover"]
    # the init counts too: DM started from the teacher's correctly classified images depends on the teacher
    a = hashes("recover.method=dm", "recover.init=real-correct")
    b = hashes("recover.method=dm", "recover.init=real-correct", "squeeze.epochs=3")
    assert a["recover"] != b["recover"]
    # ... and relabel, which reads the teacher, always does
    a, b = hashes("recover.method=dm"), hashes("recover.method=dm", "squeeze.epochs=3")
    assert a["relabel"] != b["relabel"]


def test_a_recover_that_needs_no_teacher_runs_before_any_teacher_exists(tmp_path):
    cfg = fast_config("recover.method=random-real")
    run_dir = tmp_path / "run"
    run_pipeline(cfg, run_dir, stages=["ingest"], progress=False)
    run_pipeline(cfg, run_dir, stages=["recover"], progress=False)  # squeeze never ran
    assert len(ManifestStore(run_dir).records("recover")) == 4
    assert not (run_dir / "checkpoints" / "teacher.pt").exists()
    with pytest.raises(ConfigError, match="needs stage 'squeeze'"):
        run_pipeline(fast_config("recover.method=dwa"), tmp_path / "run2", stages=["ingest", "recover"],
                     progress=False)


def test_init_kinds_come_from_the_registry(monkeypatch):
    from pipeline.methods import init_artifacts, init_kinds

    assert {"real", "real-correct", "real-herding", "real-k-center", "real-forgetting", "real-loss-score"} == set(
        init_kinds())
    assert init_artifacts("real-forgetting") == ("sample-stats",) and init_artifacts("real-herding") == ("teacher",)
    with pytest.raises(ConfigError, match="real-toy-pick"):
        fast_config("recover.init=real-toy-pick")
    _register(monkeypatch, "toy-pick", Needs(real_images=True), selection="greedy")
    assert "real-toy-pick" in init_kinds()
    assert fast_config("recover.init=real-toy-pick").recover.init == "real-toy-pick"


class _Noted(Stage):
    """A stage added by registering it: one unit that writes a note, after ingest."""

    name = "noted"
    depends_on = ("ingest",)
    sections = ("seed",)

    def plan(self, ctx):  # noqa: ANN001, ANN201
        return [Unit("note")]

    def open_worker(self, ctx):  # noqa: ANN001, ANN201
        class Worker:
            def run(self, unit: Unit) -> UnitResult:
                path = ctx.path("notes", "note.txt")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("hello")
                return UnitResult(outputs=[ctx.ref(path)])

            def close(self) -> None:
                pass

        return Worker()


def test_a_stage_added_by_registering_it_joins_the_order_hashes_and_run(tmp_path, monkeypatch):
    monkeypatch.setattr(graph, "_REGISTRY", dict(graph._REGISTRY))
    monkeypatch.setattr(graph, "_GRAPH", [])
    before = graph.stage_order()
    graph.register_stage(_Noted())
    order = graph.stage_order()
    assert set(order) == {*before, "noted"} and order.index("noted") > order.index("ingest")
    with pytest.raises(ValueError, match="registered twice"):
        graph.register_stage(_Noted())
    cfg = fast_config()
    assert "noted" in compute_hashes(cfg)
    run_pipeline(cfg, tmp_path / "run", stages=["ingest", "noted"], progress=False)
    assert (tmp_path / "run" / "notes" / "note.txt").read_text() == "hello"
    assert ManifestStore(tmp_path / "run").stage_done("noted", compute_hashes(cfg)["noted"])
