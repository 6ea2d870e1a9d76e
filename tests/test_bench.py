"""`distill bench`: every row is measured and written with the documented fields; bad choices are usage errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

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


@pytest.mark.parametrize("resolution, factor", [(32, 1), (128, 2)])
def test_bench_rded_and_cda_rows_are_measured_with_rded_forwards_counted(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], resolution: int, factor: int) -> None:
    """recover/rded (images/s of the real worker over JPEGs it decodes), recover/rded-forwards (the worker's own
    count: candidates x crops / IPC, the same on both sides) and recover/sre2l-cda (fixed crop scale against CDA's
    schedule); factor auto: 1 below 128 px, 2 from it."""
    out = tmp_path / "bench.json"
    rc = main(["bench", "--what", "recover", "--methods", "rded,cda", "--resolution", str(resolution),
               "--batch", "2", "--iterations", "2", "--rounds", "1", "--rded-candidates", "4", "--rded-crops", "2",
               "--rded-ipc", "1", "--json", str(out)])
    assert rc == 0
    rows = {r["what"]: r for r in json.loads(out.read_text())}
    assert list(rows) == ["recover/rded", "recover/rded-forwards", "recover/sre2l-cda"]
    printed = capsys.readouterr().out
    for r in rows.values():
        assert set(r) == FIELDS and r["what"] in printed
        assert r["baseline"] > 0 and r["optimized"] > 0 and r["peak_memory_bytes"] > 0
        assert r["ratio"] == pytest.approx(r["optimized"] / r["baseline"], rel=0.01)
    assert rows["recover/rded"]["unit"] == "images/s" and f"factor {factor}" in rows["recover/rded"]["note"]
    forwards = rows["recover/rded-forwards"]
    assert forwards["unit"] == "teacher forwards/image"
    assert forwards["baseline"] == forwards["optimized"] == 4 * 2 / 1 and forwards["ratio"] == 1.0
    assert rows["recover/sre2l-cda"]["unit"] == "image-iterations/s" and "CDA" in rows["recover/sre2l-cda"]["note"]


def test_the_recover_cost_table_is_made_from_bench_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`benchmarks/recover_cost.py --from DIR` (whose table docs/benchmarks.md reports) turns `distill bench` rows into
    seconds per image at the official schedules: SRe2L 1000 iterations at 32 px, CDA SRe2L's rate times its row's
    ratio, RDED 1 / images per second, and ImageNet-1K projections."""
    import importlib.util

    assert main(["bench", "--what", "recover", "--methods", "sre2l,dwa,cda,rded", "--batch", "2", "--iterations", "2",
                 "--rounds", "1", "--merge", "0", "--no-compile", "--rded-candidates", "4", "--rded-crops", "2",
                 "--rded-ipc", "1", "--json", str(tmp_path / "recover32.json")]) == 0
    rows = {r["what"]: r for r in json.loads((tmp_path / "recover32.json").read_text())}
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "recover_cost.py"
    spec = importlib.util.spec_from_file_location("recover_cost", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # type: ignore[union-attr]
    capsys.readouterr()
    assert script.main(["--from", str(tmp_path)]) == 0
    table = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in capsys.readouterr().out.splitlines()
             if line.startswith("| ") and not line.startswith("| method")}
    sre2l = 1000 / rows["recover/sre2l"]["optimized"]
    assert float(table["sre2l"][0].replace(",", "")) == pytest.approx(sre2l, abs=0.051)
    cda = sre2l / rows["recover/sre2l-cda"]["ratio"]
    assert float(table["cda"][0].replace(",", "")) == pytest.approx(cda, abs=0.051)
    assert float(table["rded"][0]) == pytest.approx(1 / rows["recover/rded"]["optimized"], abs=0.051)
    assert float(table["dwa"][0].replace(",", "")) > 0 and table["dm"][0] == "-"  # no dm row in these
    assert table["sre2l"][4] == "0.75" and table["rded"][4] == "0.31"  # the H200 projections
    # a matching method at 224 px: seconds per image at its official outer steps, and no ImageNet projection (its
    # IPC-1 cost per image does not carry to IPC 10 / 50)
    (tmp_path / "matching224.json").write_text(json.dumps([{**rows["recover/sre2l"], "what": "recover/dc",
                                                            "optimized": 0.0654}]))
    assert script.main(["--from", str(tmp_path)]) == 0
    dc = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| dc "))
    assert dc.split(" | ")[2:5] == ["15,290.5", "-", "-"]


def test_slow_rates_keep_three_significant_digits_in_the_json_and_the_printed_line() -> None:
    """A 224-px matching row runs at ~0.06 image-iterations/s: two decimals would store 0.06 for 0.0649 (an 8 %
    error) and print 0.1; both the stored value and the printed one keep 3 significant digits below 1."""
    from pipeline.commands.bench import _fmt
    from pipeline.commands.bench_rows import make_row

    row = make_row("recover/dm-224", "image-iterations/s", 0.064912, 0.0712345, torch.device("cpu"))
    assert (row.baseline, row.optimized) == (0.0649, 0.0712)
    assert "0.0649" in _fmt(row) and "0.0712" in _fmt(row)
    fast = make_row("recover/sre2l", "image-iterations/s", 12.3456, 24.691, torch.device("cpu"))
    assert (fast.baseline, fast.optimized) == (12.35, 24.69)
    assert "12.3" in _fmt(fast) and "24.7" in _fmt(fast)
