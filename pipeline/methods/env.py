"""What the recover stage hands a method worker: device, teacher, the real images of the train split, seeds.

Built once per worker (a Ray actor or the driver) by the recover stage; methods read from it and never touch
files. Every random choice here is keyed by (run seed, "recover", purpose, ...) so that any split of the work
into units, and any worker, picks the same images.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from pipeline.seeding import generator

SELECTIONS = ("herding", "k-center")  # the greedy selections of `pipeline.selection`, by method name
RANKINGS = ("forgetting", "loss-score")  # selections by a per-sample score (`ranked_rows`)
INIT_KINDS = ("real", "real-correct", *(f"real-{s}" for s in SELECTIONS + RANKINGS))  # what `init_rows` accepts


class ClassForward(NamedTuple):
    """One teacher pass over all real training images of a class, in `RealPool.rows(cls)` order."""

    rows: list[int]
    feats: torch.Tensor  # [n, d] float32 on the CPU: the input of the teacher's last nn.Linear
    preds: torch.Tensor  # [n] int64 on the CPU: the teacher's argmax class
    loss_label: torch.Tensor  # [n] float32: CE of the logits against the class
    loss_pred: torch.Tensor  # [n] float32: CE against the argmax class (logsumexp - max)


@dataclass
class RecoverEnv:
    """device, teacher (None unless the method needs one), real pool (None unless it needs real images)."""

    seed: int
    device: torch.device
    resolution: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    init: str = "noise"  # initial images: noise | one of INIT_KINDS (`recover.init`, auto resolved by the method)
    amp: torch.dtype | None = None  # autocast dtype on GPU, None = fp32
    channels_last: bool = False
    compile: str = "off"  # `recover.compile`: auto | on | off (SRe2L / DWA's teacher objective)
    batches_per_forward: int = 1  # `recover.batches_per_forward` (0 = auto; SRe2L only)
    teacher: torch.nn.Module | None = None
    real: RealPool | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # The squeeze stage's per-sample statistics (`pipeline.sample_stats`), loaded on first use by this callable;
    # it raises a ValueError saying why there are none (an imported teacher, squeeze.sample_stats = false).
    stats_loader: Any = None
    loss_score: Any = None  # the loss-score settings (`recover.loss_score`: score, source, take)
    feature_batch: int = 256  # real images per teacher forward in `features` (bounds activation memory)
    # Classes whose teacher pass `features` keeps (least recently used dropped first). The default covers a
    # default class shard (at most 100 classes), so a unit's classes go through the teacher once even when
    # `init_rows` comes back to them for every IPC index. ImageNet + ResNet-18 (512-d, ~1300 images a class):
    # about 2.7 MB a class, 340 MB in all, in host memory.
    feature_cache_classes: int = 128
    # Checkpoints inside a unit (`pipeline.unit_state`): their folder (None = none: loops run straight through),
    # the tag that ties a file to this configuration (the recover stage's config hash), the seconds between saves.
    unit_state_dir: Path | None = None
    unit_state_tag: str = ""
    checkpoint_every_s: float = 300.0
    _checkpoints: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    _forward: OrderedDict[int, ClassForward] = field(default_factory=OrderedDict, init=False, repr=False,
                                                     compare=False)
    # Derived per-class row lists (a few ints each, so never evicted): correct rows, greedy selections.
    _rows: dict[tuple[str, int], list[int]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def checkpoint(self, unit_key: str) -> Any:
        """The unit's `UnitCheckpoint` (the same object for every call during the unit; the recover stage takes
        it back with `pop_checkpoint`), or None when this env has no checkpoint folder."""
        if self.unit_state_dir is None:
            return None
        if unit_key not in self._checkpoints:
            from pipeline.unit_state import UnitCheckpoint

            self._checkpoints[unit_key] = UnitCheckpoint(self.unit_state_dir / f"{unit_key}.pt",
                                                         f"{self.unit_state_tag}:{unit_key}",
                                                         self.checkpoint_every_s, label=unit_key)
        return self._checkpoints[unit_key]

    def pop_checkpoint(self, unit_key: str) -> Any:
        """The checkpoint the unit used (None if it used none), forgotten by this env."""
        return self._checkpoints.pop(unit_key, None)

    def require_real(self) -> RealPool:
        if self.real is None:
            raise RuntimeError("this method declared no need for real images, but asked for them")
        return self.real

    def real_init(self, classes: range, j: int) -> torch.Tensor:
        """Normalized real images, one of each class, for IPC index j: the j-th of each class's seeded order.

        The order is keyed by (run seed, "real-pick", class), so random-real and real-initialized methods pick
        the same images for (class, j) whatever the unit split.
        """
        return self.require_real().batch(self.init_rows("real", classes, j))

    def init_batch(self, classes: range, j: int, kind: str | None = None) -> torch.Tensor:
        """Normalized real images `init_rows(kind, classes, j)`; kind defaults to this env's `init`."""
        return self.require_real().batch(self.init_rows(self.init if kind is None else kind, classes, j))

    def init_rows(self, kind: str, classes: range, j: int, need: int = 0) -> list[int]:
        """One real row per class for IPC index j, by `kind`:

        real: the j-th of the class's order keyed by (run seed, "real-pick", class), what `real_init` and
        random-real use; real-correct: the j-th of `correct_rows` (that same order, keeping the images the teacher
        classifies correctly), or the real pick where the teacher gets none of the class right; real-herding /
        real-k-center: the j-th image of that greedy selection (`selected_rows`), what the herding / k-center
        methods output. Indices past the end wrap around. `need` (optional) is how many images of each class the
        caller will ask for in all: the selections are then computed once for that many instead of grown.
        """
        if kind not in INIT_KINDS:
            raise ValueError(f"unknown real init {kind!r}; expected one of {', '.join(INIT_KINDS)}")
        pool = self.require_real()
        rows = []
        for c in classes:
            if kind == "real-correct":
                order = self.correct_rows(c) or pool.class_rows(c, "real-pick")
            elif kind == "real":
                order = pool.class_rows(c, "real-pick")
            elif kind.removeprefix("real-") in RANKINGS:
                order = self.ranked_rows(kind.removeprefix("real-"), c)
            else:
                order = self.selected_rows(kind.removeprefix("real-"), c, max(j + 1, need))
            rows.append(order[j % len(order)])
        return rows

    def sample_stats(self) -> Any:
        """The squeeze stage's per-sample table (pyarrow), loaded once."""
        if "sample_stats" not in self.extra:
            if self.stats_loader is None:
                raise RuntimeError("per-sample statistics were asked for, but none were provided to this worker")
            self.extra["sample_stats"] = self.stats_loader()
        return self.extra["sample_stats"]

    def ranked_rows(self, kind: str, cls: int) -> list[int]:
        """All of the class's rows, best first, by the per-sample ranking `kind`:

        forgetting: most forgetting events first, never-learned samples (never classified correctly during the
        teacher's training) before all others (Toneva et al.); loss-score: `pipeline.selection.loss_scores` of the
        class (`recover.loss_score`: score or score2, from the loss buffers or the final teacher), the low or
        the high end first. Ties keep the class's seeded order (run seed, "rank-<kind>", class).
        """
        from pipeline import selection

        key = ("rank-" + kind, cls)
        if key in self._rows:
            return list(self._rows[key])
        pool = self.require_real()
        order = pool.class_rows(cls, "rank-" + kind)
        if kind == "forgetting":
            table = self.sample_stats()
            events = torch.tensor(table.column("forgetting").to_numpy()[order], dtype=torch.float64)
            learned = torch.tensor(table.column("learned").to_numpy(zero_copy_only=False)[order])
            value = torch.where(learned, events, torch.full_like(events, float("inf")))
            ranked = selection.rank(value, descending=True)
        elif kind == "loss-score":
            cfg = self.loss_score
            if cfg is None:
                raise RuntimeError("loss-score ranking asked for without its settings (recover.loss_score)")
            if cfg.source == "buffers":
                table = self.sample_stats()
                ll = torch.tensor(table.column("loss_label_mean").to_numpy()[order], dtype=torch.float64)
                lp = torch.tensor(table.column("loss_pred_mean").to_numpy()[order], dtype=torch.float64)
            else:
                fwd = self._class_forward(cls)
                where = {r: i for i, r in enumerate(fwd.rows)}
                pos = [where[r] for r in order]
                ll, lp = fwd.loss_label[pos].double(), fwd.loss_pred[pos].double()
            ranked = selection.rank(selection.loss_scores(ll, lp, cfg.score), descending=cfg.take == "high")
        else:
            raise ValueError(f"unknown ranking {kind!r}; expected one of {', '.join(RANKINGS)}")
        self._rows[key] = [order[i] for i in ranked]
        return list(self._rows[key])

    def features(self, cls: int) -> tuple[list[int], torch.Tensor]:
        """(rows, feats [n, d] float32 on the CPU): the input of the teacher's last nn.Linear for every real
        training image of the class, in `RealPool.rows(cls)` order (the penultimate features of a ConvNet or
        ResNet). One teacher pass per class and worker while the class stays in the cache."""
        fwd = self._class_forward(cls)
        return fwd.rows, fwd.feats

    def correct_rows(self, cls: int) -> list[int]:
        """The class's rows in `class_rows(cls, "real-pick")` order, keeping those the teacher classifies as `cls`
        (PAD's initialization from correctly predicted real images); empty if it gets none right."""
        key = ("correct", cls)
        if key not in self._rows:
            fwd = self._class_forward(cls)
            right = {r for r, p in zip(fwd.rows, fwd.preds.tolist(), strict=True) if p == cls}
            self._rows[key] = [r for r in self.require_real().class_rows(cls, "real-pick") if r in right]
        return list(self._rows[key])

    def selected_rows(self, kind: str, cls: int, k: int) -> list[int]:
        """The first min(k, n) rows of the class's greedy selection `kind` ("herding" or "k-center") in the
        teacher's feature space, in selection order.

        Greedy selections are prefix-stable, so a longer selection computed earlier answers a shorter request and
        the answer never depends on which k came first. The k-center start is drawn from a generator keyed by
        (run seed, "recover", "k-center", class), not from a unit's generator, so that the selection method and
        `init_rows` agree whatever the unit split.
        """
        from pipeline import selection

        if kind not in SELECTIONS:
            raise ValueError(f"unknown selection {kind!r}; expected one of {', '.join(SELECTIONS)}")
        key = (kind, cls)
        have = self._rows.get(key, [])
        n = len(self.require_real().rows(cls))
        if len(have) < min(k, n):
            rows, feats = self.features(cls)
            # Grow at least geometrically: callers asking j + 1 for j = 0, 1, ... cost O(log ipc) runs, not ipc.
            budget = min(n, max(k, 2 * len(have)))
            if kind == "herding":
                picks = selection.herding(feats, budget)
            else:
                start = int(torch.randint(n, (), generator=generator(self.seed, "recover", "k-center", cls)))
                picks = selection.k_center(feats, budget, start)
            have = self._rows[key] = [rows[i] for i in picks]
        return have[:k]

    def _class_forward(self, cls: int) -> ClassForward:
        if cls in self._forward:
            self._forward.move_to_end(cls)
            return self._forward[cls]
        fwd = self._run_teacher(cls)
        self._forward[cls] = fwd
        while len(self._forward) > max(1, self.feature_cache_classes):
            self._forward.popitem(last=False)
        return fwd

    def _run_teacher(self, cls: int) -> ClassForward:
        """The teacher (eval mode, no grad, bf16 autocast when `amp`) over all real images of the class, in
        chunks of `feature_batch`; the features come from a forward hook on the last nn.Linear."""
        teacher = self.teacher
        if teacher is None:
            raise RuntimeError("teacher features were asked for, but the method declared no need for the teacher")
        pool = self.require_real()
        head = last_linear(teacher)
        rows = pool.rows(cls)
        captured: list[torch.Tensor] = []

        def hook(module: torch.nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            captured.append(inputs[0].detach())

        handle = head.register_forward_hook(hook)
        was_training = teacher.training
        teacher.eval()  # BN running statistics, no dropout: features must not depend on the chunk
        feats, preds, losses = [], [], []
        target = torch.full((1,), cls, dtype=torch.int64)
        try:
            with torch.no_grad():
                for i in range(0, len(rows), max(1, self.feature_batch)):
                    x = pool.batch(rows[i:i + max(1, self.feature_batch)])
                    if self.channels_last and x.device.type == "cuda":
                        x = x.contiguous(memory_format=torch.channels_last)
                    with torch.autocast(device_type=x.device.type, dtype=self.amp or torch.bfloat16,
                                        enabled=self.amp is not None):
                        logits = teacher(x)
                    if not captured:
                        raise RuntimeError(f"the last nn.Linear of {type(teacher).__name__} did not run in its "
                                           "forward: no features to take")
                    # The last call wins should a model call its head more than once per forward.
                    feats.append(captured[-1].float().reshape(len(x), -1).cpu())
                    captured.clear()
                    preds.append(logits.argmax(dim=1).cpu())
                    losses.append(sample_losses(logits.float().cpu(), target.expand(len(x))))
        finally:
            handle.remove()
            teacher.train(was_training)
        return ClassForward(rows=list(rows), feats=torch.cat(feats), preds=torch.cat(preds),
                            loss_label=torch.cat([a for a, _ in losses]), loss_pred=torch.cat([b for _, b in losses]))


def sample_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE against the label, CE against the argmax) per row, as the squeeze stage's loss buffers."""
    from pipeline.sample_stats import losses

    _, loss_label, loss_pred = losses(logits, labels)
    return loss_label, loss_pred


def last_linear(model: torch.nn.Module) -> torch.nn.Linear:
    """The last nn.Linear in `model.modules()` order: the classifier head of the project's ConvNets and of
    torchvision's ResNets, whose input is the penultimate feature vector."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to take features from")
    return linears[-1]


class RealPool:
    """The real training images of the ingest shards, read by offset through the parquet index (less the
    holdout slice: `holdout` = (eval.holdout_fraction, data.shuffle_seed))."""

    def __init__(self, real_dir: Path, index_paths: list[Path], seed: int, resolution: int,
                 mean: tuple[float, ...], std: tuple[float, ...], device: torch.device,
                 holdout: tuple[float, int] = (0.0, 0)) -> None:
        from pipeline.data.shards import IndexedImages, read_index
        from pipeline.holdout import holdout_rows

        self.images = IndexedImages(real_dir, read_index(index_paths))
        by_class = self.images.rows_of_class()
        # the holdout slice (fraction, seed) is never offered to a method (see pipeline.holdout)
        held = set(holdout_rows(by_class, *holdout)) if holdout[0] > 0 else set()
        self.by_class = {c: [r for r in rows if r not in held] for c, rows in by_class.items()}
        self.seed, self.resolution, self.mean, self.std, self.device = seed, resolution, mean, std, device

    def label(self, row: int) -> int:
        return int(self.images.cls[row])

    def rows(self, cls: int) -> list[int]:
        rows = self.by_class.get(cls, [])
        if not rows:
            raise ValueError(f"class {cls} has no real training images in the ingest index")
        return rows

    def class_rows(self, cls: int, purpose: str) -> list[int]:
        """This class's rows in a seeded order keyed by (run seed, purpose, class): any unit split agrees."""
        rows = self.rows(cls)
        g = generator(self.seed, "recover", purpose, cls)
        return [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]

    def batch(self, rows: list[int]) -> torch.Tensor:
        """Normalized real images [len(rows), 3, R, R] on the device (shorter side resized, center crop)."""
        from pipeline.data.synthetic import decode_rgb
        from pipeline.synthesis import normalize

        arrays = [center_crop(decode_rgb(self.images.raw(i)), self.resolution) for i in rows]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
        return normalize(x, self.mean, self.std).to(self.device)


def center_crop(arr: np.ndarray, res: int) -> np.ndarray:
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
