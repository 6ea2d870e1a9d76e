"""`distill bench`: every row is measured and written with the documented fields; bad choices are usage errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.commands.cli import main

FIELDS = {"what", "unit", "baseline", "optimized", "ratio", "peak_memory_bytes", "setup_s", "ratio_per_unit", "note"}


def test_bench_prints_and_writes_a_row_per_path_with_its_ratio(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    rc = main(["bench", "--methods", "sre2l,dwa,dm,dc", "--iterations", "2", "--rounds", "1", "--student-batch", "8",
               "--merge", "2",
               "--no-compile", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())
    whats = [r["what"] for r in rows]
    assert whats == ["recover/sre2l", "recover/sre2l-merged", "recover/dwa", "recover/dm", "recover/dc", "relabel", "views", "train",
                     "loader/pil", "loader/dali"]
    printed = capsys.readouterr().out
    for r in rows:
        assert set(r) == FIELDS
        assert r["what"] in printed
        if r["optimized"] is None:  # DALI absent: said so, not a number
            assert r["what"] == "loader/dali" and "not installed" in r["note"]
            continue
        assert r["baseline"] > 0 and r["optimized"] > 0 and r["peak_memory_bytes"] > 0
        assert r["ratio"] == pytest.approx(r["optimized"] / r["baseline"], rel=0.01)
    units = {r["what"]: r["unit"] for r in rows}
    assert units["recover/sre2l"] == "image-iterations/s" and units["relabel"] == units["views"] == "views/s"
    assert units["train"] == units["loader/pil"] == "images/s"


@pytest.mark.parametrize("args", [["--what", "recover,gpu"], ["--methods", "sre2l,nope"]])
def test_bench_refuses_unknown_rows_as_a_usage_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", *args]) == 2
    err = capsys.readouterr().err
    assert "unknown" in err and "--what takes recover, relabel, views, train, loader" in err
