"""The runner: hashes, resume checks, planning, executing and committing units.

The stages come from a `StageGraph` (the pipeline's by default), run in the order derived from their
`depends_on`. Units run through the executor the caller passes (`run_pipeline(..., executor=...)`;
the in-process `LocalExecutor` by default): the runner never picks Ray itself, so `pipeline` does not
import `workers`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pipeline.run.stages  # noqa: F401 - registers the built-in stages
from manifests.schema import FileRef, Record
from manifests.store import STAGE_RECORD, RunDirBusy, atomic_write_text, run_dir_lock
from manifests.verify import ALWAYS_HASHED, DigestCache, stage_inputs
from manifests.verify import record_problems as verify_records
from pipeline import __version__
from pipeline.config import Config, ConfigError
from pipeline.core.errors import RunDirInUse
from pipeline.run.base import Executor, Outcome, RunContext, Stage
from pipeline.run.executors import LocalExecutor
from pipeline.run.graph import StageGraph, pipeline_graph
from pipeline.run.runlog import log_to_file

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
    """Each stage's hash covers its own config sections and the hashes of the stages it depends on under `cfg`
    (`StageGraph.hashes`)."""
    return (graph or pipeline_graph()).hashes(cfg)


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
    damaged: int = 0  # current records whose files are missing or changed: the next run redoes them
    notes: list[str] = field(default_factory=list)


def open_context(cfg: Config, run_dir: Path, graph: StageGraph | None = None) -> RunContext:
    """Context for `run_dir` with this config's hashes and the run id (kept across reruns)."""
    run_dir = Path(run_dir)
    run_id = ""
    existing = run_dir / "config.json"
    if existing.exists():
        try:
            run_id = json.loads(existing.read_text()).get("run_id", "")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise ConfigError(f"{existing} is corrupt ({exc}); restore it, or delete it to let `distill run` "
                              "write it again (with a new run id)") from None
    run_id = run_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    graph = graph or pipeline_graph()
    return RunContext(run_dir=run_dir, config=cfg, run_id=run_id, hashes=graph.hashes(cfg),
                      code_version=code_version(), graph=graph, run_pipeline=run_pipeline)


def changed_stages(ctx: RunContext, graph: StageGraph | None = None) -> list[str]:
    """Stages with records made under another config hash."""
    store = ctx.store
    return [n for n in (graph or pipeline_graph()).names if store.stale_hashes(n, ctx.hashes[n])]


def prepare(ctx: RunContext, fresh: bool, graph: StageGraph | None = None, stages: list[str] | None = None) -> None:
    """Refuse a changed config, or changed inputs of the `stages` to run (all by default; the data folder of
    ingest), unless `fresh`; with `fresh`, forget the changed stages' work (and, for changed inputs, the
    work of every stage after them)."""
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
        _clear(ctx, graph.get(name))
    for stage in graph.stages:
        changes = stage.input_changes(ctx) if stage.name in graph.select(stages) else []
        if changes and not fresh:
            raise ConfigError(f"the inputs of stage '{stage.name}' changed since it ran in {ctx.run_dir}: "
                              f"{'; '.join(changes)}. Pass --fresh to redo it and every stage after it, or use a "
                              "new --run-dir")
        for name in [stage.name, *downstream(graph, stage.name)] if changes else []:
            if (ctx.store.root / name).is_dir():
                log.warning("--fresh: discarding stage %s (the inputs of stage %s changed)", name, stage.name)
            _clear(ctx, graph.get(name), resume=True)
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    resolved = {"run_id": ctx.run_id, **ctx.config.to_dict()}
    atomic_write_text(ctx.path("config.json"), json.dumps(resolved, indent=1, sort_keys=True))


def _clear(ctx: RunContext, stage: Stage, resume: bool = False) -> None:
    """Forget a stage: its records, its output folders and (`resume`) the checkpoints its job resumes from."""
    ctx.store.clear(stage.name)
    for d in stage.output_dirs:
        shutil.rmtree(ctx.path(d), ignore_errors=True)
    for f in stage.resume_files(ctx) if resume else ():
        ctx.path(f).unlink(missing_ok=True)


def upstream(graph: StageGraph, name: str) -> list[str]:
    """The stages `name` depends on, directly or not, in run order."""
    need: set[str] = set()
    todo = list(graph.get(name).depends_on)
    while todo:
        d = todo.pop()
        if d not in need:
            need.add(d)
            todo.extend(graph.get(d).depends_on)
    return [n for n in graph.names if n in need]


def downstream(graph: StageGraph, name: str) -> list[str]:
    """The stages that depend on `name`, directly or not, in run order."""
    return [n for n in graph.names if name in upstream(graph, n)]


def current_records(ctx: RunContext, name: str) -> list[Record]:
    """The stage's records made under the current config hash, its stage record (when there is one) last."""
    h, store = ctx.hashes[name], ctx.store
    recs = [r for r in store.records(name) if r.config_hash == h]
    stage_rec = store.load(name, STAGE_RECORD)
    return recs + ([stage_rec] if stage_rec is not None and stage_rec.config_hash == h else [])


def read_stages(ctx: RunContext, stage: Stage, graph: StageGraph) -> list[str]:
    """The upstream stages whose files `stage` reads, in run order (`Stage.read_stages`; default: all)."""
    reads = stage.read_stages(ctx)
    return upstream(graph, stage.name) if reads is None else [n for n in graph.names if n in reads]


def input_refs(ctx: RunContext, stage: Stage, graph: StageGraph) -> list[FileRef]:
    """What the units of `stage` read: the output files of its read stages (`manifests.verify.stage_inputs`)."""
    ups = read_stages(ctx, stage, graph)
    return list(dict.fromkeys(ref for up in ups for ref in stage_inputs(up, current_records(ctx, up), STAGE_RECORD)))


def record_problems(ctx: RunContext, stage: Stage, graph: StageGraph, digests: DigestCache | None = None,
                    always: tuple[str, ...] = ALWAYS_HASHED) -> list[tuple[Record, list[str], bool]]:
    """The stage's current records with missing or changed files, or inputs that changed upstream since they
    ran: (record, what is wrong, whether an input changed); see `manifests.verify.record_problems`."""
    return verify_records(ctx.run_dir, current_records(ctx, stage.name), input_refs(ctx, stage, graph), digests, always)


@dataclass
class Checked:
    """What this driver has verified so far: the stages (checked or run) and the file digests."""

    stages: set[str] = field(default_factory=set)
    digests: DigestCache = field(default_factory=dict)


def _refresh(ctx: RunContext, stage: Stage, graph: StageGraph, checked: Checked) -> None:
    """Discard the stage's records whose outputs or inputs changed, with a warning: their units run again."""
    for rec, wrong, stale in record_problems(ctx, stage, graph, checked.digests):
        what = "its stage record is written again" if rec.unit == STAGE_RECORD else "its unit runs again"
        log.warning("stage %s unit %s: %s: the record is discarded and %s", stage.name, rec.unit, "; ".join(wrong),
                    what)
        ctx.store.discard(stage.name, rec.unit)
        for f in stage.resume_files(ctx) if stale else ():  # a job must not resume from work on other inputs
            ctx.path(f).unlink(missing_ok=True)


def _check_upstream(ctx: RunContext, stage: Stage, graph: StageGraph, checked: Checked) -> None:
    """ConfigError naming the file when a stage whose files `stage` reads, not run now, has a missing or changed one."""
    for up in read_stages(ctx, stage, graph):
        if up in checked.stages:
            continue
        problems = record_problems(ctx, graph.get(up), graph, checked.digests)
        if problems:
            rec, wrong, _ = problems[0]
            raise ConfigError(
                f"stage '{stage.name}' needs the work of stage '{up}' in {ctx.run_dir}, but for its unit {rec.unit} "
                f"the {wrong[0]}; run again with --stages including {up} (or without --stages): its record is "
                "then discarded and the unit recomputed")
        checked.stages.add(up)


def _record(ctx: RunContext, stage: str, outcome: Outcome, inputs: tuple[FileRef, ...] | list[FileRef] = ()) -> Record:
    result = outcome.result
    usage = outcome.usage_error.replace("\n", " | ")
    error = f"config error: {usage}\n{outcome.error}" if usage else outcome.error
    return Record(
        run_id=ctx.run_id, stage=stage, unit=outcome.unit.key, status="done" if outcome.ok else "failed",
        config_hash=ctx.hashes[stage], seed=ctx.unit_seed(stage, outcome.unit.key),
        inputs=tuple(dict.fromkeys([*(result.inputs if result else ()), *inputs])),
        outputs=tuple(result.outputs) if result else (),
        metrics=dict(result.metrics) if result else {}, code_version=ctx.code_version,
        host=outcome.host or socket.gethostname(), attempt=outcome.attempt, started=outcome.started,
        ended=outcome.ended, error=error,
    )


def run_stage(ctx: RunContext, stage: Stage | str, executor: Executor, progress: bool = True,
              graph: StageGraph | None = None, checked: Checked | None = None) -> dict[str, Any]:
    """Check inputs, plan, skip what is done, run the rest, commit records, finalize. Returns stage metrics.

    `stage`: a stage object or the name of a stage of `graph` (default: the pipeline's). Units of a
    distributed stage go to `executor`; the others run here, in the driver, where a DDP job reaches
    `executor.launch_ddp` through `ctx.executor`. Before planning, the upstream stages' output files are
    checked (ConfigError naming a missing or changed one; `checked` holds the stages already checked or run
    by this driver) and this stage's records whose files changed are discarded, so their units run again.
    """
    graph = graph or pipeline_graph()
    stage = graph.get(stage) if isinstance(stage, str) else stage
    checked = checked if checked is not None else Checked()
    name = stage.name
    # the caller's context is left as it was
    ctx = dataclasses.replace(ctx, executor=executor, graph=ctx.graph or graph,
                              run_pipeline=ctx.run_pipeline or run_pipeline)
    store = ctx.store
    for dep in stage.dependencies(ctx.config):
        if not store.stage_done(dep, ctx.hashes[dep]):
            raise ConfigError(
                f"stage '{name}' needs stage '{dep}', which has not completed for this configuration in "
                f"{ctx.run_dir}; run it first (add it to --stages)"
            )
    _check_upstream(ctx, stage, graph, checked)
    _refresh(ctx, stage, graph, checked)
    inputs = input_refs(ctx, stage, graph)
    t0 = time.time()
    stage.validate(ctx)
    units = stage.plan(ctx)
    done = store.done_keys(name, ctx.hashes[name])
    pending = [u for u in units if u.key not in done]
    log.info("stage %s: %d units, %d done, %d to run", name, len(units), len(units) - len(pending), len(pending))
    failures: list[Record] = []
    unwritten: list[str] = []  # failure records that could not be written (disk full...)
    if pending:
        bar = _progress(name, len(units), len(units) - len(pending), progress)
        produced = [0]  # images made by this stage's units so far (shown beside the unit count and ETA)

        def on_outcome(outcome: Outcome) -> None:
            rec = _record(ctx, name, outcome, inputs)
            if outcome.ok:
                try:
                    store.commit(rec)
                except OSError as exc:  # the work is done but not recorded: it is not done
                    rec = dataclasses.replace(rec, status="failed", error=f"its record could not be written: {exc}")
                    log.error("stage %s unit %s: %s", name, rec.unit, rec.error)
                    failures.append(rec)
                    return
                produced[0] += int(rec.metrics.get("images", 0) or 0)
                if produced[0]:
                    bar.set_postfix(images=produced[0], refresh=False)
                bar.update(1)
                return
            failures.append(rec)
            if outcome.usage_error:  # bad input: the CLI prints the message; the traceback stays in the record
                log.debug("stage %s unit %s: %s", name, rec.unit, rec.error)
            else:
                log.error("stage %s unit %s failed (attempt %d):\n%s", name, rec.unit, rec.attempt, rec.error)
            try:
                store.fail(rec)
            except OSError as exc:  # the error itself has been logged above and is in the StageFailed message
                unwritten.append(str(exc))
                log.error("stage %s unit %s: its failure record could not be written: %s", name, rec.unit, exc)

        try:
            if stage.is_distributed(ctx):
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
        where = (f"their failure records could not be written ({unwritten[0]})" if unwritten else
                 f"tracebacks are in {store.root / name}/*.failed.json")
        raise StageFailed(
            f"stage '{name}': {len(missing)} of {len(units)} units failed ({', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}); last error: {first}. {where[0].upper()}{where[1:]}; fix the "
            "cause and run again: finished units are kept."
        )
    metrics = stage.finalize(ctx)
    metrics = {"units": len(units), "ran": len(pending), "wall_s": round(time.time() - t0, 3), **metrics}
    prev = store.load(name, STAGE_RECORD)
    if prev is not None and prev.config_hash == ctx.hashes[name] and not pending:
        metrics["wall_s"] = prev.metrics.get("wall_s", metrics["wall_s"])
    store.commit(Record(
        run_id=ctx.run_id, stage=name, unit=STAGE_RECORD, status="done", config_hash=ctx.hashes[name],
        seed=ctx.config.seed, outputs=tuple(ctx.ref(p) for p in stage.stage_files(ctx)), metrics=metrics,
        code_version=ctx.code_version, host=socket.gethostname(), started=t0, ended=time.time(),
    ))
    checked.stages.add(name)
    return metrics


def _progress(name: str, total: int, initial: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=f"{name:>8}", unit="unit", disable=not enabled,
                dynamic_ncols=True, leave=True)


def refuse_run_dir_in_data(cfg: Config, run_dir: Path) -> None:
    """A ConfigError, before anything is created, when the run directory is the data folder or inside it: ingest
    would list it as a class folder (or its files as images) and the run would write into the user's data."""
    if cfg.data.source == "demo":
        return
    src, run = Path(cfg.data.source).resolve(), Path(run_dir).resolve()
    if run == src or src in run.parents:
        raise ConfigError(f"the run directory {run_dir} is inside the data folder {cfg.data.source}: ingest would "
                          "read it as data and the run would write into your data; choose a run directory outside "
                          "the data folder")


def run_pipeline(
    cfg: Config, run_dir: Path, stages: list[str] | None = None, fresh: bool = False,
    executor: Executor | None = None, progress: bool = True, graph: StageGraph | None = None,
    on_busy: Callable[[str], None] | None = None,
) -> RunContext:
    """Run the selected stages in order (all by default), resuming what is done.

    `executor`: how units and DDP jobs run, made by the caller (the CLI uses `workers.make_executor`);
    None = the in-process `LocalExecutor`, closed at the end. An executor passed in is left open.
    `graph`: the stages (default: the pipeline's).
    `on_busy`: None = a run directory another live driver holds is a RunDirInUse error (exit 2 on the CLI); a
    callable = it is called once with the holder's description, then the run waits for the directory (callers
    that share a run directory on purpose: the random-real baseline, the sanity table's teachers).
    """
    graph = graph or pipeline_graph()
    names = graph.select(stages)
    refuse_run_dir_in_data(cfg, Path(run_dir))
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    try:
        with run_dir_lock(Path(run_dir), on_busy):  # one driver per run directory, held until the end of the run
            return _run_locked(cfg, Path(run_dir), names, fresh, executor, progress, graph)
    except RunDirBusy as exc:
        raise RunDirInUse(str(exc)) from None


def _run_locked(cfg: Config, run_dir: Path, names: list[str], fresh: bool, executor: Executor | None,
                progress: bool, graph: StageGraph) -> RunContext:
    ctx = open_context(cfg, run_dir, graph)
    prepare(ctx, fresh, graph, names)
    close_log = log_to_file(ctx.path("logs", "driver.log"))
    own_executor = executor is None
    if executor is None:
        if cfg.executor.kind == "ray":
            log.warning("executor.kind=ray, but no executor was passed to run_pipeline: running in this process "
                        "(the caller makes the executor, e.g. workers.make_executor(cfg))")
        executor = LocalExecutor(max_attempts=cfg.executor.max_attempts)
    checked = Checked()
    try:
        for name in names:
            run_stage(ctx, graph.get(name), executor, progress=progress, graph=graph, checked=checked)
    finally:
        if own_executor:
            executor.close()
        close_log()
    return ctx


def status(cfg: Config, run_dir: Path, graph: StageGraph | None = None) -> list[StageStatus]:
    """Per stage: done / failed / pending units and whether the config hash matches."""
    graph = graph or pipeline_graph()
    ctx = open_context(cfg, run_dir, graph)
    store = ctx.store
    out, digests = [], {}
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
        problems = record_problems(ctx, stage, graph, digests, always=())  # sizes; sha256 up to HASH_LIMIT
        if problems:
            st.damaged, st.complete = len(problems), False
            st.done -= sum(r.unit != STAGE_RECORD for r, _, _ in problems)
            st.notes.append(f"{'; '.join(f'unit {r.unit}: ' + '; '.join(w) for r, w, _ in problems[:3])}"
                            f"{' ...' if len(problems) > 3 else ''}: the next run recomputes "
                            f"{'it' if len(problems) == 1 else 'them'}")
        try:
            deps_ok = all(store.stage_done(d, ctx.hashes[d]) for d in stage.dependencies(cfg))
            if deps_ok:
                st.pending = len(stage.plan(ctx)) - st.done
        except Exception as exc:  # noqa: BLE001 - status must not crash on a half-made run
            st.notes.append(f"cannot plan: {exc}")
        out.append(st)
    return out
