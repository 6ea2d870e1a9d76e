"""Configuration loading: recipes, YAML files, overrides, and the errors users see."""

from __future__ import annotations

import json

import pytest

from pipeline.commands.cli import main
from pipeline.commands.recipes import load_config
from pipeline.config import ConfigError
from pipeline.run.runner import compute_hashes


def test_recipe_and_overrides_are_typed():
    cfg = load_config("demo", overrides=["recover.ipc=3", "train.lr=0.002", "seed=7", "recover.method=sre2l"])
    assert cfg.recover.ipc == 3 and cfg.train.lr == 0.002 and cfg.seed == 7 and cfg.recover.method == "sre2l"
    cfg = load_config("demo", overrides=["train.lr=1"])  # an int where a float is expected is accepted
    assert isinstance(cfg.train.lr, float)


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match=r"recover\.ipcc.*did you mean 'ipc'"):
        load_config("demo", overrides=["recover.ipcc=3"])
    with pytest.raises(ConfigError, match=r"unknown config section 'recovr'.*'recover'"):
        load_config("demo", overrides=["recovr.ipc=3"])


def test_wrong_type_names_key_and_type():
    with pytest.raises(ConfigError, match=r"'recover\.ipc': expected int, got 'ten'"):
        load_config("demo", overrides=["recover.ipc=ten"])
    with pytest.raises(ConfigError, match=r"'recover\.method': unknown method 'foo'.*distill methods"):
        load_config("demo", overrides=["recover.method=foo"])
    with pytest.raises(ConfigError, match=r"recover\.ipc' must be > 0"):
        load_config("demo", overrides=["recover.ipc=0"])


def test_yaml_file_with_base_recipe(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("recipe: demo\nseed: 3\nrecover:\n  ipc: 2\n")
    cfg = load_config(config_file=str(path), overrides=["recover.ipc=4"])
    assert cfg.seed == 3 and cfg.recover.ipc == 4 and cfg.data.dataset == "digits"
    path.write_text("recover:\n  ipc: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"recover\.ipc"):
        load_config(config_file=str(path))


def test_unknown_recipe():
    with pytest.raises(ConfigError, match="unknown recipe 'dem'.*'demo'"):
        load_config("dem")


def test_hashes_chain_downstream_only():
    base = compute_hashes(load_config("demo"))
    changed = compute_hashes(load_config("demo", overrides=["recover.dwa.iterations=7"]))
    assert changed["ingest"] == base["ingest"] and changed["squeeze"] == base["squeeze"]
    for stage in ("recover", "relabel", "train", "evaluate"):
        assert changed[stage] != base[stage]
    # operational keys do not invalidate anything
    assert compute_hashes(load_config("demo", overrides=["executor.num_workers=5", "data.loader=pil"])) == base


def test_cli_exit_code_2_on_bad_config(tmp_path, capsys):
    assert main(["run", "--run-dir", str(tmp_path / "r"), "--set", "train.epochs=-1"]) == 2
    assert "train.epochs" in capsys.readouterr().err
    assert main(["run", "--run-dir", str(tmp_path / "r"), "--data-dir", str(tmp_path / "nope"),
                 "--stages", "ingest"]) == 2


def test_config_json_written(tmp_path):
    assert main(["run", "--run-dir", str(tmp_path / "r"), "--stages", "ingest", "--no-progress",
                 "--set", "data.shard_size=600"]) == 0
    data = json.loads((tmp_path / "r" / "config.json").read_text())
    assert data["data"]["shard_size"] == 600 and data["run_id"]


def test_global_batch_must_split_evenly_over_ranks():
    with pytest.raises(ConfigError, match=r"'train\.batch_size' \(10\) must be a multiple of 'train\.workers' \(4\)"):
        load_config("demo", overrides=["train.batch_size=10", "train.workers=4"])
    assert load_config("demo", overrides=["train.batch_size=12", "train.workers=4"]).train.workers == 4


def test_status_reports_done_pending_and_changed(tmp_path, capsys):
    run = str(tmp_path / "r")
    assert main(["run", "--run-dir", run, "--stages", "ingest", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["status", "--run-dir", run]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()[1:]}
    assert lines["ingest"].split()[1:4] == ["8", "0", "0"] and "complete" in lines["ingest"]
    assert "not started" in lines["recover"]
    # a changed configuration is refused, naming the stage, and --fresh recomputes it
    assert main(["run", "--run-dir", run, "--stages", "ingest", "--no-progress", "--set", "data.shard_size=300"]) == 2
    assert "stage(s) ingest" in capsys.readouterr().err
    assert main(["run", "--run-dir", run, "--stages", "ingest", "--no-progress", "--set", "data.shard_size=300",
                 "--fresh"]) == 0
    assert main(["status", "--run-dir", run]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()[1:]}
    assert lines["ingest"].split()[1:4] == ["7", "0", "0"]  # 1437/300 -> 5 train + 360/300 -> 2 val shards
    assert main(["status", "--run-dir", str(tmp_path / "nope")]) == 2


def test_normalization_is_per_data_set_and_hashed_from_the_teacher_on():
    cifar = ["data.mean=[0.4914, 0.4822, 0.4465]", "data.std=[0.2023, 0.1994, 0.2010]"]
    cfg = load_config("demo", overrides=cifar)
    assert cfg.data.mean == [0.4914, 0.4822, 0.4465] and cfg.data.std == [0.2023, 0.1994, 0.2010]
    default = load_config("demo")
    assert default.data.mean == [0.485, 0.456, 0.406]  # ImageNet's, as torchvision's teachers expect
    a, b = compute_hashes(default), compute_hashes(cfg)
    assert a["ingest"] == b["ingest"]  # ingest stores raw images: a new normalization never re-ingests
    assert all(a[s] != b[s] for s in ("squeeze", "recover", "relabel", "train", "evaluate"))
    with pytest.raises(ConfigError, match=r"data\.std' must be > 0"):
        load_config("demo", overrides=["data.std=[0.2, 0, 0.2]"])
    with pytest.raises(ConfigError, match=r"data\.mean' must be 3 finite numbers"):
        load_config("demo", overrides=["data.mean=[0.5, 0.5]"])
    with pytest.raises(ConfigError, match=r"data\.mean\[1\]': expected float"):
        load_config("demo", overrides=["data.mean=[0.5, x, 0.5]"])


def test_every_recipe_loads_and_official_ones_name_their_differences(capsys):
    from pipeline.commands.recipes import RECIPES, recipe_differences

    for name in RECIPES:
        cfg = load_config(name)
        if name != "demo":
            assert recipe_differences(name), name
        if cfg.recover.method == "rded":  # RDED's scripts and validation/main.py, on every data set
            r, t = cfg.recover.rded, cfg.train
            assert (r.candidates, r.crops, r.factor) == (300, 5, 2 if name.startswith("imagenet") else 1), name
            assert cfg.relabel.mode == "online" and cfg.data.mean == [0.485, 0.456, 0.406]
            assert (t.epochs, t.temperature, t.loss_t2, t.mix, t.crop_scale_min) == (300, 20.0, False, "cutmix",
                                                                                     1 / r.factor)
            continue
        if name.startswith("cifar"):  # SRe2L's and DWA's CIFAR code
            m = getattr(cfg.recover, cfg.recover.method)
            assert not m.crop and not m.flip  # the official CIFAR recover only rolls
            assert cfg.squeeze.epochs == 200 and cfg.train.epochs == 400 and cfg.train.temperature == 30.0
        if name.startswith("tiny"):  # SRe2L's Tiny-ImageNet trainer (DWA and CDA use its teachers too)
            assert cfg.data.mean == [0.4802, 0.4481, 0.3975] and cfg.train.loss_t2
        if name.endswith("-cda"):  # CDA/README.md: cosine, milestone 1, 4000 iterations, batches of 100 classes
            s = cfg.recover.sre2l
            assert (cfg.recover.method, s.crop_schedule, s.cda_mode, s.cda_milestone) == ("sre2l", "cda", "cosine", 1)
            assert s.iterations == 4000 and cfg.recover.classes_per_shard == 100 and s.crop_scale_min == 0.08
    assert load_config("tiny-imagenet-rn18-ipc50-sre2l").recover.sre2l.r_bn == 1.0  # SRe2L's Tiny recover script
    assert load_config("tiny-imagenet-rn18-ipc50-dwa").recover.classes_per_shard == 200
    assert load_config("cifar100-rn18-ipc10-dwa").data.mean == [0.5071, 0.4867, 0.4408]
    assert load_config("cifar100-rn18-ipc10-sre2l").data.mean == [0.4914, 0.4822, 0.4465]  # SRe2L's own choice
    # RDED's argument.py: batch 50 at IPC 10 / 100 at IPC 50, doubled for 100 and 1000 classes; Tiny-ImageNet 100
    batches = {n: load_config(n).train.batch_size for n in RECIPES if n.endswith("-rded")}
    assert batches == {"imagenet1k-rn18-ipc10-rded": 100, "imagenet1k-rn18-ipc50-rded": 200,
                       "tiny-imagenet-rn18-ipc10-rded": 100, "tiny-imagenet-rn18-ipc50-rded": 100,
                       "cifar100-rn18-ipc10-rded": 100, "cifar10-rn18-ipc10-rded": 50}
    tiny_cda = load_config("tiny-imagenet-rn18-ipc50-cda").recover.sre2l  # recover_cda_tiny.py via its README
    assert (tiny_cda.lr, tiny_cda.r_bn, tiny_cda.jitter) == (0.4, 0.05, 4)
    assert load_config("imagenet1k-rn18-ipc50-cda").recover.sre2l.lr == 0.25
    assert main(["recipes", "cifar10-rn18-ipc10-dwa"]) == 0
    out = capsys.readouterr().out
    assert "Differences from the official code:" in out and "CIFAR-10" in out
    assert main(["recipes", "cifar10-rn18-ipc10-dwaa"]) == 2


def test_any_torchvision_model_name_is_accepted_and_a_typo_is_named():
    cfg = load_config("demo", overrides=["train.arch=mobilenet_v3_small", "squeeze.arch=convnet-in"])
    assert cfg.train.arch == "mobilenet_v3_small"
    with pytest.raises(ConfigError, match=r"train\.arch.*resnet81.*resnet18"):
        load_config("demo", overrides=["train.arch=resnet81"])


def test_method_sections_are_nested_typed_and_hashed_only_when_chosen(caplog):
    cfg = load_config("demo", overrides=["recover.dwa.steps=15", "recover.sre2l.iterations=9"])
    assert cfg.recover.dwa.steps == 15 and cfg.recover.sre2l.iterations == 9
    base = compute_hashes(load_config("demo"))
    # The demo runs DWA: SRe2L's own section does not touch its hashes; DWA's does.
    assert compute_hashes(load_config("demo", overrides=["recover.sre2l.iterations=9"]))["recover"] == base["recover"]
    assert compute_hashes(load_config("demo", overrides=["recover.dwa.steps=15"]))["recover"] != base["recover"]
    with pytest.raises(ConfigError, match=r"recover\.dwa\.stepz.*did you mean 'steps'"):
        load_config("demo", overrides=["recover.dwa.stepz=3"])
    with pytest.raises(ConfigError, match=r"'recover\.dwa' is a section"):
        load_config("demo", overrides=["recover.dwa=3"])
    with pytest.raises(ConfigError, match=r"recover\.dwa.*steps must be > 0"):
        load_config("demo", overrides=["recover.dwa.steps=0"])
    # Keys of earlier versions still load, with a warning naming the new place.
    old = load_config("demo", overrides=["recover.iterations=7", "recover.dwa_steps=5", "ray.executor=local",
                                         "recover.max_attempts=4"])
    assert old.recover.dwa.iterations == 7 and old.recover.sre2l.iterations == 7 and old.recover.dwa.steps == 5
    assert old.executor.kind == "local" and old.executor.max_attempts == 4
    assert "is now" in caplog.text


def test_help_documents_every_key():
    from pipeline.config import describe

    lines = describe().splitlines()
    assert any(line.startswith("recover.dwa.rho: float = 0.015  # ") for line in lines)
    assert all("  # " in line for line in lines), [line for line in lines if "  # " not in line]


@pytest.mark.parametrize("override, message", [
    ("train.temperature=0", r"'train\.temperature' must be > 0"),
    ("train.lr=.nan", r"'train\.lr' must be a finite number"),
    ("recover.dwa.rho=.inf", r"'recover\.dwa\.rho' must be a finite number"),
    ("relabel.top_k=-5", r"'relabel\.top_k' must be >= 0"),
    ("train.mix_alpha=-1", r"'train\.mix_alpha' must be > 0"),
    ("eval.every=-1", r"'eval\.every' must be >= 0"),
    ("executor.num_workers=-2", r"'executor\.num_workers' must be >= 0"),
])
def test_every_value_is_range_checked_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", overrides=[override])
    assert main(["run", "--run-dir", "/nonexistent/never-made", "--set", override]) == 2


def test_floats_in_exponent_notation_are_read_as_floats():
    cfg = load_config("demo", overrides=["train.lr=1e-3", "recover.dwa.rho=15e-3"])
    assert cfg.train.lr == 1e-3 and cfg.recover.dwa.rho == 15e-3
    with pytest.raises(ConfigError, match=r"train\.lr': expected float, got 'fast'"):
        load_config("demo", overrides=["train.lr=fast"])


@pytest.mark.parametrize("key, other, stages", [("recover.batches_per_forward", "2", {"recover"}),
                                                ("train.views_on_device", "on", {"relabel", "train"}),
                                                ("train.hard_lr_from_set", "false", {"relabel", "train"}),
                                                ("train.own_batch_size", "64", {"relabel", "train"})])
def test_keys_added_after_runs_existed_are_hashed_only_when_set(key, other, stages):
    """A key added later is left out of the hash at its default, so a run directory made before it existed (whose
    records carry hashes without it) resumes under the new code; set to anything else it is hashed as usual."""
    section, name = key.split(".")
    base = load_config("demo")
    assert name not in base.section_for_hash(section)
    changed = load_config("demo", overrides=[f"{key}={other}"])
    assert changed.section_for_hash(section)[name] == getattr(changed, section).__dict__[name]
    a, b = compute_hashes(base), compute_hashes(changed)
    first = min(i for i, s in enumerate(a) if a[s] != b[s])
    assert list(a)[first] in stages  # the stage that reads it is the first whose hash moves
    assert compute_hashes(load_config("demo", overrides=[f"{key}={getattr(base, section).__dict__[name]}"])) == a


def test_a_key_given_twice_in_a_config_file_is_refused_naming_it(tmp_path):
    """Plain YAML keeps the last of two equal keys silently: the first setting would be lost without a word."""
    path = tmp_path / "my.yaml"
    path.write_text("recipe: demo\nrecover:\n  ipc: 10\n  method: dm\n  ipc: 1\n")
    with pytest.raises(ConfigError, match=r"my.yaml: not valid YAML: .*duplicate key 'ipc'.*line 5"):
        load_config(config_file=str(path))
    path.write_text("recipe: demo\nrecover:\n  ipc: 10\ntrain:\n  epochs: 3\n")  # the same key in two sections
    cfg = load_config(config_file=str(path))
    assert cfg.recover.ipc == 10 and cfg.train.epochs == 3


def test_a_resolution_the_architectures_cannot_take_is_refused_at_load():
    """data.resolution=7 used to pass the load and fail in squeeze: a ConvNet of depth 3 needs 8 px."""
    with pytest.raises(ConfigError, match=r"'data.resolution' \(7\) does not suit the architecture 'convnet'.*>= 8"):
        load_config("demo", overrides=["data.resolution=7"])
    with pytest.raises(ConfigError, match=r"'data.resolution' \(12\) does not suit the architecture 'lenet'"):
        load_config("demo", overrides=["data.resolution=12", "train.arch=lenet"])
    assert load_config("demo", overrides=["data.resolution=8"]).data.resolution == 8
