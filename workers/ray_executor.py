"""Ray executor: units of a distributed stage run on Ray actors fed from a `ray.wait` work queue.

How it works:

- `workers.cluster.connect_ray` joins an existing cluster (already initialised, inside a Ray job,
  RAY_ADDRESS, or `executor.address` = "auto" / host:port / ray://...) or starts a private local one
  (loopback only, private auth token, stopped with the driver: see `workers.cluster`).
- Resources are decided *before* any actor exists: GPU actors (`num_gpus=1`, or the stage's
  `gpus_per_actor` share: the train stage's `eval.gpus_per_student`) only when the stage needs a GPU and
  the cluster has GPUs; otherwise CPU actors sized by `executor.cpus_per_worker`. So no actor ever
  waits for a GPU that does not exist.
- Actors are plain `UnitActor` objects wrapped with `ray.remote(...).options(...)` at submit time. A unit
  goes only to an actor that has started (answered `ready`), one unit in flight per actor.
- A unit that raises is retried up to `executor.max_attempts` times. An actor that dies (crash, `ray.kill`,
  OOM kill, lost node) is replaced by a fresh one and its unit requeued, counting an attempt.
- Stages are found inside actors by reference: the registry name (`get_stage`) for pipeline stages,
  `module:attr` for any other stage object bound to a module-level name (see `stage_ref`).
- DDP jobs (`launch_ddp`) run on Ray Train in the same cluster (`workers.ray_train`).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import ray
from ray import exceptions as rex

import pipeline.run.stages  # noqa: F401 - registers the built-in stages (in every actor too)
from pipeline.config import Config
from pipeline.run.base import Outcome, RunContext, Stage, Unit
from pipeline.run.executors import execute
from pipeline.run.graph import get_stage
from workers.cluster import connect_ray, describe_cluster, disconnect_ray

JobSpec = TypeVar("JobSpec")

log = logging.getLogger(__name__)

StageRef = str | Stage
"""A registry name, a 'module:attr' path, or (last resort) the stage object itself (pickled by value)."""

# Errors that mean the actor process is gone: replace the actor, requeue the unit.
ACTOR_LOST_ERRORS: tuple[type[BaseException], ...] = (
    rex.RayActorError,  # includes ActorDiedError, ActorUnavailableError
    rex.WorkerCrashedError,
    rex.OutOfMemoryError,
    rex.NodeDiedError,
    rex.LocalRayletDiedError,
)


def _max_node_resource(name: str) -> float:
    """The largest amount of `name` on any one live node (an actor must fit on one node)."""
    best = 0.0
    for node in ray.nodes():
        if node.get("Alive", node.get("alive", False)):
            best = max(best, float(node.get("Resources", {}).get(name, 0.0)))
    return best


# ------------------------------------------------------------------------------------------ stage lookup

def stage_ref(stage: Stage) -> StageRef:
    """How an actor (another process) finds `stage`.

    - a registered pipeline stage: its name, looked up with `get_stage` in the actor;
    - a stage with an `import_path` attribute ('module:attr'): that path;
    - a stage bound to a module-level name in an importable module: 'module:attr', found automatically;
    - anything else (e.g. defined in `__main__`): the object itself, pickled by value by Ray.
    """
    try:
        if get_stage(stage.name) is stage:
            return stage.name
    except KeyError:
        pass
    path = getattr(stage, "import_path", "")
    if path:
        return str(path)
    module_name = type(stage).__module__
    module = sys.modules.get(module_name)
    if module is not None and module_name != "__main__":
        for attr, value in vars(module).items():
            if value is stage:
                return f"{module_name}:{attr}"
    return stage


def resolve_stage(ref: StageRef) -> Stage:
    """The stage object that `ref` (from `stage_ref`) names, in this process."""
    if isinstance(ref, Stage):
        return ref
    if ":" in ref:
        module_name, attr = ref.split(":", 1)
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj
    return get_stage(ref)


# ---------------------------------------------------------------------------------------------- actor

class UnitActor:
    """Runs the units of one stage in its own process. Wrapped with `ray.remote` at submit time."""

    def __init__(self, ref: StageRef, ctx: RunContext, threads: int, gpu_share: float = 0.0) -> None:
        self._ref = ref
        self._ctx = ctx
        self._worker: Any = None
        self._threads = max(1, int(threads))
        if 0 < gpu_share < 1:  # a student sharing a GPU is charged its share of it (pipeline.run.cost)
            from pipeline.run.cost import GPU_SHARE_ENV

            os.environ[GPU_SHARE_ENV] = str(gpu_share)
        progress = logging.getLogger("pipeline.run.unit_state")  # a long unit's saves and resumes: its progress,
        if not progress.handlers:  # on the actor's stderr, which Ray forwards to the driver's console
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            progress.addHandler(handler)
            progress.setLevel(logging.INFO)
            progress.propagate = False
        try:
            import torch

            torch.set_num_threads(self._threads)
        except ImportError:  # pragma: no cover - torch is a dependency
            pass

    def ready(self) -> dict[str, Any]:
        """Where this actor runs (answering at all means it was scheduled and started)."""
        import socket

        gpus = ray.get_gpu_ids()
        return {"pid": os.getpid(), "host": socket.gethostname(), "gpus": [str(g) for g in gpus],
                "threads": self._threads}

    def run(self, unit: Unit, attempt: int) -> Outcome:
        """Run one unit; opens the stage worker on first use. Exceptions come back as failed Outcomes."""
        if self._worker is None:
            started = time.time()
            try:
                self._worker = resolve_stage(self._ref).open_worker(self._ctx)
            except Exception as exc:  # noqa: BLE001 - reported in the unit's failure record
                import socket

                error = "could not open the stage worker:\n" + "".join(traceback.format_exception(exc))
                return Outcome(unit, None, error=error, attempt=attempt, started=started, ended=time.time(),
                               host=socket.gethostname())
        return execute(self._worker, unit, attempt)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None


# -------------------------------------------------------------------------------------------- planning

@dataclass(frozen=True)
class ActorPlan:
    """How many actors a stage gets and what each one asks Ray for."""

    count: int
    num_cpus: float
    num_gpus: float
    threads: int

    @property
    def kind(self) -> str:
        return "GPU" if self.num_gpus else "CPU"


def plan_actors(stage: Stage, cfg: Config, num_units: int, cluster: dict[str, float],
                max_node_cpus: float | None = None) -> ActorPlan:
    """Decide the actors from the cluster's resources, before creating any.

    GPU actors (one GPU each, one per GPU, capped by `executor.num_workers`) only when the stage needs a GPU
    and the cluster has one; otherwise CPU actors with `executor.cpus_per_worker` cores each, as many as fit
    in the cluster (or `executor.num_workers`, capped to what fits). Never more actors than units.
    """
    rc = cfg.executor
    cpus = float(cluster.get("CPU", 0.0))
    gpus = int(cluster.get("GPU", 0.0))
    node_cpus = cpus if max_node_cpus is None else max_node_cpus
    units = max(1, num_units)
    if stage.needs_gpu and gpus > 0:
        share = min(1.0, float(stage.gpus_per_actor(cfg)))  # a fraction: that many actors share each GPU
        slots = int(gpus / share + 1e-9)
        count = min(slots, rc.num_workers or slots, units)
        per = float(rc.cpus_per_worker)
        if count * per > cpus or per > node_cpus:
            per = float(int(cpus // count)) if cpus >= count else 0.0
        return ActorPlan(count=count, num_cpus=per, num_gpus=share, threads=max(1, int(per or 1)))
    per = float(rc.cpus_per_worker)
    if node_cpus and per > node_cpus:
        log.warning("executor.cpus_per_worker=%d exceeds the largest node (%g CPUs); using %g",
                    rc.cpus_per_worker, node_cpus, node_cpus)
        per = node_cpus
    fit = max(1, int(cpus // per)) if cpus else 1
    wanted = rc.num_workers or fit
    if wanted > fit:
        log.warning("executor.num_workers=%d actors of %g CPUs do not fit in %g CPUs; using %d",
                    wanted, per, cpus, fit)
    return ActorPlan(count=min(wanted, fit, units), num_cpus=per, num_gpus=0, threads=max(1, int(per)))


# ------------------------------------------------------------------------------------------- executor

class RayExecutor:
    """Runs a distributed stage's units on Ray actors, retrying failed units and replacing dead actors, and
    DDP jobs on Ray Train; implements `pipeline.run.executors.Executor`."""

    #: seconds between "still waiting" log lines while actors wait to be scheduled
    wait_log_s: float = 60.0

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.max_attempts = max(1, cfg.executor.max_attempts)
        self._owns_cluster = False
        self._connected = False
        self._actors: list[Any] = []  # live actor handles of the stage now running
        self._actor_class: Any = None
        self._running: dict[Any, tuple[Any, Unit, int]] = {}

    # -- connection ---------------------------------------------------------------------------------
    def connect(self) -> None:
        """Join or start the Ray cluster (idempotent)."""
        if self._connected and ray.is_initialized():
            return
        self._owns_cluster = connect_ray(self.cfg.executor) or self._owns_cluster
        self._connected = True

    def close(self) -> None:
        """Kill leftover actors; shut Ray down only when this executor started the cluster."""
        self._kill_all()
        disconnect_ray(self._owns_cluster)  # a private cluster: stopped, with every process it started
        self._owns_cluster = False
        self._connected = False

    def launch_ddp(self, fn: Callable[[JobSpec], dict[str, Any]], spec: JobSpec, workers: int) -> dict[str, Any]:
        """Run `fn(spec)` on Ray Train in this executor's cluster (`workers` 0 = one per GPU; 1 without GPUs)."""
        from workers.ray_train import launch_on_cluster

        self.connect()
        return launch_on_cluster(fn, spec, workers)

    @property
    def actors(self) -> list[Any]:
        """Handles of the actors of the stage now running (a copy; for monitoring and tests)."""
        return list(self._actors)

    def in_flight(self) -> dict[str, Any]:
        """Unit key -> actor handle for the units running now, oldest submission first (monitoring, tests)."""
        return {unit.key: actor for actor, unit, _ in list(self._running.values())}

    # -- actors ---------------------------------------------------------------------------------------
    def _new_actor(self, plan: ActorPlan, ref: StageRef, ctx_ref: Any) -> Any:
        if self._actor_class is None:
            self._actor_class = ray.remote(UnitActor)
        handle = self._actor_class.options(
            num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, max_restarts=0, max_task_retries=0,
        ).remote(ref, ctx_ref, plan.threads, plan.num_gpus)
        self._actors.append(handle)
        return handle

    def _drop(self, handle: Any) -> None:
        if handle in self._actors:
            self._actors.remove(handle)
        try:
            ray.kill(handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead
            pass

    def _kill_all(self, started: list[Any] | None = None) -> None:
        if started:
            refs = [a.close.remote() for a in started if a in self._actors]
            try:
                ray.wait(refs, num_returns=len(refs), timeout=30)
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        for handle in list(self._actors):
            self._drop(handle)

    # -- the work queue ---------------------------------------------------------------------------------
    def run_units(
        self, stage: Stage, ctx: RunContext, units: list[Unit], on_outcome: Callable[[Outcome], None]
    ) -> None:
        """Run `units`; call `on_outcome` once per unit with its success or its last failure."""
        if not units:
            return
        self.connect()
        cluster = ray.cluster_resources()
        plan = plan_actors(stage, self.cfg, len(units), cluster, _max_node_resource("CPU"))
        if stage.needs_gpu and plan.kind == "CPU":
            log.warning("stage %s: the cluster has no GPU; running on CPU actors", stage.name)
        log.info("stage %s: %d %s actor(s) (%g CPU, %g GPU each) for %d units; %s", stage.name, plan.count,
                 plan.kind, plan.num_cpus, plan.num_gpus, len(units), describe_cluster())
        ref = stage_ref(stage)
        # Actors may run in another working directory: give them an absolute run directory.
        # The driver's executor stays here (it is never pickled with a context anyway).
        ctx_ref = ray.put(dataclasses.replace(ctx, run_dir=Path(ctx.run_dir).resolve(), executor=None))

        pending: deque[tuple[Unit, int]] = deque((u, 1) for u in units)
        starting: dict[Any, Any] = {}  # ready() ref -> actor
        running: dict[Any, tuple[Any, Unit, int]] = {}  # run() ref -> (actor, unit, attempt)
        self._running = running
        idle: list[Any] = []
        started: list[Any] = []
        remaining = len(units)
        start_failures = 0
        last_progress = time.monotonic()

        def spawn() -> None:
            actor = self._new_actor(plan, ref, ctx_ref)
            starting[actor.ready.remote()] = actor

        def finish(outcome: Outcome) -> None:
            nonlocal remaining
            if outcome.ok or outcome.attempt >= self.max_attempts:
                remaining -= 1
                on_outcome(outcome)
            else:
                log.warning("stage %s unit %s failed (attempt %d of %d), will retry: %s", stage.name,
                            outcome.unit.key, outcome.attempt, self.max_attempts, _last_line(outcome.error))
                pending.append((outcome.unit, outcome.attempt + 1))

        try:
            for _ in range(plan.count):
                spawn()
            while remaining:
                while idle and pending:
                    actor = idle.pop()
                    unit, attempt = pending.popleft()
                    running[actor.run.remote(unit, attempt)] = (actor, unit, attempt)
                waiting = list(running) + list(starting)
                if not waiting:  # cannot happen: every unfinished unit is pending or running on some actor
                    raise RuntimeError(f"stage '{stage.name}': {remaining} units left but no actor to run them")
                done, _ = ray.wait(waiting, num_returns=1, timeout=self.wait_log_s)
                if not done:
                    if starting and time.monotonic() - last_progress >= self.wait_log_s:
                        log.warning("stage %s: %d actor(s) still waiting to be scheduled (need %g CPU, %g GPU "
                                    "each; available now: %s)", stage.name, len(starting), plan.num_cpus,
                                    plan.num_gpus, ray.available_resources())
                    continue
                last_progress = time.monotonic()
                for obj in done:
                    if obj in starting:
                        actor = starting.pop(obj)
                        try:
                            info = ray.get(obj)
                        except Exception as exc:  # noqa: BLE001 - the actor could not start
                            start_failures += 1
                            log.warning("stage %s: an actor failed to start (%s); starting another", stage.name,
                                        _last_line(str(exc)))
                            self._drop(actor)
                            if start_failures > max(3, 2 * plan.count):
                                raise RuntimeError(
                                    f"stage '{stage.name}': Ray actors keep failing to start; last error: {exc}"
                                ) from exc
                            spawn()
                            continue
                        log.debug("stage %s: actor started %s", stage.name, info)
                        started.append(actor)
                        idle.append(actor)
                        continue
                    actor, unit, attempt = running.pop(obj)
                    try:
                        outcome = ray.get(obj)
                    except rex.RayTaskError as exc:  # the actor is alive; the call itself failed
                        outcome = Outcome(unit, None, error=f"ray task failed while running unit {unit.key} "
                                          f"(attempt {attempt}):\n{exc}", attempt=attempt, ended=time.time())
                    except (*ACTOR_LOST_ERRORS, rex.RayError) as exc:  # the actor is gone (or unusable)
                        outcome = _lost_outcome(unit, attempt, exc, self.max_attempts)
                        log.warning("stage %s: %s", stage.name, outcome.error.splitlines()[0])
                        self._drop(actor)
                        if actor in started:
                            started.remove(actor)
                        finish(outcome)
                        if remaining > len(self._actors):  # more units left than live actors: replace it
                            spawn()
                        continue
                    idle.append(actor)
                    finish(outcome)
        finally:
            self._running = {}
            # Idle actors close their workers; busy ones (the stage was interrupted: SIGTERM, Ctrl-C, an error
            # in the driver) would answer only after their unit, so they are killed at once.
            busy = {id(actor) for actor, _, _ in running.values()}
            self._kill_all([a for a in started if id(a) not in busy])


def _lost_outcome(unit: Unit, attempt: int, exc: BaseException, max_attempts: int) -> Outcome:
    """A failed Outcome for a unit whose actor died under it."""
    text = str(exc)
    retry = "it will be retried on a fresh actor" if attempt < max_attempts else "no attempts left"
    # Ray's memory monitor says so explicitly; the generic "worker died" text only lists OOM as a possibility.
    oom = isinstance(exc, rex.OutOfMemoryError) or any(
        s in text.lower() for s in ("node_out_of_memory", "running low on memory", "out of memory"))
    if oom:
        head = (f"out of memory: the actor was killed while running unit {unit.key} (attempt {attempt}); {retry}. "
                "Use fewer or smaller units per actor, or raise executor.cpus_per_worker to give each actor more "
                "of the node")
    else:
        head = f"actor died while running unit {unit.key} (attempt {attempt}); {retry}"
    now = time.time()
    return Outcome(unit, None, error=f"{head}\n{type(exc).__name__}: {text}", attempt=attempt, started=now,
                   ended=now)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
