"""What the recover stage hands a method worker: device, teacher, the real images of the train split, seeds.

Built once per worker (a Ray actor or the driver) by the recover stage; methods read from it and never touch
files. Every random choice here is keyed by (run seed, "recover", purpose, ...) so that any split of the work
into units, and any worker, picks the same images.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from pipeline.core.seeding import generator
from pipeline.methods.base import get_method, init_kinds, selections
from pipeline.methods.realpool import RealPool


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
    init: str = "noise"  # initial images: noise | one of `init_kinds()` (`recover.init`, auto resolved by the method)
    amp: torch.dtype | None = None  # autocast dtype on GPU, None = fp32
    channels_last: bool = False
    compile: str = "off"  # `recover.compile`: auto | on | off (SRe2L / DWA's teacher objective)
    batches_per_forward: int = 1  # `recover.batches_per_forward` (0 = auto; SRe2L only)
    teacher: torch.nn.Module | None = None
    real: RealPool | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # The squeeze stage's per-sample statistics (`pipeline.train.sample_stats`), loaded on first use by this callable;
    # it raises a ValueError saying why there are none (an imported teacher, squeeze.sample_stats = false).
    stats_loader: Any = None
    loss_score: Any = None  # the loss-score settings (`recover.loss_score`: score, source, take)
    # The upstream artifacts the method declared in its `Needs`, by name (teacher, sample-stats, ...): a loader each,
    # called once by `artifact`. Set by the recover stage.
    artifact_loaders: dict[str, Callable[[], Any]] = field(default_factory=dict)
    feature_batch: int = 256  # real images per teacher forward in `features` (bounds activation memory)
    # Classes whose teacher pass `features` keeps (least recently used dropped first). The default covers a
    # default class shard (at most 100 classes), so a unit's classes go through the teacher once even when
    # `init_rows` comes back to them for every IPC index. ImageNet + ResNet-18 (512-d, ~1300 images a class):
    # about 2.7 MB a class, 340 MB in all, in host memory.
    feature_cache_classes: int = 128
    # Checkpoints inside a unit: unit key -> a `LoopCheckpoint` (`pipeline.methods.matching.common`), made by the
    # recover stage (`pipeline.run.unit_state.UnitCheckpoint`, tagged with its config hash); None = no checkpoints:
    # loops run straight through.
    open_checkpoint: Callable[[str], Any] | None = None
    _checkpoints: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    _forward: OrderedDict[int, ClassForward] = field(default_factory=OrderedDict, init=False, repr=False,
                                                     compare=False)
    # Derived per-class row lists (a few ints each, so never evicted): correct rows, greedy selections.
    _rows: dict[tuple[str, int], list[int]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def checkpoint(self, unit_key: str) -> Any:
        """The unit's checkpoint (the same object for every call during the unit; the recover stage takes it back
        with `pop_checkpoint`), or None when this env makes none."""
        if self.open_checkpoint is None:
            return None
        if unit_key not in self._checkpoints:
            self._checkpoints[unit_key] = self.open_checkpoint(unit_key)
        return self._checkpoints[unit_key]

    def pop_checkpoint(self, unit_key: str) -> Any:
        """The checkpoint the unit used (None if it used none), forgotten by this env."""
        return self._checkpoints.pop(unit_key, None)

    def artifact(self, name: str) -> Any:
        """The upstream artifact `name` (a reader or object: the teacher, the per-sample statistics, ...), loaded on
        first use; a RuntimeError for one the method did not declare in its `Needs`."""
        key = f"artifact:{name}"
        if key not in self.extra:
            if name not in self.artifact_loaders:
                raise RuntimeError(f"artifact {name!r} was asked for, but the method did not declare it in its Needs "
                                   f"(this worker has: {', '.join(self.artifact_loaders) or 'none'})")
            self.extra[key] = self.artifact_loaders[name]()
        return self.extra[key]

    def teacher_logits(self, x: torch.Tensor, batch: int = 0) -> torch.Tensor:
        """The teacher's float32 logits [N, C] for normalized images x [N, 3, H, W]: eval mode, no gradient, bf16
        autocast when `amp`, channels_last on CUDA when set, in chunks of `batch` (0 = `feature_batch`) so any
        number of images fits; on x's device. The teacher's train/eval mode is restored afterwards."""
        teacher = self.teacher
        if teacher is None:
            raise RuntimeError("teacher logits were asked for, but the method declared no need for the teacher")
        step = max(1, batch or self.feature_batch)
        was_training = teacher.training
        teacher.eval()  # BN running statistics, no dropout: a row's logits must not depend on its chunk
        out = []
        try:
            with torch.no_grad():
                for i in range(0, len(x), step):
                    chunk = x[i:i + step]
                    if self.channels_last and chunk.device.type == "cuda":
                        chunk = chunk.contiguous(memory_format=torch.channels_last)
                    with torch.autocast(device_type=chunk.device.type, dtype=self.amp or torch.bfloat16,
                                        enabled=self.amp is not None):
                        out.append(teacher(chunk).float())
        finally:
            teacher.train(was_training)
        return torch.cat(out) if out else x.new_zeros((0, 0))

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
        kinds = init_kinds()
        if kind not in kinds:
            raise ValueError(f"unknown real init {kind!r}; expected one of {', '.join(kinds)}")
        pool = self.require_real()
        selection = get_method(kind.removeprefix("real-")).selection if kind not in ("real", "real-correct") else ""
        rows = []
        for c in classes:
            if kind == "real-correct":
                order = self.correct_rows(c) or pool.class_rows(c, "real-pick")
            elif kind == "real":
                order = pool.class_rows(c, "real-pick")
            elif selection == "ranking":
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
        teacher's training) before all others (Toneva et al.); loss-score: `pipeline.methods.selection.loss_scores` of
        the class (`recover.loss_score`: score or score2, from the loss buffers or the final teacher), the low or
        the high end first. Ties keep the class's seeded order (run seed, "rank-<kind>", class).
        """
        from pipeline.methods import selection

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
            raise ValueError(f"unknown ranking {kind!r}; expected one of {', '.join(selections('ranking'))}")
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
        from pipeline.methods import selection

        if kind not in selections("greedy"):
            raise ValueError(f"unknown selection {kind!r}; expected one of {', '.join(selections('greedy'))}")
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
        feats, preds, losses = [], [], []
        target = torch.full((1,), cls, dtype=torch.int64)
        try:
            for i in range(0, len(rows), max(1, self.feature_batch)):
                x = pool.batch(rows[i:i + max(1, self.feature_batch)])
                logits = self.teacher_logits(x, batch=len(x))  # one forward: the hook sees this chunk alone
                if not captured:
                    raise RuntimeError(f"the last nn.Linear of {type(teacher).__name__} did not run in its "
                                       "forward: no features to take")
                # The last call wins should a model call its head more than once per forward.
                feats.append(captured[-1].float().reshape(len(x), -1).cpu())
                captured.clear()
                preds.append(logits.argmax(dim=1).cpu())
                losses.append(sample_losses(logits.cpu(), target.expand(len(x))))
        finally:
            handle.remove()
        return ClassForward(rows=list(rows), feats=torch.cat(feats), preds=torch.cat(preds),
                            loss_label=torch.cat([a for a, _ in losses]), loss_pred=torch.cat([b for _, b in losses]))


def sample_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE against the label, CE against the argmax) per row, as the squeeze stage's loss buffers."""
    from pipeline.train.sample_stats import losses

    _, loss_label, loss_pred = losses(logits, labels)
    return loss_label, loss_pred


def last_linear(model: torch.nn.Module) -> torch.nn.Linear:
    """The last nn.Linear in `model.modules()` order: the classifier head of the project's ConvNets and of
    torchvision's ResNets, whose input is the penultimate feature vector."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to take features from")
    return linears[-1]
