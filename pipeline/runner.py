"""The runner: hashes, resume checks, planning, executing and committing units.

The stages come from a `StageGraph` (the pipeline's by default), run in the order derived from their
`depends_on`. Units run through the executor the caller passes (`run_pipeline(..., executor=...)`;
the in-process `LocalExecutor` by default): the runner never picks Ray itself, so `pipeline` does not
import `workers`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from manifests.schema import Record
from manifests.store import STAGE_RECORD, atomic_write_text
from pipeline import __version__
from pipeline.config import Config, ConfigError
from pipeline.executors import Executor, LocalExecutor
from pipeline.stages import StageGraph, pipeline_graph
from pipeline.stages.base import Outcome, RunContext, Stage

log = logging.getLogger("distill")


class StageFailed(RuntimeError):
    """A stage could not complete (exit code 1)."""


def code_version() -> str:
    """Package version plus the git commit of the source tree when there is one."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
            text=True, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def compute_hashes(cfg: Config, graph: StageGraph | None = None) -> dict[str, str]:
    """Each stage's hash covers its own config sections and its upstream stages' hashes."""
    hashes: dict[str, str] = {}
    for stage in (graph or pipeline_graph()).stages:
        name = stage.name
        payload = {
            "stage": name,
            "sections": {s: cfg.section_for_hash(s) for s in stage.sections},
            "upstream": {d: hashes[d] for d in stage.depends_on},
        }
        text = json.dumps(payload, sort_keys=True, default=str)
        hashes[name] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return hashes


def select_stages(names: list[str] | None, graph: StageGraph | None = None) -> list[str]:
    """`names` in run order (all stages when None); ConfigError naming unknown stages."""
    return (graph or pipeline_graph()).select(names)


@dataclass
class StageStatus:
    name: str
    done: int = 0
    failed: int = 0
    pending: int | None = None
    hash_state: str = "current"  # current | changed | none
    complete: bool = False
    stale_records: int = 0
    notes: list[str] = field(default_factory=list)


def open_context(cfg: Config, run_dir: Path, graph: StageGraph | None = None) -> RunContext:
    """Context for `run_dir` with this config's hashes and the run id (kept across reruns)."""
    run_dir = Path(run_dir)
    run_id = ""
    existing = run_dir / "config.json"
    if existing.exists():
        try:
            run_id = json.loads(existing.read_text()).get("run_id", "")
        except json.JSONDecodeError:
            run_id = ""
    run_id = run_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    return RunContext(run_dir=run_dir, config=cfg, run_id=run_id, hashes=compute_hashes(cfg, graph),
                      code_version=code_version())


def changed_stages(ctx: RunContext, graph: StageGraph | None = None) -> list[str]:
    """Stages with records made under another config hash."""
    store = ctx.store
    return [n for n in (graph or pipeline_graph()).names if store.stale_hashes(n, ctx.hashes[n])]


def prepare(ctx: RunContext, fresh: bool, graph: StageGraph | None = None) -> None:
    """Refuse a changed config unless `fresh`; with `fresh`, forget the changed stages' work."""
    graph = graph or pipeline_graph()
    changed = changed_stages(ctx, graph)
    if changed and not fresh:
        raise ConfigError(
            f"run directory {ctx.run_dir} was made with another configuration for stage(s) "
            f"{', '.join(changed)}; use a new --run-dir, restore the old settings, or pass --fresh "
            "to discard those stages' results and recompute them"
        )
    for name in changed:
        log.warning("--fresh: discarding stage %s (its configuration changed)", name)
        ctx.store.clear(name)
        for d in graph.get(name).output_dirs:
            shutil.rmtree(ctx.path(d), ignore_errors=True)
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    resolved = {"run_id": ctx.run_id, **ctx.config.to_dict()}
    atomic_write_text(ctx.path("config.json"), json.dumps(resolved, indent=1, sort_keys=True))


def _record(ctx: RunContext, stage: str, outcome: Outcome) -> Record:
    result = outcome.result
    usage = outcome.usage_error.replace("\n", " | ")
    error = f"config error: {usage}\n{outcome.error}" if usage else outcome.error
    return Record(
        run_id=ctx.run_id, stage=stage, unit=outcome.unit.key, status="done" if outcome.ok else "failed",
        config_hash=ctx.hashes[stage], seed=ctx.unit_seed(stage, outcome.unit.key),
        inputs=tuple(result.inputs) if result else (), outputs=tuple(result.outputs) if result else (),
        metrics=dict(result.metrics) if result else {}, code_version=ctx.code_version,
        host=outcome.host or socket.gethostname(), attempt=outcome.attempt, started=outcome.started,
        ended=outcome.ended, error=error,
    )


def run_stage(ctx: RunContext, stage: Stage | str, executor: Executor, progress: bool = True) -> dict[str, Any]:
    """Plan, skip what is done, run the rest, commit records, finalize. Returns stage metrics.

    `stage`: a stage object or the name of a pipeline stage. Units of a distributed stage go to
    `executor`; the others run here, in the driver, where a DDP job reaches `executor.launch_ddp`
    through `ctx.executor`.
    """
    stage = pipeline_graph().get(stage) if isinstance(stage, str) else stage
    name = stage.name
    ctx = dataclasses.replace(ctx, executor=executor)  # the caller's context is left as it was
    store = ctx.store
    for dep in stage.depends_on:
        if not store.stage_done(dep, ctx.hashes[dep]):
            raise ConfigError(
                f"stage '{name}' needs stage '{dep}', which has not completed for this configuration in "
                f"{ctx.run_dir}; run it first (add it to --stages)"
            )
    t0 = time.time()
    stage.validate(ctx)
    units = stage.plan(ctx)
    done = store.done_keys(name, ctx.hashes[name])
    pending = [u for u in units if u.key not in done]
    log.info("stage %s: %d units, %d done, %d to run", name, len(units), len(units) - len(pending), len(pending))
    failures: list[Record] = []
    if pending:
        bar = _progress(name, len(units), len(units) - len(pending), progress)
        produced = [0]  # images made by this stage's units so far (shown beside the unit count and ETA)

        def on_outcome(outcome: Outcome) -> None:
            rec = _record(ctx, name, outcome)
            if outcome.ok:
                store.commit(rec)
                produced[0] += int(rec.metrics.get("images", 0) or 0)
                if produced[0]:
                    bar.set_postfix(images=produced[0], refresh=False)
                bar.update(1)
            else:
                store.fail(rec)
                failures.append(rec)
                if outcome.usage_error:  # bad input: the CLI prints the message; the traceback stays in the record
                    log.debug("stage %s unit %s: %s", name, rec.unit, rec.error)
                else:
                    log.error("stage %s unit %s failed (attempt %d):\n%s", name, rec.unit, rec.attempt, rec.error)

        try:
            if stage.distributed:
                executor.run_units(stage, ctx, pending, on_outcome)
            else:  # a driver-side job is run once: it resumes from its own checkpoints when run again
                LocalExecutor(max_attempts=1).run_units(stage, ctx, pending, on_outcome)
        finally:
            bar.close()
    usage = [r for r in failures if r.error.startswith("config error: ")]
    if usage:
        raise ConfigError(f"stage '{name}' unit {usage[0].unit}: {usage[0].error.splitlines()[0][14:]}")
    missing = [u.key for u in units if u.key not in store.done_keys(name, ctx.hashes[name])]
    if missing:
        first = failures[0].error.strip().splitlines()[-1] if failures else "no record was written"
        raise StageFailed(
            f"stage '{name}': {len(missing)} of {len(units)} units failed ({', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}); last error: {first}. Tracebacks are in "
            f"{store.root / name}/*.failed.json; fix the cause and run again: finished units are kept."
        )
    metrics = stage.finalize(ctx)
    metrics = {"units": len(units), "ran": len(pending), "wall_s": round(time.time() - t0, 3), **metrics}
    prev = store.load(name, STAGE_RECORD)
    if prev is not None and prev.config_hash == ctx.hashes[name] and not pending:
        metrics["wall_s"] = prev.metrics.get("wall_s", metrics["wall_s"])
    store.commit(Record(
        run_id=ctx.run_id, stage=name, unit=STAGE_RECORD, status="done", config_hash=ctx.hashes[name],
        seed=ctx.config.seed, metrics=metrics, code_version=ctx.code_version, host=socket.gethostname(),
        started=t0, ended=time.time(),
    ))
    return metrics


def _progress(name: str, total: int, initial: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=f"{name:>8}", unit="unit", disable=not enabled,
                dynamic_ncols=True, leave=True)


def run_pipeline(
    cfg: Config, run_dir: Path, stages: list[str] | None = None, fresh: bool = False,
    executor: Executor | None = None, progress: bool = True, graph: StageGraph | None = None,
) -> RunContext:
    """Run the selected stages in order (all by default), resuming what is done.

    `executor`: how units and DDP jobs run, made by the caller (the CLI uses `workers.make_executor`);
    None = the in-process `LocalExecutor`, closed at the end. An executor passed in is left open.
    `graph`: the stages (default: the pipeline's).
    """
    graph = graph or pipeline_graph()
    names = graph.select(stages)
    ctx = open_context(cfg, run_dir, graph)
    prepare(ctx, fresh, graph)
    handler = _log_to_file(ctx)
    own_executor = executor is None
    if executor is None:
        if cfg.executor.kind == "ray":
            log.warning("executor.kind=ray, but no executor was passed to run_pipeline: running in this process "
                        "(the caller makes the executor, e.g. workers.make_executor(cfg))")
        executor = LocalExecutor(max_attempts=cfg.executor.max_attempts)
    try:
        for name in names:
            run_stage(ctx, graph.get(name), executor, progress=progress)
    finally:
        if own_executor:
            executor.close()
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
    return ctx


def _log_to_file(ctx: RunContext) -> logging.Handler | None:
    """Copy the driver's log into RUN_DIR/logs/driver.log for the duration of the run (returns the handler)."""
    path = ctx.path("logs", "driver.log")
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    if any(isinstance(h, logging.FileHandler) and h.baseFilename == str(path.resolve()) for h in root.handlers):
        return None
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    return handler


def status(cfg: Config, run_dir: Path, graph: StageGraph | None = None) -> list[StageStatus]:
    """Per stage: done / failed / pending units and whether the config hash matches."""
    graph = graph or pipeline_graph()
    ctx = open_context(cfg, run_dir, graph)
    store = ctx.store
    out = []
    for stage in graph.stages:
        name = stage.name
        st = StageStatus(name)
        h = ctx.hashes[name]
        recs = store.records(name)
        st.done = sum(r.config_hash == h for r in recs)
        st.stale_records = len(recs) - st.done
        st.failed = len(store.failures(name))
        st.complete = store.stage_done(name, h)
        st.hash_state = "changed" if store.stale_hashes(name, h) else ("current" if recs or st.complete else "none")
        try:
            deps_ok = all(store.stage_done(d, ctx.hashes[d]) for d in stage.depends_on)
            if deps_ok:
                st.pending = len(stage.plan(ctx)) - st.done
        except Exception as exc:  # noqa: BLE001 - status must not crash on a half-made run
            st.notes.append(f"cannot plan: {exc}")
        out.append(st)
    return out
