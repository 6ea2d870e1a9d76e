"""The collector on fabricated run directories: statistics, verification, outputs, exit codes."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from manifests.collect import (
    collect_main,
    format_cell,
    format_markdown,
    load_runs,
    results_table,
    verify_outputs,
)
from manifests.schema import FileRef, Record
from manifests.store import STAGE_RECORD, ManifestStore

STAGES = ("ingest", "squeeze", "recover", "relabel", "train", "evaluate")
# (method, ipc) -> top-1 of seeds 0, 1, 2
TOP1 = {
    ("sre2l", 10): [20.0, 22.0, 24.0],
    ("sre2l", 50): [45.0, 46.0, 47.5],
    ("dwa", 10): [37.0, 38.5, 38.0],
    ("dwa", 50): [55.0, 54.0, 56.6],
}


def _rec(run_id: str, stage: str, unit: str, outputs: list[FileRef] = (), metrics: dict | None = None) -> Record:
    return Record(run_id=run_id, stage=stage, unit=unit, status="done", config_hash="h" + stage, seed=0,
                  outputs=tuple(outputs), metrics=metrics or {}, ended=1.0)


def make_run(root: Path, method: str, ipc: int, seed: int, top1: float, evaluate: bool = True,
             protocol: str = "kd", unit_metrics: dict | None = None, summary_extra: dict | None = None,
             name: str = "") -> Path:
    """A run directory with the layout of a real one: config, per-stage records naming tiny outputs."""
    run_dir = root / (name or f"{method}-ipc{ipc}-s{seed}" + ("" if protocol == "kd" else f"-{protocol}"))
    run_id = run_dir.name
    cfg = {"run_id": run_id, "seed": seed, "data": {"dataset": "digits"}, "squeeze": {"arch": "convnet"},
           "train": {"arch": "convnet"}, "recover": {"method": method, "ipc": ipc}}
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(cfg))
    store = ManifestStore(run_dir)
    outputs = {
        "ingest": [("real/shard-000000.tar", b"shard0" * 50), ("real/shard-000001.tar", b"shard1" * 40)],
        "squeeze": [("checkpoints/teacher.pt", b"teacher" + bytes([seed]))],
        "recover": [("synthetic/c0000-0009/ipc000-004.tar", b"img" * 30 + bytes([seed, ipc]))],
        "relabel": [("soft_labels/part-000.parquet", b"soft" * 10)],
        "train": [("checkpoints/student.pt", b"student" + bytes([seed]))],
        "evaluate": [("results/summary.json", b"")],
    }
    summary = {"dataset": "digits", "method": method, "ipc": ipc, "num_classes": 10, "num_images": 10 * ipc,
               "teacher": "convnet", "student": "convnet", "teacher_top1": 95.0 + seed, "top1": top1,
               "top5": top1 + 30.0, "best_top1": top1 + 1.0, "epochs": 100, "relabel_mode": "stored",
               "seed": seed, "wall_s": {"ingest": 1.0}, "protocol": {"resolution": 32, "name": protocol},
               **(summary_extra or {})}
    for stage in STAGES:
        if stage == "evaluate" and not evaluate:
            break
        refs = []
        for rel, data in outputs[stage]:
            path = run_dir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(json.dumps(summary).encode() if rel.endswith("summary.json") else data)
            refs.append(FileRef.of(path, run_dir))
        stage_metrics: dict = {"wall_s": 1.0}
        if stage == "recover":
            grid = run_dir / "results" / "grids" / "c0000-0009.png"
            grid.parent.mkdir(parents=True, exist_ok=True)
            grid.write_bytes(b"\x89PNG fake")
            stage_metrics["grids"] = ["results/grids/c0000-0009.png"]
        metrics = summary if stage == "evaluate" else (unit_metrics or {}) if stage == "recover" else {}
        store.commit(_rec(run_id, stage, "job" if stage == "evaluate" else f"{stage}-u0", refs, metrics))
        store.commit(_rec(run_id, stage, STAGE_RECORD, metrics=stage_metrics))
    return run_dir


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for (method, ipc), values in TOP1.items():
        for seed, top1 in enumerate(values):
            make_run(root, method, ipc, seed, top1)
    return root


def test_table_statistics(runs_root: Path) -> None:
    runs, problems = load_runs([str(runs_root / "*")])
    assert problems == []
    assert len(runs) == 12
    rows = results_table(runs)
    assert [(r["method"], r["ipc"]) for r in rows] == [("dwa", 10), ("dwa", 50), ("sre2l", 10), ("sre2l", 50)]
    for row in rows:
        values = TOP1[(row["method"], row["ipc"])]
        assert row["n_seeds"] == 3
        assert row["top1_mean"] == pytest.approx(statistics.fmean(values))
        assert row["top1_std"] == pytest.approx(statistics.stdev(values))  # ddof = 1
        assert row["top5_mean"] == pytest.approx(statistics.fmean(values) + 30.0)
        assert row["teacher_top1_mean"] == pytest.approx(96.0)
        assert len(row["runs"]) == 3
    md = format_markdown(rows, runs)
    assert "| dataset | teacher | student | protocol | method | teacher top-1 | IPC 10 | IPC 50 |" in md
    assert "| digits | convnet | convnet | kd | sre2l | 96.00 | 22.00 ± 2.00 (n=3) | 46.17 ± 1.26 (n=3) |" in md
    assert "results/grids/c0000-0009.png" in md
    # a directory of runs stands for the runs in it
    assert len(load_runs([str(runs_root)])[0]) == 12


def test_single_seed_cell() -> None:
    assert format_cell(21.3, None, 1) == "21.30 (n=1)"
    assert format_cell(21.3, 0.5, 3) == "21.30 ± 0.50 (n=3)"


def test_modified_output_reported_and_excluded(runs_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = runs_root / "dwa-ipc10-s1"
    shard = bad / "synthetic" / "c0000-0009" / "ipc000-004.tar"
    data = bytearray(shard.read_bytes())
    data[0] ^= 0xFF  # same size, other content: only the hash can tell
    shard.write_bytes(bytes(data))
    problems = verify_outputs(bad)
    assert len(problems) == 1
    assert "dwa-ipc10-s1" in problems[0] and "stage recover" in problems[0]
    assert "unit recover-u0" in problems[0] and "synthetic/c0000-0009/ipc000-004.tar" in problems[0]
    assert "changed" in problems[0]

    assert collect_main([str(runs_root / "*")], None) == 1
    captured = capsys.readouterr()
    assert "synthetic/c0000-0009/ipc000-004.tar has changed" in captured.err
    values = [TOP1[("dwa", 10)][0], TOP1[("dwa", 10)][2]]
    cell = format_cell(statistics.fmean(values), statistics.stdev(values), 2)
    assert f"| digits | convnet | convnet | kd | dwa | 96.00 | {cell} |" in captured.out
    assert "11 run(s) counted in 4 cell(s), 1 run(s) left out" in captured.err


def test_deleted_output_reported_and_excluded(runs_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = runs_root / "sre2l-ipc50-s2"
    (bad / "real" / "shard-000001.tar").unlink()
    runs, problems = load_runs([str(runs_root / "*")])
    assert len(runs) == 11
    assert all(r.run_dir != bad for r in runs)
    assert any("sre2l-ipc50-s2" in p and "unit ingest-u0" in p and "real/shard-000001.tar is missing" in p
               for p in problems)
    rows = {(r["method"], r["ipc"]): r for r in results_table(runs)}
    assert rows[("sre2l", 50)]["n_seeds"] == 2
    assert rows[("sre2l", 50)]["top1_mean"] == pytest.approx(45.5)
    assert collect_main([str(runs_root)], None) == 1
    assert "is missing" in capsys.readouterr().err


def test_incomplete_run_listed_not_counted(runs_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(runs_root, "dwa", 10, 7, 99.0, evaluate=False)
    runs, problems = load_runs([str(runs_root)])
    assert len(runs) == 12
    assert any("dwa-ipc10-s7" in p and "incomplete" in p for p in problems)
    assert collect_main([str(runs_root)], None) == 1
    assert "incomplete" in capsys.readouterr().err


def test_outputs_written(runs_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert collect_main([str(runs_root / "*")], str(out / "table.md")) == 0
    md = (out / "table.md").read_text()
    assert "IPC 10" in md and "(n=3)" in md
    assert "](../runs/dwa-ipc10-s0/results/grids/c0000-0009.png)" in md  # links relative to the md file
    assert (out / "table.png").read_bytes()[:4] == b"\x89PNG"

    assert collect_main([str(runs_root / "*")], str(out / "table.csv")) == 0
    with open(out / "table.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4
    assert list(rows[0]) == ["dataset", "teacher", "student", "protocol", "method", "ipc", "n_seeds", "top1_mean",
                             "top1_std", "top5_mean", "teacher_top1_mean", "recover_unit_s", "recover_image_it_per_s",
                             "recover_images_per_s", "ior_mean", "hlr_mean", "lrs_mean", "device_hours_mean",
                             "gpu_hours_mean", "top1_per_device_hour", "soft_label_bytes_mean", "runs"]
    assert rows[0]["n_seeds"] == "3" and len(rows[0]["runs"].split(";")) == 3

    import pyarrow.parquet as pq

    assert collect_main([str(runs_root / "*")], str(out / "table.parquet")) == 0
    table = pq.read_table(out / "table.parquet").to_pylist()
    assert len(table) == 4
    sre2l10 = next(r for r in table if r["method"] == "sre2l" and r["ipc"] == 10)
    assert sre2l10["top1_mean"] == pytest.approx(22.0) and sre2l10["top1_std"] == pytest.approx(2.0)
    assert len(sre2l10["runs"]) == 3
    assert (out / "table.png").exists()


def test_no_match_exit_2(tmp_path: Path) -> None:
    assert collect_main([str(tmp_path / "nothing-*")], None) == 2
    assert collect_main([str(tmp_path)], None) == 2  # a folder without run directories
    assert collect_main([str(tmp_path / "x")], str(tmp_path / "t.txt")) == 2


def test_protocols_are_separate_rows_and_recover_cost_is_shown_against_sre2l(tmp_path, capsys):
    root = tmp_path / "runs"
    for seed in (0, 1):
        make_run(root, "sre2l", 10, seed, 40.0, unit_metrics={"seconds": 10.0, "images": 100, "image_iterations": 30000})
    make_run(root, "dm", 10, 0, 50.0, unit_metrics={"seconds": 40.0, "images": 100, "image_iterations": 20000})
    make_run(root, "dm", 10, 0, 60.0, protocol="hard",
             unit_metrics={"seconds": 40.0, "images": 100, "image_iterations": 20000})
    make_run(root, "herding", 10, 0, 45.0, unit_metrics={"seconds": 2.0, "images": 100, "image_iterations": 0})
    assert collect_main([str(root)], None) == 0
    out = capsys.readouterr().out
    assert "| digits | convnet | convnet | kd | dm | 95.00 | 50.00 (n=1) |" in out
    assert "| digits | convnet | convnet | hard | dm | 95.00 | 60.00 (n=1) |" in out  # not averaged with kd
    assert "| digits | sre2l | 10 | 10.00 | 3000.0 | 10.0 | 1.00 |" in out
    assert "| digits | dm | 10 | 40.00 | 500.0 | 2.5 | 4.00 |" in out
    assert "| digits | herding | 10 | 2.00 | - | 50.0 | 0.20 |" in out  # selection: no image-iterations


# ------------------------------------------------------------------------- evaluation matrices and baselines

def _matrix_summary(top1: dict[tuple[str, str, int], float], random: dict[tuple[str, str, int], float],
                    baseline_dir: str, device_hours: float) -> dict:
    from manifests.fairness import fairness_rows

    cells = [{"protocol": p, "student": s, "seed": k, "top1": v, "top5": 99.0} for (p, s, k), v in top1.items()]
    baselines = {"random-real": {"run_dir": baseline_dir, "cells": [
        {"protocol": p, "student": s, "seed": k, "top1": v, "top5": 99.0} for (p, s, k), v in random.items()]},
        "full-real": {"cells": [{"protocol": "hard", "student": "convnet", "seed": 0, "top1": 98.0}]}}
    return {"cells": cells, "baselines": baselines, "fairness": fairness_rows(cells, baselines),
            "cost": {"device": "cpu", "device_hours": device_hours, "gpu_hours": 0.0}, "soft_label_bytes": 1000}


def test_a_matrix_run_counts_each_cell_and_a_shared_baseline_once(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    random = {("kd", "convnet", 0): 50.0, ("kd", "lenet", 0): 40.0, ("hard", "convnet", 0): 45.0}
    mine = {("kd", "convnet", 0): 60.0, ("kd", "lenet", 0): 38.0, ("hard", "convnet", 0): 40.0}
    shared = str(tmp_path / "shared" / "random-real-abc")  # both runs point at the same baseline folder
    for method, top in (("dwa", mine), ("sre2l", {k: v - 5 for k, v in mine.items()})):
        make_run(root, method, 10, 0, top[("kd", "convnet", 0)], summary_extra=_matrix_summary(
            top, random, shared, device_hours=0.5))
    make_run(root, "herding", 10, 0, 55.0)  # an old summary, without cells: one kd entry as before
    out = tmp_path / "table.md"
    assert collect_main([str(root)], str(out)) == 0
    from manifests.collect import cell_entries

    runs, problems = load_runs([str(root)])
    assert problems == []
    entries = cell_entries(runs)
    assert len(entries) == 3 + 3 + 3 + 1  # two runs' cells, the shared baseline once, the old run
    table = {(r["method"], r["protocol"], r["student"]): r for r in results_table(entries)}
    assert table[("random-real", "kd", "convnet")]["n_seeds"] == 1
    assert table[("dwa", "kd", "convnet")]["ior_mean"] == pytest.approx(0.10)
    assert table[("dwa", "hard", "convnet")]["hlr_mean"] == pytest.approx(0.58)
    assert table[("dwa", "kd", "convnet")]["top1_per_device_hour"] == pytest.approx(120.0)
    assert table[("herding", "kd", "convnet")]["ior_mean"] is None
    text = out.read_text()
    assert "## Fairness and cost" in text and "## Across student architectures" in text
    across = text.split("## Across student architectures")[1]
    assert "| method | convnet | lenet |" in across and "| dwa | 60.00 (n=1) | 38.00 (n=1) |" in across
    assert out.with_name("table-bytes.png").is_file() and out.with_suffix(".png").is_file()
    # the long form carries the new columns
    assert collect_main([str(root)], str(tmp_path / "table.csv")) == 0
    with open(tmp_path / "table.csv") as f:
        long = {(r["method"], r["protocol"], r["student"]): r for r in csv.DictReader(f)}
    assert float(long[("dwa", "kd", "convnet")]["ior_mean"]) == pytest.approx(0.10)


def test_an_evaluate_record_edited_by_hand_is_reported_and_not_counted(runs_root: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`sed` on the evaluate record's top1: the summary file it names (hash intact) says otherwise."""
    edited = runs_root / "dwa-ipc10-s1"
    record = edited / "manifests" / "evaluate" / "job.json"
    was = TOP1[("dwa", 10)][1]
    text = record.read_text()
    assert f'"top1": {was}' in text
    record.write_text(text.replace(f'"top1": {was}', '"top1": 84.79'))
    assert collect_main([str(runs_root / "*")], None) == 1
    captured = capsys.readouterr()
    assert f"top1: record 84.79, file {was}" in captured.err and "the record was edited; not counted" in captured.err
    values = [TOP1[("dwa", 10)][0], TOP1[("dwa", 10)][2]]
    cell = format_cell(statistics.fmean(values), statistics.stdev(values), 2)
    assert f"| digits | convnet | convnet | kd | dwa | 96.00 | {cell} |" in captured.out
    assert not [line for line in captured.out.splitlines() if line.startswith("| digits") and "84.79" in line]


def test_a_copied_run_is_counted_once(runs_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A copy of a run directory holds the same run id: pooling both would count one run as n = 2."""
    import shutil

    shutil.copytree(runs_root / "dwa-ipc10-s1", runs_root / "zz-copy")
    assert collect_main([str(runs_root / "*")], None) == 1
    captured = capsys.readouterr()
    assert "zz-copy: the same run (run id dwa-ipc10-s1)" in captured.err and "counted once" in captured.err
    values = TOP1[("dwa", 10)]
    cell = format_cell(statistics.fmean(values), statistics.stdev(values), 3)
    assert f"| digits | convnet | convnet | kd | dwa | 96.00 | {cell} |" in captured.out
    assert "12 run(s) counted" in captured.err
