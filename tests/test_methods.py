"""The recover-method plug-in registry: built-in methods, `distill methods`, and a method added by one file."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from manifests.store import ManifestStore
from pipeline.commands.cli import main
from pipeline.methods import base, get_method, registry
from pipeline.methods.base import MethodOutput, Needs, doc_field
from pipeline.run.runner import run_pipeline
from tests.helpers import clone_run, fast_config, sigkill_when


def test_builtin_methods_declare_needs_configs_and_inits():
    methods = registry()
    assert {"sre2l", "dwa", "random-real"} <= set(methods)
    assert methods["sre2l"].needs.bn_teacher and not methods["sre2l"].needs.real_images
    assert methods["dwa"].needs.bn_teacher and methods["dwa"].needs.real_images
    assert not methods["random-real"].needs.teacher and not methods["random-real"].synthesizes
    assert (methods["sre2l"].default_init, methods["dwa"].default_init) == ("noise", "real")
    keys = {k for k, _, _ in methods["dwa"].config_fields()}
    assert {"iterations", "steps", "rho", "batch_size"} <= keys
    assert all(doc for _, _, doc in methods["dwa"].config_fields())
    with pytest.raises(ValueError, match="did you mean 'dwa'"):
        get_method("dwq")


def test_distill_methods_lists_every_method_with_its_keys(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("sre2l", "dwa", "random-real"):
        assert f"{name}: " in out
    assert "recover.dwa.*" in out and "steps = 12" in out and "rho = 0.015" in out
    assert "import: " in out and "recover.import_set.*" in out  # a keyword as a name: its section is import_set
    assert main(["methods", "nope"]) == 2


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        base.register("sre2l", description="again")(lambda env, cfg: None)


@dataclass
class _MeanConfig:
    scale: float = doc_field(1.0, "multiplier of the class mean")


class _MeanWorker:
    """A toy method: every image of a class is its real images' mean (made together: whole_class)."""

    def __init__(self, env, cfg):  # noqa: ANN001 - the plug-in protocol's arguments
        self.env, self.cfg = env, cfg

    def run(self, classes, ipc, gen, unit_key):  # noqa: ANN001, ANN201
        pool = self.env.require_real()
        out = MethodOutput(images=[], classes=[], ipc_index=[], metrics={"toy": 1})
        for c in classes:
            x = pool.batch(pool.rows(c)[:4])
            img = (x * torch.tensor(self.env.std).view(1, 3, 1, 1) + torch.tensor(self.env.mean).view(1, 3, 1, 1))
            mean = (img.mean(0) * (self.cfg.scale if self.cfg else 1.0)).clamp(0, 1)
            for j in ipc:
                out.images.append(mean)
                out.classes.append(c)
                out.ipc_index.append(j)
        return out


def test_a_method_added_by_one_registration_runs_through_the_recover_stage(teacher_run, tmp_path, monkeypatch):
    # What a new method file does: register its open() with a name, needs and flags. (A method registered
    # before `pipeline.config` is imported also gets its `recover.<name>.*` section; this one has none.)
    monkeypatch.setitem(base._REGISTRY, "toy-mean", base.Method(
        name="toy-mean", description="toy", needs=Needs(real_images=True), open=_MeanWorker, whole_class=True,
        default_init="real", synthesizes=False))
    run_dir = clone_run(teacher_run, tmp_path / "run")
    run_pipeline(fast_config("recover.method=toy-mean"), run_dir, stages=["recover"], progress=False)
    records = ManifestStore(run_dir).records("recover")
    # whole_class: units split classes only (IPC 2 in one unit), 2 shards of 5 classes.
    assert sorted(r.unit for r in records) == ["c0000-0004_ipc000-001", "c0005-0009_ipc000-001"]
    assert all(r.metrics["toy"] == 1 and r.metrics["images"] == 10 and "images_per_s" in r.metrics for r in records)
    assert (run_dir / "results" / "grids" / "overview.png").is_file()


@pytest.mark.parametrize("method, init", [("sre2l", "real-correct"), ("sre2l", "real-herding"),
                                          ("dm", "real-correct")])
def test_synthesis_can_start_from_selected_real_images(teacher_run, tmp_path, method, init):
    """`recover.init` takes the teacher-chosen real images (PAD's correctly-classified init, or a selection)."""
    run_dir = clone_run(teacher_run, tmp_path / "run")
    short = (["recover.sre2l.iterations=1", "recover.sre2l.lr=1e-9"] if method == "sre2l"  # output ~ the init
             else ["recover.dm.iterations=1", "recover.dm.width=16", "recover.dm.batch_real=8"])
    cfg = fast_config(f"recover.method={method}", f"recover.init={init}", *short)
    ctx = run_pipeline(cfg, run_dir, stages=["recover"], progress=False)
    from pipeline.run.stages.recover import open_env

    env = open_env(ctx, torch.device("cpu"))
    records = {r.unit: r for r in ManifestStore(run_dir).records("recover")}
    assert records  # every unit ran
    for c in range(5):
        row = env.init_rows(init, range(c, c + 1), 0)[0]
        if init == "real-correct":
            assert row in env.correct_rows(c)
        assert env.real.label(row) == c


def test_unknown_init_is_refused_with_the_choices():
    from pipeline.commands.recipes import load_config
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="real-correct"):
        load_config("demo", overrides=["recover.init=real-best"])


@pytest.mark.parametrize("method", ["dm", "dc", "dsa", "datadam"])
def test_matching_methods_run_through_the_recover_stage(teacher_run, tmp_path, method):
    """Each matching method as a plug-in: whole-class units, IPC images per class, same bytes twice."""
    short = [f"recover.method={method}", f"recover.{method}.iterations=2", f"recover.{method}.width=16",
             f"recover.{method}.batch_real=8"]
    if method in ("dc", "dsa"):
        short += [f"recover.{method}.outer_loop=1", f"recover.{method}.inner_loop=1"]
    runs = []
    for name in ("a", "b"):
        run_dir = clone_run(teacher_run, tmp_path / name)
        run_pipeline(fast_config(*short), run_dir, stages=["recover"], progress=False)
        runs.append({r.unit: r for r in ManifestStore(run_dir).records("recover")})
    a, b = runs
    assert sorted(a) == ["c0000-0004_ipc000-001", "c0005-0009_ipc000-001"]  # units split classes, not IPC
    for key, rec in a.items():
        assert rec.metrics["images"] == 5 * 2 and rec.metrics["image_iterations"] > 0
        assert [(o.uri, o.sha256) for o in rec.outputs] == [(o.uri, o.sha256) for o in b[key].outputs]


TINY = {"dm": ["recover.dm.iterations=2", "recover.dm.width=16", "recover.dm.batch_real=8"],
        "datadam": ["recover.datadam.iterations=2", "recover.datadam.width=16", "recover.datadam.batch_real=8"],
        "dc": ["recover.dc.iterations=1", "recover.dc.width=16", "recover.dc.batch_real=8"],
        "dsa": ["recover.dsa.iterations=1", "recover.dsa.width=16", "recover.dsa.batch_real=8"]}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["random-real", "herding", "k-center", "forgetting", "loss-score", "dm", "dc",
                                    "dsa", "datadam"])
def test_every_method_runs_end_to_end_to_a_summary(teacher_run, tmp_path, method):
    """recover -> relabel -> train -> evaluate for each method (the SRe2L / DWA runs are tested elsewhere); the
    matching methods under the hard protocol, as they are published, the others under kd."""
    import json

    protocol = "hard" if method in TINY else "kd"
    sets = [f"recover.method={method}", f"train.protocol={protocol}", "train.hard_epochs=3", *TINY.get(method, [])]
    run_dir = clone_run(teacher_run, tmp_path / "run")
    run_pipeline(fast_config(*sets), run_dir, progress=False)
    summary = json.loads((run_dir / "results" / "summary.json").read_text())
    assert summary["method"] == method and summary["protocol"]["name"] == protocol
    assert summary["num_images"] == 10 * 2 and 0.0 <= summary["top1"] <= 100.0
    assert bool(ManifestStore(run_dir).records("relabel")) == (protocol == "kd")


@pytest.mark.slow
def test_a_matching_unit_killed_mid_stage_resumes_from_its_checkpoint_to_the_same_bytes(teacher_run, tmp_path):
    """DM units (whole class shards) after a SIGKILL of the driver inside the second unit: the finished unit is
    kept, the killed one resumes from its last checkpoint (saved after every iteration here), and every output
    equals a clean run's; the checkpoint is gone once the unit is done."""
    import sys
    from pathlib import Path

    from pipeline.run.stages.recover import UNIT_STATE_DIR
    from tests.helpers import FAST

    sets = ["recover.method=dm", "recover.dm.iterations=40", "recover.dm.width=16", "recover.dm.batch_real=8"]
    clean = clone_run(teacher_run, tmp_path / "clean")
    run_pipeline(fast_config(*sets), clean, stages=["recover"], progress=False)
    run_dir = clone_run(teacher_run, tmp_path / "killed")
    cmd = [sys.executable, "-m", "workers.cli", "run", "--run-dir", str(run_dir), "--stages", "recover", "--no-progress"]
    for o in [*FAST, *sets, "recover.checkpoint_every_s=0"]:
        cmd += ["--set", o]
    units, partial = run_dir / "manifests" / "recover", run_dir / UNIT_STATE_DIR
    sigkill_when(cmd, Path(__file__).resolve().parents[1],
                 lambda: bool(list(units.glob("c*.json"))) and bool(list(partial.glob("*.pt"))))
    assert len(list(units.glob("c*.json"))) == 1, "the kill came too late to leave a unit undone"
    (saved,) = partial.glob("*.pt")
    state = torch.load(saved, weights_only=True)
    at, before = state["it"], state["seconds"]
    run_pipeline(fast_config(*sets), run_dir, stages=["recover"], progress=False)
    recs = ManifestStore(run_dir).records("recover")
    got = {r.unit: [(o.uri, o.sha256) for o in r.outputs] for r in recs}
    want = {r.unit: [(o.uri, o.sha256) for o in r.outputs] for r in ManifestStore(clean).records("recover")}
    assert got == want and len(got) == 2
    (rec,) = [r for r in recs if r.unit == saved.stem]
    assert rec.metrics.get("resumed_at_iteration", 0) >= at >= 1
    # the record's seconds cover the killed run's work up to its checkpoint too, so its rates stay per unit: more
    # than this run's own wall time (which, without them, bounds them from above)
    assert rec.metrics["seconds"] > rec.metrics["wall_s"] and rec.metrics["seconds"] >= before > 0
    assert not list(partial.glob("*")), "a finished unit leaves no checkpoint behind"
