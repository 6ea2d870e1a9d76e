"""The Stage base class, units of work, the run context shared by driver and workers, and the Executor protocol."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from manifests.schema import FileRef
from manifests.store import ManifestStore
from pipeline.config import Config
from pipeline.core.seeding import derive_seed

JobSpec = TypeVar("JobSpec")


@dataclass(frozen=True)
class Unit:
    """One idempotent piece of a stage: a deterministic key and a JSON-able payload."""

    key: str
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass
class UnitResult:
    """What a worker returns for a unit: hashed output (and input) files and metrics."""

    outputs: list[FileRef] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    inputs: list[FileRef] = field(default_factory=list)


@dataclass
class Outcome:
    """A unit's result or its error, with timing and where it ran."""

    unit: Unit
    result: UnitResult | None
    error: str = ""
    attempt: int = 1
    started: float = 0.0
    ended: float = 0.0
    host: str = ""
    usage_error: str = ""  # a ConfigError's message: bad input, not worth retrying

    @property
    def ok(self) -> bool:
        return self.result is not None


@dataclass
class RunContext:
    """Everything a stage needs; picklable so it can travel to Ray actors.

    `executor` is the driver's executor, through which a stage running in the driver launches its DDP job
    (`pipeline.run.stages.common.launch`). `graph` (the run's `pipeline.run.graph.StageGraph`) and
    `run_pipeline` (`pipeline.run.runner.run_pipeline`) are what the runner hands the stages that run in the
    driver and need them: the stage order (evaluate) and a pipeline of its own (the random-real baseline), so
    that no stage imports the runner. All three are set by the runner and never pickled: an executor holds
    driver-side state (a Ray connection, actor handles) that means nothing in another process, and the stages
    that run in actors (ingest, recover, relabel, train cells) use none of them.
    """

    run_dir: Path
    config: Config
    run_id: str
    hashes: dict[str, str] = field(default_factory=dict)
    code_version: str = ""
    executor: Executor | None = field(default=None, repr=False, compare=False)
    graph: Any = field(default=None, repr=False, compare=False)
    run_pipeline: Callable[..., RunContext] | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "executor": None, "graph": None, "run_pipeline": None}

    @property
    def store(self) -> ManifestStore:
        return ManifestStore(self.run_dir)

    def path(self, *parts: str) -> Path:
        return Path(self.run_dir).joinpath(*parts)

    def unit_seed(self, stage: str, key: str) -> int:
        return derive_seed(self.config.seed, stage, key)

    def ref(self, path: Path) -> FileRef:
        return FileRef.of(Path(path), Path(self.run_dir))


class UnitWorker(Protocol):
    def run(self, unit: Unit) -> UnitResult: ...

    def close(self) -> None: ...


class Stage:
    """Base class of the stages. Subclasses set the class attributes and override methods.

    - `sections`: config sections in this stage's hash (with the upstream hashes).
    - `depends_on`: every stage this one may depend on; the run order is derived from it
      (`pipeline.run.graph.StageGraph`). `dependencies(cfg)` is the part a configuration actually uses: those
      stages must be complete first and their hashes are part of this stage's hash.
    - `distributed`: units go through the executor (local or Ray actors); otherwise the
      driver runs them itself (a DDP job launches its ranks through `ctx.executor.launch_ddp`).
    - `needs_gpu`: a Ray actor for this stage asks for one GPU when the cluster has GPUs.
    - `reads`: upstream stages whose output files the units read (None: every upstream stage, transitively).
      The runner checks those files before the stage runs and lists them as each record's inputs.
    """

    name: str = ""
    depends_on: tuple[str, ...] = ()
    sections: tuple[str, ...] = ()
    distributed: bool = False
    needs_gpu: bool = False
    output_dirs: tuple[str, ...] = ()  # folders under the run dir that --fresh clears with the stage's records
    reads: tuple[str, ...] | None = None

    def dependencies(self, cfg: Config) -> tuple[str, ...]:
        """The stages of `depends_on` this configuration uses (default: all): they must be complete before this
        stage runs, and their hashes enter this stage's hash. A stage whose inputs depend on its configuration
        (recover: the teacher only for methods that use it) overrides this; the result must be a subset of
        `depends_on`, which alone orders the stages."""
        return self.depends_on

    def read_stages(self, ctx: RunContext) -> tuple[str, ...] | None:
        """The upstream stages whose files this run of the stage reads (default: `reads`); a stage whose reads
        depend on the config (recover: the teacher only for methods that use it) overrides this."""
        return self.reads

    def is_distributed(self, ctx: RunContext) -> bool:
        """Whether this run of the stage sends its units through the executor (default: `distributed`); the train
        stage does when its matrix has several cells."""
        return self.distributed

    def gpus_per_actor(self, cfg: Config) -> float:
        """GPUs each Ray actor of the stage asks for when the cluster has GPUs (`needs_gpu`); a fraction lets
        several actors share one."""
        return 1.0

    def resume_files(self, ctx: RunContext) -> tuple[str, ...]:
        """Files (under the run dir) a job resumes from: deleted when its inputs change, so that a rerun starts
        over instead of resuming work made from other inputs. By convention `checkpoints/<stage>-last.pt` for
        the driver-side DDP jobs; none for distributed stages."""
        return () if self.distributed else (f"checkpoints/{self.name}-last.pt",)

    def stage_files(self, ctx: RunContext) -> list[Path]:
        """Files `finalize` writes that later stages read: listed (hashed) in the stage record."""
        return []

    def input_changes(self, ctx: RunContext) -> list[str]:
        """What changed in the stage's inputs from outside the run directory (the data folder) since its
        records were made; one phrase per change. A rerun with changes is refused unless --fresh."""
        return []

    def validate(self, ctx: RunContext) -> None:
        """Check inputs before any work starts; raise ConfigError with a clear message."""

    def plan(self, ctx: RunContext) -> list[Unit]:
        raise NotImplementedError

    def open_worker(self, ctx: RunContext) -> UnitWorker:
        """A worker that runs units; created once per process or actor."""
        raise NotImplementedError

    def finalize(self, ctx: RunContext) -> dict[str, Any]:
        """Runs in the driver when every unit is done; returns stage-level metrics."""
        return {}


class Executor(Protocol):
    """Runs units of distributed stages and launches DDP jobs (`pipeline.run.executors.LocalExecutor` in this process,
    `workers.ray_executor.RayExecutor` on a Ray cluster)."""

    def run_units(
        self, stage: Stage, ctx: RunContext, units: list[Unit], on_outcome: Callable[[Outcome], None]
    ) -> None:
        """Run `units` of `stage`; call `on_outcome` exactly once per unit (its success or its last failure)."""
        ...

    def launch_ddp(self, fn: Callable[[JobSpec], dict[str, Any]], spec: JobSpec, workers: int) -> dict[str, Any]:
        """Run the job `fn(spec)` on `workers` DDP ranks (0 = one per GPU) and return rank 0's value.

        `fn` is a module-level function and `spec` a picklable job spec: both cross process boundaries.
        """
        ...

    def close(self) -> None:
        """Release what the executor holds (actors, a cluster it started)."""
        ...
