"""Recover: synthesize IPC images per class (SRe2L, DWA, or the random-real baseline).

Units are (class shard, IPC range): classes are split into disjoint contiguous shards of
`recover.classes_per_shard`; each batch holds one image of every class of the shard (the BN
term compares batch statistics with the teacher's global ones, so a batch must span many
classes). Every unit is seeded from (run seed, "recover", unit key); DWA subsets come from the
worker's own classes' real images, afresh for each batch, starting from the clean teacher.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import ConfigError
from pipeline.data.shards import IndexedImages, Sample, read_index, write_shard
from pipeline.data.synthetic import SYNTHETIC_DIR, decode_rgb, synthetic_index
from pipeline.seeding import generator
from pipeline.stages.base import RunContext, Stage, Unit, UnitResult
from pipeline.stages.common import TEACHER, check_file, real_meta, run_teacher

log = logging.getLogger(__name__)
GRID_DIR = "results/grids"


def class_shards(num_classes: int, per_shard: int) -> list[tuple[int, int]]:
    """Disjoint contiguous [start, stop) class ranges covering every class."""
    return [(c, min(c + per_shard, num_classes)) for c in range(0, num_classes, per_shard)]


def unit_key(c0: int, c1: int, i0: int, i1: int) -> str:
    return f"c{c0:04d}-{c1 - 1:04d}_ipc{i0:03d}-{i1 - 1:03d}"


def resolved_init(method: str, init: str) -> str:
    return init if init != "auto" else ("real" if method == "dwa" else "noise")


def encode_png(img: torch.Tensor) -> bytes:
    """[3,H,W] float in [0,1] -> lossless PNG bytes (deterministic)."""
    import io

    from PIL import Image

    arr = (img.detach().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


class RecoverStage(Stage):
    name = "recover"
    depends_on = ("squeeze",)
    sections = ("seed", "recover")
    distributed = True
    needs_gpu = True
    output_dirs = (SYNTHETIC_DIR, GRID_DIR)

    def per_shard(self, ctx: RunContext) -> int:
        c = real_meta(ctx)["num_classes"]
        return ctx.config.recover.classes_per_shard or min(100, c)

    def validate(self, ctx: RunContext) -> None:
        r = ctx.config.recover
        c = real_meta(ctx)["num_classes"]
        if r.ipc <= 0:
            raise ConfigError(f"recover.ipc must be > 0, got {r.ipc}")
        if r.classes_per_shard > c:
            raise ConfigError(f"recover.classes_per_shard={r.classes_per_shard} is more than the {c} classes "
                              "of the data; use at most the class count (0 = min(100, classes))")
        if r.classes_per_shard < 0 or r.dwa_batch_size < 0:
            raise ConfigError("recover.classes_per_shard and recover.dwa_batch_size must be >= 0")
        if self.per_shard(ctx) < 2 and r.method != "random-real":
            log.warning("recover: class shards of one class make the BN statistics term meaningless")
        if r.method != "random-real":
            check_file(ctx.path(TEACHER), "teacher weights (run the squeeze stage)")
            teacher = run_teacher(ctx, torch.device("cpu"))
            from pipeline.models import has_batchnorm

            if not has_batchnorm(teacher):
                raise ConfigError(f"teacher '{ctx.config.squeeze.arch}' has no BatchNorm2d layers: SRe2L/DWA recover "
                                  "matches BN statistics and cannot use it")

    def plan(self, ctx: RunContext) -> list[Unit]:
        r = ctx.config.recover
        units = []
        for c0, c1 in class_shards(real_meta(ctx)["num_classes"], self.per_shard(ctx)):
            for i0 in range(0, r.ipc, r.ipc_per_unit):
                i1 = min(i0 + r.ipc_per_unit, r.ipc)
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


class RecoverWorker:
    """Holds the teacher (loaded once) and the real-image index of the train split."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        r = ctx.config.recover
        self.teacher = run_teacher(ctx, self.device) if r.method != "random-real" else None
        if self.teacher is not None and r.channels_last and self.device.type == "cuda":
            self.teacher = self.teacher.to(memory_format=torch.channels_last)
        names = real_meta(ctx)["shards"]["train"]
        self.real = IndexedImages(ctx.path("real"), read_index([ctx.path("real", f"{n}.parquet") for n in names]))
        self.by_class = self.real.rows_of_class()
        self.res = ctx.config.data.resolution
        self.mean, self.std = tuple(ctx.config.data.mean), tuple(ctx.config.data.std)

    # -- real images
    def real_batch(self, rows: list[int]) -> torch.Tensor:
        """Normalized real images (resize shorter side + center crop to the resolution)."""
        from pipeline.synthesis import normalize

        arrays = [_center(decode_rgb(self.real.raw(i)), self.res) for i in rows]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
        return normalize(x, self.mean, self.std).to(self.device)

    def class_rows(self, cls: int, purpose: str) -> list[int]:
        """This class's real rows in a seeded order keyed by (run seed, purpose, class): any unit split agrees."""
        rows = self.by_class.get(cls, [])
        if not rows:
            raise ValueError(f"class {cls} has no real training images in the ingest index")
        g = generator(self.ctx.config.seed, "recover", purpose, cls)
        return [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]

    def dwa_subset(self, classes: range, key: str, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """DWA's real subset B for batch j of a unit: class-balanced over the unit's classes, fresh per batch.

        B holds `ceil(dwa_batch_size / classes)` images of every class of the unit (default size = the
        synthesis batch, i.e. one image per class, like the official code's batch of real init images),
        drawn without replacement where the class has enough images, from a generator keyed by
        (run seed, "recover", "dwa", unit key, j). The same B serves all K ascent steps.
        """
        r = self.ctx.config.recover
        per_class = max(1, math.ceil((r.dwa_batch_size or len(classes)) / len(classes)))
        g = generator(self.ctx.config.seed, "recover", "dwa", key, j)
        rows: list[int] = []
        for c in classes:
            pool = self.by_class.get(c, [])
            if not pool:
                raise ValueError(f"class {c} has no real training images in the ingest index (needed by DWA)")
            if per_class <= len(pool):
                pick = torch.randperm(len(pool), generator=g)[:per_class].tolist()
            else:
                pick = torch.randint(len(pool), (per_class,), generator=g).tolist()
            rows += [pool[i] for i in pick]
        labels = torch.tensor([self.real.cls[i] for i in rows], dtype=torch.long, device=self.device)
        return self.real_batch(rows), labels

    # -- one unit
    def run(self, unit: Unit) -> UnitResult:
        import time

        from pipeline.synthesis import DWAParams, RecoverParams, init_images, synthesize_batch

        ctx, r = self.ctx, self.ctx.config.recover
        c0, c1 = unit.payload["classes"]
        i0, i1 = unit.payload["ipc"]
        classes = range(c0, c1)
        targets = torch.tensor(list(classes), dtype=torch.long, device=self.device)
        gen = generator(ctx.config.seed, "recover", unit.key)
        t0 = time.time()
        params = RecoverParams(iterations=r.iterations, lr=r.lr, r_bn=r.r_bn, r_var=r.r_var,
                               first_bn_multiplier=r.first_bn_multiplier, crop_scale=(r.crop_scale_min, 1.0),
                               jitter=r.jitter, crop=r.crop, flip=r.flip)
        amp = torch.bfloat16 if (r.amp == "bf16" and self.device.type == "cuda") else None
        init_kind = resolved_init(r.method, r.init)
        samples: list[Sample] = []
        finals: list[dict[str, float]] = []
        radius: list[torch.Tensor] = []
        for j in range(i0, i1):
            if r.method == "random-real" or init_kind == "real":
                rows = []
                for c in classes:
                    order = self.class_rows(c, "real-pick")
                    rows.append(order[j % len(order)])
                real = self.real_batch(rows)
            if r.method == "random-real":
                from pipeline.synthesis import denormalize

                images = denormalize(real, self.mean, self.std).clamp(0, 1)
                loss_last = {}
            else:
                init = init_images(init_kind, len(targets), self.res, gen, real=real if init_kind == "real" else None,
                                   device=self.device)
                dwa = self.dwa_subset(classes, unit.key, j) if r.method == "dwa" else None
                images, hist = synthesize_batch(
                    self.teacher, targets, init, params, gen, dwa_batch=dwa,
                    dwa=DWAParams(steps=r.dwa_steps, rho=r.dwa_rho) if dwa else None,
                    mean=self.mean, std=self.std, autocast_dtype=amp, channels_last=r.channels_last)
                if "dwa_delta_norm" in hist:
                    radius.append(hist.pop("dwa_delta_norm"))
                tail = max(1, r.iterations // 20)
                loss_last = {k: float(v[-tail:].mean()) for k, v in hist.items()}  # one sync per batch
                loss_first = {k: float(v[0]) for k, v in hist.items()}
                loss_last.update({f"{k}_first": v for k, v in loss_first.items()})
            finals.append(loss_last)
            for c, img in zip(classes, images, strict=True):
                samples.append(Sample(f"c{c:04d}_i{j:04d}", c, encode_png(img), "png",
                                      {"class": c, "ipc_index": j, "method": r.method, "unit": unit.key}))
        paths = write_shard(ctx.path(SYNTHETIC_DIR), unit.key, samples)
        metrics: dict[str, Any] = {"images": len(samples), "seconds": round(time.time() - t0, 3),
                                   "device": self.device.type,
                                   "image_iterations": 0 if r.method == "random-real" else len(samples) * r.iterations}
        if radius and r.dwa_rho > 0:
            # Achieved ||delta|| / rho, mean over the unit's batches (official code: about 0.995).
            metrics["dwa_radius_ratio"] = round(float(torch.cat(radius).mean()) / r.dwa_rho, 6)
        if finals and finals[0]:
            for k in finals[0]:
                metrics[f"loss_{k}"] = float(np.mean([f[k] for f in finals]))
        return UnitResult(outputs=[ctx.ref(p) for p in paths], metrics=metrics)

    def close(self) -> None:
        self.teacher = None


def _center(arr: np.ndarray, res: int) -> np.ndarray:
    """Resize the shorter side to `res` (bilinear) and center-crop res x res."""
    from PIL import Image

    h, w = arr.shape[:2]
    if (h, w) == (res, res):
        return arr
    scale = res / min(h, w)
    nh, nw = max(res, round(h * scale)), max(res, round(w * scale))
    img = Image.fromarray(arr).resize((nw, nh), Image.BILINEAR)
    top, left = (nh - res) // 2, (nw - res) // 2
    return np.asarray(img.crop((left, top, left + res, top + res)), dtype=np.uint8)


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
        path = out_dir / "overview.png"
        _save_png(grid, path)
        written.insert(0, str(path.relative_to(ctx.run_dir)))
    return written


def _save_png(img: Any, path: Path) -> None:
    import io

    from manifests.store import atomic_write_bytes

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


STAGE = RecoverStage()
