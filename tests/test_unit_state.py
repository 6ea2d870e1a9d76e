"""`UnitCheckpoint`: the file behind the checkpoints inside a recover unit (tag, save timing, compute seconds)."""

from __future__ import annotations

import logging

import torch

from pipeline.run.unit_state import UnitCheckpoint


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_saves_are_due_every_every_s_seconds_of_compute():
    clock = Clock()
    ck = UnitCheckpoint("unused.pt", "tag", every_s=10, clock=clock)
    clock.t += 9.9
    assert not ck.due()
    clock.t += 0.1
    assert ck.due()
    assert UnitCheckpoint("unused.pt", "tag", every_s=0, clock=clock).due()
    clock.t += 1e6
    assert not UnitCheckpoint("unused.pt", "tag", every_s=-1, clock=clock).due()


def test_a_resumed_unit_counts_the_seconds_of_the_runs_before(tmp_path):
    clock, path = Clock(), tmp_path / "u.pt"
    first = UnitCheckpoint(path, "tag", every_s=10, clock=clock)
    assert first.load() is None and first.resumed_at == 0
    clock.t += 12
    assert first.due()
    first.save({"it": 7, "iterations": 20, "x": torch.ones(2), "loss": 0.5})
    assert not first.due() and first.saves == 1
    clock.t += 5  # lost: the kill comes after the last save
    second = UnitCheckpoint(path, "tag", every_s=10, clock=clock)
    state = second.load()
    assert state is not None and state["it"] == 7 and torch.equal(state["x"], torch.ones(2))
    assert second.resumed_at == 7 and second.prior_seconds == 12
    clock.t += 3
    second.save({"it": 9, "iterations": 20, "x": torch.ones(2), "loss": 0.4})
    assert UnitCheckpoint(path, "tag", every_s=10, clock=clock).load()["seconds"] == 15  # 12 before, 3 since
    second.clear()
    assert not path.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary file left beside it


def test_a_file_of_another_configuration_or_unreadable_starts_afresh(tmp_path, caplog):
    path = tmp_path / "u.pt"
    UnitCheckpoint(path, "hash-a:c0000", every_s=0).save({"it": 3, "iterations": 9})
    with caplog.at_level(logging.WARNING):
        assert UnitCheckpoint(path, "hash-b:c0000", every_s=0).load() is None
    assert "another configuration" in caplog.text and str(path) in caplog.text
    path.write_bytes(b"not a torch file")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ck = UnitCheckpoint(path, "hash-a:c0000", every_s=0)
        assert ck.load() is None and ck.resumed_at == 0
    assert "unreadable unit checkpoint" in caplog.text
