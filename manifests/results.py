"""The results table: a verified run's entry (from its evaluate record) and the grouped mean ± std.

Runs are grouped by (dataset, teacher, student, protocol, method, ipc); a group's top-1 is reported as
mean ± sample std (ddof=1) over its runs (seeds), in long form (LONG_COLUMNS), with the recover stage's cost
(`recover_cost`: mean wall seconds per unit, image-iterations/s and images/s over all units) averaged over them.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from manifests.schema import Record
from manifests.store import STAGE_RECORD

EVALUATE = "evaluate"
RECOVER = "recover"
GROUP_KEYS = ("dataset", "teacher", "student", "protocol", "method", "ipc")
COST_KEYS = ("recover_unit_s", "recover_image_it_per_s", "recover_images_per_s")
FAIR_KEYS = ("ior", "hlr", "lrs")  # fractions, from each run's summary (`manifests.fairness`)
LONG_COLUMNS = (
    "dataset", "teacher", "student", "protocol", "method", "ipc", "n_seeds", "top1_mean", "top1_std", "top5_mean",
    "teacher_top1_mean", *COST_KEYS, *(f"{k}_mean" for k in FAIR_KEYS), "device_hours_mean", "gpu_hours_mean",
    "top1_per_device_hour", "soft_label_bytes_mean", "runs",
)


@dataclass
class RunResult:
    """One verified, complete run: where it lives and what its evaluation recorded."""

    run_dir: Path
    dataset: str
    teacher: str
    student: str
    method: str
    ipc: int
    seed: int
    top1: float
    top5: float | None = None
    teacher_top1: float | None = None
    run_id: str = ""
    grids: list[Path] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    protocol: str = "kd"
    cost: dict[str, float | None] = field(default_factory=dict)  # COST_KEYS, from the recover unit records
    student_seed: int = 0  # the cell's student seed (a run's matrix has several)
    fair: dict[str, float | None] = field(default_factory=dict)  # FAIR_KEYS of the run's (protocol, student)
    device_hours: float | None = None  # the run's own cost (baselines apart)
    gpu_hours: float | None = None
    soft_label_bytes: float | None = None
    baseline_of: Path | None = None  # a random-real baseline's cell: the run whose summary carried it

    @property
    def group(self) -> tuple[str, str, str, str, str, int]:
        return (self.dataset, self.teacher, self.student, self.protocol, self.method, self.ipc)

    @property
    def identity(self) -> tuple[Any, ...]:
        """What makes two entries the same measurement (a baseline shared by several runs counts once)."""
        return (str(Path(self.run_dir).resolve()), self.method, self.protocol, self.student, self.student_seed)


def recover_cost(records: Sequence[Record]) -> dict[str, float | None]:
    """The recover stage's cost from its unit records: mean wall seconds per unit, image-iterations/s and images/s
    over all units (None where no unit recorded them; image-iterations are 0 for selection methods)."""
    units = [r for r in records if r.unit != STAGE_RECORD and r.status == "done"]
    secs = [float(r.metrics["seconds"]) for r in units if isinstance(r.metrics.get("seconds"), (int, float))]
    total = sum(secs)
    its = sum(float(r.metrics.get("image_iterations") or 0) for r in units)
    images = sum(float(r.metrics.get("images") or 0) for r in units)
    return {"recover_unit_s": statistics.fmean(secs) if secs else None,
            "recover_image_it_per_s": its / total if total > 0 and its > 0 else None,
            "recover_images_per_s": images / total if total > 0 and images > 0 else None}


def _read_config(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _incomplete_message(run_dir: Path, records: dict[str, list[Record]]) -> str:
    ended = {s: r.ended for s, recs in records.items() for r in recs if r.unit == STAGE_RECORD}
    done = sorted(ended, key=lambda s: (ended[s], s))  # the order the stages completed in: the run order
    failed = sorted(p.parent.name for p in (run_dir / "manifests").glob("*/*.failed.json"))
    msg = f"run {run_dir}: incomplete (no evaluate record; stages complete: {', '.join(done) or 'none'}"
    if failed:
        msg += f"; failed units in: {', '.join(sorted(set(failed)))}"
    return msg + "); not counted"


def _as_float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def latest_evaluate(records: dict[str, list[Record]]) -> Record | None:
    """The run's evaluate unit record that counts: the last one done (None: the run is not evaluated)."""
    evals = [r for r in records.get(EVALUATE, []) if r.unit != STAGE_RECORD and r.status == "done"]
    return max(evals, key=lambda r: r.ended) if evals else None


def run_result(run_dir: Path, records: dict[str, list[Record]]) -> tuple[RunResult | None, list[str]]:
    """The table entry of a complete run from its evaluate record (config.json fills gaps)."""
    run_dir = Path(run_dir)
    evaluated = latest_evaluate(records)
    if evaluated is None:
        return None, [_incomplete_message(run_dir, records)]
    summary = dict(evaluated.metrics)
    cfg = _read_config(run_dir)

    def pick(key: str, *path: str) -> Any:
        if summary.get(key) not in (None, ""):
            return summary[key]
        node: Any = cfg
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        return node

    top1 = _as_float(summary.get("top1"))
    if top1 is None:
        return None, [f"run {run_dir}: stage evaluate: record has no numeric top1; not counted"]
    values = {
        "dataset": pick("dataset", "data", "dataset"), "teacher": pick("teacher", "squeeze", "arch"),
        "student": pick("student", "train", "arch"), "method": pick("method", "recover", "method"),
        "ipc": pick("ipc", "recover", "ipc"), "seed": pick("seed", "seed"),
    }
    missing = [k for k, v in values.items() if v in (None, "")]
    if missing:
        return None, [f"run {run_dir}: cannot tell its {', '.join(missing)} (neither in the evaluate record nor "
                      "in config.json); not counted"]
    try:
        ipc, seed = int(values["ipc"]), int(values["seed"])
    except (TypeError, ValueError):
        return None, [f"run {run_dir}: ipc {values['ipc']!r} / seed {values['seed']!r} are not integers; not counted"]
    grid_names = []
    for rec in records.get(RECOVER, []):
        if rec.unit == STAGE_RECORD:
            grid_names.extend(rec.metrics.get("grids", []) or [])
    return RunResult(
        run_dir=run_dir, dataset=str(values["dataset"]), teacher=str(values["teacher"]),
        student=str(values["student"]), method=str(values["method"]), ipc=ipc,
        seed=seed, top1=top1, top5=_as_float(summary.get("top5")),
        teacher_top1=_as_float(summary.get("teacher_top1")), run_id=str(cfg.get("run_id", evaluated.run_id)),
        grids=[run_dir / g for g in grid_names], summary=summary,
        protocol=str((summary.get("protocol") or {}).get("name", "kd")) if isinstance(summary.get("protocol"), dict)
        else "kd", cost=recover_cost(records.get(RECOVER, [])),
    ), []


def summary_mismatch(run_dir: Path, records: dict[str, list[Record]]) -> str | None:
    """A message when the evaluate record's metrics (what collect counts) differ from the `results/summary.json` the
    record names (whose size and sha256 the record also holds, so it is checked first by `verify_outputs`): a record
    edited by hand. None when they agree, or when the record names no summary file."""
    rec = latest_evaluate(records)
    if rec is None:
        return None
    paths = [Path(run_dir) / o.uri for o in rec.outputs if o.uri.endswith("summary.json")]
    if not paths:
        return None
    try:
        summary = json.loads(paths[0].read_text())
    except (OSError, ValueError) as exc:
        return f"run {run_dir}: stage evaluate: {paths[0]} cannot be read ({exc}); not counted"

    def canon(v: Any) -> str:
        return json.dumps(v, sort_keys=True)

    # the executor adds its usage figures (device, device_s, peak memory) to the record: only the file's keys count
    keys = sorted(k for k in summary if canon(rec.metrics.get(k)) != canon(summary[k]))
    if not keys:
        return None
    shown = ", ".join(f"{k}: record {rec.metrics.get(k)!r}, file {summary.get(k)!r}" if not isinstance(
        summary.get(k), dict | list) else k for k in keys[:4])
    return (f"run {run_dir}: stage evaluate: unit {rec.unit}: its record differs from {paths[0].name}, whose hash it "
            f"holds ({shown}{', ...' if len(keys) > 4 else ''}): the record was edited; not counted (rerun "
            "`distill run --stages evaluate --fresh` to write both again)")


def cell_results(run: RunResult) -> list[RunResult]:
    """A run's entries: one per cell of its evaluation matrix (`summary["cells"]`; a summary without cells is one
    entry) with its fairness metrics and cost, then its random-real baseline's cells as entries of method
    `random-real` (run_dir = the baseline's own folder, so runs sharing it count it once)."""
    s = run.summary
    cost = s.get("cost") if isinstance(s.get("cost"), dict) else {}
    fair = {(f.get("protocol"), f.get("student")): f for f in s.get("fairness") or [] if isinstance(f, dict)}
    common = {"device_hours": _as_float(cost.get("device_hours")), "gpu_hours": _as_float(cost.get("gpu_hours")),
              "soft_label_bytes": _as_float(s.get("soft_label_bytes"))}
    cells = [c for c in s.get("cells") or [] if isinstance(c, dict) and _as_float(c.get("top1")) is not None]
    if not cells:
        key = fair.get((run.protocol, run.student), {})
        return [replace(run, fair={k: _as_float(key.get(k)) for k in FAIR_KEYS}, **common)]
    out = []
    for c in cells:
        f = fair.get((c.get("protocol"), c.get("student")), {})
        out.append(replace(run, student=str(c.get("student")), protocol=str(c.get("protocol")),
                           student_seed=int(c.get("seed") or 0), top1=float(c["top1"]), top5=_as_float(c.get("top5")),
                           fair={k: _as_float(f.get(k)) for k in FAIR_KEYS}, **common))
    base = (s.get("baselines") or {}).get("random-real") or {}
    if run.method != "random-real" and isinstance(base, dict) and base.get("run_dir") not in (None, "", "."):
        where = (run.run_dir / str(base["run_dir"])).resolve()
        for c in base.get("cells") or []:
            if isinstance(c, dict) and _as_float(c.get("top1")) is not None:
                out.append(replace(run, run_dir=where, method="random-real", student=str(c.get("student")),
                                   protocol=str(c.get("protocol")), student_seed=int(c.get("seed") or 0),
                                   top1=float(c["top1"]), top5=_as_float(c.get("top5")), grids=[], cost={},
                                   fair={}, device_hours=None, gpu_hours=None, soft_label_bytes=None,
                                   baseline_of=run.run_dir))
    return out


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def mean_of(values: list[Any]) -> float | None:
    """The mean of the numbers among `values` (None and other values skipped); None when there are none."""
    present = [float(v) for v in values if isinstance(v, (int, float))]
    return statistics.fmean(present) if present else None


def results_table(runs: Sequence[RunResult]) -> list[dict[str, Any]]:
    """Long-form rows, one per (dataset, teacher, student, method, ipc), sorted.

    Keys: LONG_COLUMNS. `top1_std` is the sample std (ddof=1) or None for a single run;
    `runs` lists the run directories.
    """
    groups: dict[tuple[str, str, str, str, str, int], list[RunResult]] = defaultdict(list)
    for run in runs:
        groups[run.group].append(run)
    rows = []
    for key in sorted(groups):
        members = sorted(groups[key], key=lambda r: (r.seed, r.student_seed, str(r.run_dir)))
        top1_mean, top1_std = _mean_std([r.top1 for r in members])
        top5 = [r.top5 for r in members if r.top5 is not None]
        teacher = [r.teacher_top1 for r in members if r.teacher_top1 is not None]
        rows.append({
            **dict(zip(GROUP_KEYS, key, strict=True)),
            "n_seeds": len(members),
            "top1_mean": top1_mean,
            "top1_std": top1_std,
            "top5_mean": statistics.fmean(top5) if len(top5) == len(members) else None,
            "teacher_top1_mean": statistics.fmean(teacher) if teacher else None,
            **{k: mean_of([r.cost.get(k) for r in members]) for k in COST_KEYS},
            **{f"{k}_mean": mean_of([r.fair.get(k) for r in members]) for k in FAIR_KEYS},
            "device_hours_mean": mean_of([r.device_hours for r in members]),
            "gpu_hours_mean": mean_of([r.gpu_hours for r in members]),
            "top1_per_device_hour": mean_of([r.top1 / r.device_hours for r in members if r.device_hours]),
            "soft_label_bytes_mean": mean_of([r.soft_label_bytes for r in members]),
            "runs": list(dict.fromkeys(str(r.run_dir) for r in members)),
        })
    return rows


def duplicate_seeds(runs: Sequence[RunResult]) -> list[str]:
    """Warnings for groups that hold the same seed twice (counted, but not independent)."""
    seen: dict[tuple[Any, ...], list[str]] = defaultdict(list)
    for run in runs:
        seen[(*run.group, run.seed, run.student_seed)].append(str(run.run_dir))
    return [f"seed {k[-2]} (student seed {k[-1]}) of {'/'.join(map(str, k[:-2]))} appears in {len(v)} runs: "
            f"{', '.join(v)}" for k, v in seen.items() if len(v) > 1]
