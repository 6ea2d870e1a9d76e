"""Manifest store: atomic commit, failures, config-hash refusal."""

from __future__ import annotations

import pytest

from manifests.schema import FileRef, Record
from manifests.store import ManifestStore, atomic_path, atomic_write_bytes
from pipeline.commands.recipes import load_config
from pipeline.config import ConfigError
from pipeline.run.runner import open_context, prepare


def _rec(unit: str, h: str = "abc") -> Record:
    return Record(run_id="r", stage="ingest", unit=unit, status="done", config_hash=h, seed=1)


def test_commit_roundtrip_and_no_temp_left(tmp_path):
    store = ManifestStore(tmp_path)
    (tmp_path / "f.bin").write_bytes(b"hello")
    ref = FileRef.of(tmp_path / "f.bin", tmp_path)
    rec = Record(run_id="r", stage="ingest", unit="u1", status="done", config_hash="h", seed=3, outputs=(ref,),
                 metrics={"n": 1})
    store.commit(rec)
    assert store.load("ingest", "u1") == rec
    assert ref.uri == "f.bin" and ref.bytes == 5
    assert [p.name for p in (tmp_path / "manifests" / "ingest").iterdir()] == ["u1.json"]


def test_failure_record_is_not_done_and_commit_clears_it(tmp_path):
    store = ManifestStore(tmp_path)
    store.fail(Record(run_id="r", stage="ingest", unit="u1", status="failed", config_hash="h", seed=3, error="tb"))
    assert store.done_keys("ingest", "h") == set() and len(store.failures("ingest")) == 1
    store.commit(_rec("u1", "h"))
    assert store.done_keys("ingest", "h") == {"u1"} and store.failures("ingest") == []


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    store = ManifestStore(tmp_path)
    import manifests.store as ms

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ms.os, "replace", boom)
    with pytest.raises(OSError):
        store.commit(_rec("u1"))
    assert store.load("ingest", "u1") is None
    assert list((tmp_path / "manifests" / "ingest").iterdir()) == []


def test_atomic_path_renames_on_success_and_deletes_on_error(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".out.bin.") and not target.exists()
        tmp.write_bytes(b"new")  # a writer that opens the file itself
    assert target.read_bytes() == b"new"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"new"  # the old file stays whole
    atomic_write_bytes(target, b"newer")
    assert target.read_bytes() == b"newer"
    assert [p.name for p in target.parent.iterdir()] == ["out.bin"]  # no temporary left behind


def test_atomic_path_gives_each_writer_its_own_temporary(tmp_path):
    with atomic_path(tmp_path / "x") as a, atomic_path(tmp_path / "x") as b:
        assert a != b
        a.write_bytes(b"a")
        b.write_bytes(b"b")
    assert (tmp_path / "x").read_bytes() == b"a"  # the last rename wins; neither saw the other's bytes
    assert [p.name for p in tmp_path.iterdir()] == ["x"]


def test_unsafe_unit_key_rejected(tmp_path):
    with pytest.raises(ValueError, match="unit key"):
        ManifestStore(tmp_path).commit(_rec("../evil"))


def test_changed_config_refused_unless_fresh(tmp_path):
    cfg = load_config("demo")
    ctx = open_context(cfg, tmp_path)
    prepare(ctx, fresh=False)
    ctx.store.commit(Record(run_id=ctx.run_id, stage="recover", unit="u", status="done",
                            config_hash=ctx.hashes["recover"], seed=0))
    ctx2 = open_context(load_config("demo", overrides=["recover.ipc=3"]), tmp_path)
    with pytest.raises(ConfigError, match=r"stage\(s\) recover"):
        prepare(ctx2, fresh=False)
    prepare(ctx2, fresh=True)
    assert ctx2.store.records("recover") == []
    assert ctx2.run_id == ctx.run_id
