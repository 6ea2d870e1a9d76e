"""Recover: IPC images per class by a registered method (`pipeline.methods`), over disjoint class shards.

This stage owns what every method shares: the units (class shard x IPC range, or whole class shards for
methods that make a class's images together), the worker's environment (device, teacher, real-image pool),
seeding, PNG encoding, the WebDataset outputs and the image grids. Every unit is seeded from
(run seed, "recover", unit key) and computed with `UNIT_THREADS` torch CPU threads, so a unit gives the same
bytes on CPU whichever worker runs it (a local run, a Ray actor of any size, any OMP_NUM_THREADS).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.errors import ConfigError
from pipeline.core.seeding import generator, torch_threads
from pipeline.data.shards import IndexedImages, Sample, write_shard
from pipeline.data.synthetic import SYNTHETIC_DIR, decode_rgb, synthetic_index, write_set_labels
from pipeline.methods import get_method, init_artifacts
from pipeline.run.base import RunContext, Stage, Unit, UnitResult
from pipeline.run.graph import register_stage
from pipeline.run.stages.common import TEACHER, check_file, real_meta, run_teacher

log = logging.getLogger(__name__)
GRID_DIR = "results/grids"
# The upstream outputs a method may ask for by name (`pipeline.methods.Needs`) and the stage that makes each: the
# recover stage depends on that stage (order, hash, refusal), checks its files, and hands the method a reader
# (`RecoverEnv.artifact`, opened by `open_env`).
ARTIFACT_STAGES = {"teacher": "squeeze", "sample-stats": "squeeze", "trajectories": "experts"}
UNIT_STATE_DIR = "checkpoints/recover-units"  # checkpoints inside long units (`pipeline.run.unit_state`)
UNIT_THREADS = 1
"""Torch CPU threads of every recover unit, whatever the worker has. CPU kernels split reductions by thread
(BatchNorm's backward is where recover's bytes first differ), so the count is part of the result: one thread
makes it the same everywhere and never oversubscribes a CPU (units run side by side on Ray actors instead).
GPU kernels do not depend on it."""


def class_shards(num_classes: int, per_shard: int) -> list[tuple[int, int]]:
    """Disjoint contiguous [start, stop) class ranges covering every class."""
    return [(c, min(c + per_shard, num_classes)) for c in range(0, num_classes, per_shard)]


def unit_key(c0: int, c1: int, i0: int, i1: int) -> str:
    return f"c{c0:04d}-{c1 - 1:04d}_ipc{i0:03d}-{i1 - 1:03d}"


def resolved_init(method: str, init: str) -> str:
    """`recover.init`, with auto replaced by the method's default."""
    return init if init != "auto" else get_method(method).default_init


def method_config(ctx: RunContext) -> Any:
    """The chosen method's own config section (None for a method without one)."""
    m = get_method(ctx.config.recover.method)
    return getattr(ctx.config.recover, m.config_key) if m.config_cls is not None else None


def encode_png(img: torch.Tensor) -> bytes:
    """[3,H,W] float in [0,1] -> lossless PNG bytes (deterministic)."""
    import io

    from PIL import Image

    arr = (img.detach().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def artifacts_used(cfg: Any) -> tuple[str, ...]:
    """The artifacts recover reads under `cfg`: what the method needs, and what its init reads (the teacher of
    real-correct, a selection method's teacher features or statistics)."""
    r = cfg.recover
    names = (*get_method(r.method).needs.artifact_names(), *init_artifacts(resolved_init(r.method, r.init)))
    return tuple(dict.fromkeys(names))


def artifact_stages(cfg: Any) -> tuple[str, ...]:
    """The stages that make the artifacts recover reads under `cfg`, in `RecoverStage.depends_on` order."""
    unknown = [a for a in artifacts_used(cfg) if a not in ARTIFACT_STAGES]
    if unknown:
        raise ConfigError(f"recover method '{cfg.recover.method}' needs {', '.join(map(repr, unknown))}, which no "
                          f"stage makes (known: {', '.join(ARTIFACT_STAGES)})")
    used = {ARTIFACT_STAGES[a] for a in artifacts_used(cfg)}
    return tuple(s for s in RecoverStage.depends_on if s in used)


class RecoverStage(Stage):
    name = "recover"
    depends_on = ("ingest", "squeeze", "experts")
    sections = ("seed", "recover", "eval.holdout_fraction")  # the holdout slice never enters the pool
    distributed = True
    needs_gpu = True
    output_dirs = (SYNTHETIC_DIR, GRID_DIR, UNIT_STATE_DIR)

    def per_shard(self, ctx: RunContext) -> int:
        c = real_meta(ctx)["num_classes"]
        return ctx.config.recover.classes_per_shard or min(100, c)

    def validate(self, ctx: RunContext) -> None:
        r = ctx.config.recover
        method = get_method(r.method)
        c = real_meta(ctx)["num_classes"]
        if r.ipc <= 0:
            raise ConfigError(f"recover.ipc must be > 0, got {r.ipc}")
        if r.classes_per_shard > c:
            raise ConfigError(f"recover.classes_per_shard={r.classes_per_shard} is more than the {c} classes "
                              "of the data; use at most the class count (0 = min(100, classes))")
        if r.classes_per_shard < 0:
            raise ConfigError("recover.classes_per_shard must be >= 0")
        if self.per_shard(ctx) < 2 and method.needs.bn_teacher:
            log.warning("recover: class shards of one class make the BN statistics term meaningless")
        if method.all_classes and 0 < r.classes_per_shard < c:
            log.warning("recover: method %s makes every class in one unit: recover.classes_per_shard=%d is not used",
                        r.method, r.classes_per_shard)
        artifact_stages(ctx.config)  # a ConfigError for an artifact no stage makes
        if "teacher" in artifacts_used(ctx.config):
            check_file(ctx.path(TEACHER), "teacher weights (run the squeeze stage)")
        if r.method == "import":
            from pipeline.methods.import_set import check_folder

            check_folder(r.import_set.path, real_meta(ctx)["classes"], r.ipc)
        if method.needs.bn_teacher:
            from pipeline.models import has_batchnorm

            if not has_batchnorm(run_teacher(ctx, torch.device("cpu"))):
                raise ConfigError(f"teacher '{ctx.config.squeeze.arch}' has no BatchNorm2d layers: recover method "
                                  f"'{r.method}' matches BN statistics and cannot use it")

    def input_changes(self, ctx: RunContext) -> list[str]:
        """`import`: the classes whose files changed since their unit read them (each record's `import_sha256`)."""
        r = ctx.config.recover
        if r.method != "import":
            return []
        from pipeline.methods.import_set import class_files, files_digest

        root, changed = Path(r.import_set.path).expanduser(), []
        for rec in ctx.store.records(self.name):
            if rec.config_hash != ctx.hashes[self.name] or "import_files" not in rec.metrics:
                continue
            used = [root / n for n in rec.metrics["import_files"]]
            try:  # the same bytes, and still among the first recover.ipc files of their class folder
                same = all(p.is_file() and p in class_files(root, p.parent.name)[:r.ipc] for p in used)
                same = same and files_digest(used) == rec.metrics.get("import_sha256")
            except OSError:
                same = False
            if not same:
                changed.append(f"the imported images of unit {rec.unit} in {root} changed")
        return changed

    def dependencies(self, cfg: Any) -> tuple[str, ...]:
        """The stages that make the artifacts the method and its init read (squeeze's hash covers ingest's), else
        ingest alone: a DM recover is not redone when the teacher's settings change."""
        return artifact_stages(cfg) or ("ingest",)

    def read_stages(self, ctx: RunContext) -> tuple[str, ...]:
        """Ingest's real images, and the files of the stages whose artifacts the method or the init reads."""
        return ("ingest", *artifact_stages(ctx.config))

    def plan(self, ctx: RunContext) -> list[Unit]:
        r, method = ctx.config.recover, get_method(ctx.config.recover.method)
        step = r.ipc if method.whole_class else r.ipc_per_unit
        classes = real_meta(ctx)["num_classes"]
        units = []
        for c0, c1 in class_shards(classes, classes if method.all_classes else self.per_shard(ctx)):
            for i0 in range(0, r.ipc, step):
                i1 = min(i0 + step, r.ipc)
                units.append(Unit(unit_key(c0, c1, i0, i1), {"classes": [c0, c1], "ipc": [i0, i1]}))
        return units

    def open_worker(self, ctx: RunContext) -> RecoverWorker:
        return RecoverWorker(ctx)

    def finalize(self, ctx: RunContext) -> dict[str, Any]:
        grids = write_grids(ctx)
        recs = ctx.store.records(self.name)
        secs = sum(r.metrics.get("seconds", 0.0) for r in recs)
        return {"grids": grids, "images": sum(r.metrics.get("images", 0) for r in recs), "unit_seconds": round(secs, 2),
                "method": ctx.config.recover.method}


def open_env(ctx: RunContext, device: torch.device) -> Any:
    """The method's environment on this worker: only what the chosen method declared it needs."""
    from pipeline.methods.env import RecoverEnv
    from pipeline.methods.realpool import RealPool

    r, data = ctx.config.recover, ctx.config.data
    method = get_method(r.method)
    mean, std = tuple(data.mean), tuple(data.std)
    env = RecoverEnv(seed=ctx.config.seed, device=device, resolution=data.resolution, mean=mean, std=std,
                     init=resolved_init(r.method, r.init),
                     amp=torch.bfloat16 if (r.amp == "bf16" and device.type == "cuda") else None,
                     channels_last=r.channels_last, compile=r.compile,
                     batches_per_forward=r.batches_per_forward, open_checkpoint=unit_checkpoints(ctx))
    used = artifacts_used(ctx.config)
    if "teacher" in used:
        env.teacher = run_teacher(ctx, device)
        if r.channels_last and device.type == "cuda":
            env.teacher = env.teacher.to(memory_format=torch.channels_last)
        env.artifact_loaders["teacher"] = lambda: env.teacher
    if method.needs.real_images or env.init.startswith("real"):
        names = real_meta(ctx)["shards"]["train"]
        env.real = RealPool(ctx.path("real"), [ctx.path("real", f"{n}.parquet") for n in names], ctx.config.seed,
                            data.resolution, mean, std, device,
                            holdout=(ctx.config.eval.holdout_fraction, ctx.config.data.shuffle_seed))
        env.stats_loader = lambda: load_sample_stats(ctx, env.real)
        if "sample-stats" in used:
            env.artifact_loaders["sample-stats"] = env.stats_loader
    if "trajectories" in used:
        from pipeline.run.stages.experts import trajectory_reader

        env.artifact_loaders["trajectories"] = lambda: trajectory_reader(ctx)
    env.loss_score = r.loss_score
    env.extra["class_names"] = list(real_meta(ctx)["classes"])
    return env


def unit_checkpoints(ctx: RunContext) -> Callable[[str], Any]:
    """unit key -> its checkpoint file under `UNIT_STATE_DIR`, tagged with the recover config hash and the key."""
    from pipeline.run.unit_state import UnitCheckpoint

    folder, tag, every = ctx.path(UNIT_STATE_DIR), ctx.hashes.get("recover", ""), ctx.config.recover.checkpoint_every_s
    return lambda key: UnitCheckpoint(folder / f"{key}.pt", f"{tag}:{key}", every, label=key)


def load_sample_stats(ctx: RunContext, pool: Any) -> Any:
    """The squeeze stage's per-sample statistics, checked against the real pool's rows; a ConfigError naming the
    file and the fix when they are missing or stale."""
    from pipeline.run.stages.common import SAMPLE_STATS
    from pipeline.train.sample_stats import read_sample_stats

    path = ctx.path(SAMPLE_STATS)
    sq = ctx.config.squeeze
    if not path.is_file():
        why = (f"the teacher is imported (squeeze.weights={sq.weights})" if sq.weights else
               "squeeze.sample_stats is off" if not sq.sample_stats else "the squeeze stage did not write it")
        raise ConfigError(f"per-sample statistics not found: {path} ({why}); train the teacher here with "
                          "squeeze.sample_stats=true (distill run --fresh --stages squeeze)")
    try:
        return read_sample_stats(path, pool.images.keys)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


class RecoverWorker:
    """One per actor (or the driver): the method's worker over an environment loaded once."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.method = get_method(ctx.config.recover.method)
        with torch_threads(UNIT_THREADS):  # a method may compute while it opens (e.g. cached features)
            self.env = open_env(ctx, self.device)
            self.impl = self.method.open(self.env, method_config(ctx))

    def run(self, unit: Unit) -> UnitResult:
        ctx = self.ctx
        c0, c1 = unit.payload["classes"]
        i0, i1 = unit.payload["ipc"]
        t0 = time.time()
        self.env.pop_checkpoint(unit.key)  # a retry of a unit that raised here starts with a fresh file handle
        with torch_threads(UNIT_THREADS):
            out = self.impl.run(range(c0, c1), range(i0, i1), generator(ctx.config.seed, "recover", unit.key),
                                unit.key)
        name = ctx.config.recover.method
        samples = [Sample(f"c{c:04d}_i{j:04d}", c, encode_png(img), "png",
                          {"class": c, "ipc_index": j, "method": name, "unit": unit.key})
                   for img, c, j in zip(out.images, out.classes, out.ipc_index, strict=True)]
        paths = write_shard(ctx.path(SYNTHETIC_DIR), unit.key, samples)
        if out.labels is not None:  # label vectors the method learned, one per image in the shard's order
            paths.append(write_set_labels(ctx.path(SYNTHETIC_DIR), unit.key, out.labels))
        seconds = time.time() - t0
        resumed: dict[str, Any] = {}
        ckpt = self.env.pop_checkpoint(unit.key)
        if ckpt is not None:  # the outputs are written: the unit's checkpoint has served
            if ckpt.resumed_at:  # seconds cover the runs before the kill too, so the rates stay per unit
                seconds += ckpt.prior_seconds
                resumed = {"resumed_at_iteration": ckpt.resumed_at}
            ckpt.clear()
        metrics: dict[str, Any] = {"images": len(samples), "seconds": round(seconds, 3), "device": self.device.type,
                                   **resumed, **out.metrics, **({"set_values": out.values} if out.values else {})}
        metrics.setdefault("image_iterations", 0)
        if seconds > 0:  # cost per unit, comparable across methods (selection methods: images/s)
            key = "image_iterations_per_s" if self.method.synthesizes else "images_per_s"
            metrics[key] = round((metrics["image_iterations"] if self.method.synthesizes else len(samples)) / seconds, 2)
        return UnitResult(outputs=[ctx.ref(p) for p in paths], metrics=metrics)

    def close(self) -> None:
        self.env.teacher = None


def write_grids(ctx: RunContext, max_cols: int = 10) -> list[str]:
    """One PNG per class (its synthetic images in a row) plus an overview of the first 10 classes."""
    from PIL import Image

    index = synthetic_index(ctx.run_dir, ctx.store.records("recover"))
    src = IndexedImages(ctx.path(SYNTHETIC_DIR), index)
    by_class = src.rows_of_class()
    out_dir = ctx.path(GRID_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    first_rows: list[list[np.ndarray]] = []
    for c in sorted(by_class):
        imgs = [decode_rgb(src.raw(i)) for i in by_class[c][:max_cols]]
        row = np.concatenate(imgs, axis=1)
        path = out_dir / f"class-{c:04d}.png"
        _save_png(Image.fromarray(row), path)
        written.append(str(path.relative_to(ctx.run_dir)))
        if len(first_rows) < 10:
            first_rows.append(imgs)
    if first_rows:
        width = max(len(r) for r in first_rows)
        h, w = first_rows[0][0].shape[:2]
        canvas = np.zeros((h * len(first_rows), w * width, 3), dtype=np.uint8)
        for ri, imgs in enumerate(first_rows):
            for ci, img in enumerate(imgs):
                canvas[ri * h:(ri + 1) * h, ci * w:(ci + 1) * w] = img
        scale = max(1, math.ceil(256 / max(h, 1))) if h < 64 else 1
        grid = Image.fromarray(canvas)
        if scale > 1:
            grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
        names = real_meta(ctx).get("class_names")
        if names:
            grid = label_rows(grid, [names[c] for c in sorted(by_class)[:len(first_rows)]])
        path = out_dir / "overview.png"
        _save_png(grid, path)
        written.insert(0, str(path.relative_to(ctx.run_dir)))
    return written


def label_rows(grid: Any, labels: list[str], width: int = 160) -> Any:
    """The grid with a white column on its left holding each row's label (a class name, cut to fit)."""
    from PIL import Image, ImageDraw

    out = Image.new("RGB", (grid.width + width, grid.height), "white")
    out.paste(grid, (width, 0))
    draw, row_h = ImageDraw.Draw(out), grid.height / max(len(labels), 1)
    for i, text in enumerate(labels):
        while text and draw.textlength(text) > width - 8:
            text = text[:-1]
        draw.text((4, int(i * row_h + row_h / 2) - 5), text, fill="black")
    return out


def _save_png(img: Any, path: Path) -> None:
    import io

    from manifests.store import atomic_write_bytes

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


STAGE = register_stage(RecoverStage())
