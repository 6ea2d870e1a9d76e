"""SRe2L recover (Yin, Xing, Shen, NeurIPS 2023; https://github.com/VILA-Lab/SRe2L).

Per batch of one image of each class of the unit: Adam on the normalized pixels against the frozen teacher,
loss CE + r_bn * BN-statistics term, one random crop / flip / roll per iteration, last iterate saved. With
`crop_schedule=cda` the crop's smallest area follows CDA's curriculum (Yin & Shen, TMLR 2024) instead of staying at
`crop_scale_min`. The
compute is `pipeline.methods.synthesis.synthesize_batch`; this file only maps the config onto it. DWA
(`pipeline.methods.dwa`) is the same worker with a weight perturbation before each batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pipeline.methods.base import MethodOutput, Needs, doc_field, register

log = logging.getLogger(__name__)


@dataclass
class Sre2lConfig:
    """SRe2L's recover settings (`recover.sre2l.*`). Defaults: the official ImageNet values except `iterations`
    (official 4000) and `jitter` (official 32 at 224 px; 4 suits the default 32 px)."""

    iterations: int = doc_field(1000, "optimization iterations per batch")
    lr: float = doc_field(0.25, "Adam learning rate on the normalized pixels, betas (0.5, 0.9), cosine to 0")
    r_bn: float = doc_field(0.01, "weight of the BatchNorm-statistics loss")
    r_var: float = doc_field(1.0, "weight of the variance term inside the BN loss")
    first_bn_multiplier: float = doc_field(10.0, "extra weight of the first BN layer's term")
    jitter: int = doc_field(4, "roll by randint(0, jitter) px per axis each iteration (official: 32 at 224 px, "
                               "4 below)")
    crop: bool = doc_field(True, "random-resized crop each iteration (official CIFAR recover: none, roll only)")
    flip: bool = doc_field(True, "random horizontal flip each iteration (official CIFAR recover: none)")
    crop_scale_min: float = doc_field(0.08, "smallest area fraction of the random-resized crop (with "
                                            "crop_schedule=cda: where the schedule ends)")
    # CDA (Yin & Shen, TMLR 2024; CDA/recover_cda_in1k.py of github.com/VILA-Lab/SRe2L at 8d00cba): hashed only when
    # set, so runs made before these keys existed resume.
    crop_schedule: str = doc_field("none", "none | cda: CDA's curriculum, the crop's smallest area falls from "
                                           "cda_scale_start to crop_scale_min over cda_milestone x iterations",
                                   hash_if_set=True)
    cda_milestone: float = doc_field(1.0, "CDA: share of the iterations the schedule takes, in (0, 1] (official "
                                          "--milestone: README 1; its default 0 is crop_schedule=none)",
                                     hash_if_set=True)
    cda_mode: str = doc_field("cosine", "CDA: cosine | linear | step (step: cda_scale_start until the "
                                        "milestone) (official --easy2hard-mode, cosine)", hash_if_set=True)
    cda_scale_start: float = doc_field(1.0, "CDA: smallest crop area at iteration 0 (official 1.0: the whole "
                                            "image)", hash_if_set=True)

    def validate(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"iterations must be > 0, got {self.iterations}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for key in ("r_bn", "r_var", "first_bn_multiplier"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.jitter < 0:
            raise ValueError(f"jitter must be >= 0, got {self.jitter}")
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ValueError(f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        if self.crop_schedule not in ("none", "cda"):
            raise ValueError(f"crop_schedule must be none or cda, got {self.crop_schedule!r}")
        if self.crop_schedule == "cda":
            if not self.crop:
                raise ValueError("crop_schedule=cda schedules the random-resized crop, which crop=false turns off")
            if not 0.0 < self.cda_milestone <= 1.0:
                raise ValueError(f"cda_milestone must be in (0, 1], got {self.cda_milestone}")
            if self.cda_mode not in ("cosine", "linear", "step"):
                raise ValueError(f"cda_mode must be cosine, linear or step, got {self.cda_mode!r}")
            if not self.crop_scale_min <= self.cda_scale_start <= 1.0:
                raise ValueError(f"cda_scale_start must be in [crop_scale_min, 1] = [{self.crop_scale_min}, 1], "
                                 f"got {self.cda_scale_start}")

    def recover_params(self) -> Any:
        """The `RecoverParams` of these settings (the synthesis loop's hyperparameters)."""
        from pipeline.methods.synthesis import RecoverParams

        return RecoverParams(iterations=self.iterations, lr=self.lr, r_bn=self.r_bn, r_var=self.r_var,
                             first_bn_multiplier=self.first_bn_multiplier, crop_scale=(self.crop_scale_min, 1.0),
                             jitter=self.jitter, crop=self.crop, flip=self.flip, crop_schedule=self.crop_schedule,
                             cda_milestone=self.cda_milestone, cda_scale_start=self.cda_scale_start,
                             cda_mode=self.cda_mode)


AUTO_COMPILE_MIN = 1000
"""`recover.compile=auto` compiles for a unit of at least this many batch-iterations (iterations x IPC batches):
measured on 2 CPU cores (ConvNet, 32 px) the compile costs 20-40 s and saves about 40 ms per batch-iteration,
so it pays from roughly 500-1000 of them; the demo's units (300 x 5) are above, the tests' tiny units below. On an
H200 (ResNet-18, 224 px, batches of 100, bf16, channels_last) it took 25-35 s and saved 13 ms per batch-iteration
(2.3x): it pays from about 2000 there, and ImageNet units (2000-4000 iterations x 10 batches) are far above."""


def wants_compile(mode: str, iterations: int, batches: int) -> bool:
    """Whether a unit of `batches` synthesis batches of `iterations` each runs the compiled objective."""
    return mode == "on" or (mode == "auto" and iterations * batches >= AUTO_COMPILE_MIN)


AUTO_FORWARD_IMAGES = 1024
"""`recover.batches_per_forward=0` (auto) on a GPU: as many of a unit's batches per forward as keep it at most
this many images (10 batches of 100 classes; a batch of more classes stays alone). On a CPU auto is 1: `distill
bench`'s `recover/sre2l-merged` row (ConvNet, 32 px, eager, 1 thread) ran 5 batches of 10 in one forward at 0.77x
and 10 batches of 100 at 0.81x the batches one by one. On an H200 (ResNet-18, 224 px, bf16, channels_last, compiled;
`benchmarks/gpu_check.py`, docs/benchmarks.md) 10 batches of 100 in one forward ran 14,912 image-iterations/s against
10,160 one by one (1.47x; 1.24x eager with 4 batches). If the merged
forward runs out of GPU memory, the group is halved and redone (nothing is drawn again, so the result is the
same) and the worker keeps the smaller size."""


def forward_groups(setting: int, device_type: str, batch: int, batches: int, dwa: bool) -> int:
    """How many of a unit's `batches` synthesis batches (of `batch` images each) share one forward."""
    if dwa:  # one weight perturbation per batch: the batches cannot share a teacher
        return 1
    if setting == 0:
        setting = max(1, AUTO_FORWARD_IMAGES // max(1, batch)) if device_type == "cuda" else 1
    return max(1, min(setting, batches))


class SynthesisWorker:
    """Runs `synthesize_batch` for each IPC index of a unit; with `dwa` settings, DWA's perturbation first.

    It keeps one `TeacherObjective` (compiled or eager) for all the units it runs, so a worker compiles once
    per batch shape; under `recover.compile=auto` a compile that fails (no C++ compiler, an unsupported model)
    is logged once and the worker goes on eagerly, redoing the batch from the same generator state."""

    def __init__(self, env: Any, cfg: Sre2lConfig, dwa: Any = None) -> None:
        self.env, self.cfg, self.dwa = env, cfg, dwa
        self._objectives: dict[tuple[bool, int], Any] = {}
        self._compile_failed = False
        self._max_groups: int | None = None  # lowered when a merged forward ran out of GPU memory

    def objective(self, compiled: bool, groups: int = 1) -> Any:
        from pipeline.methods.synthesis import TeacherObjective

        if (compiled, groups) not in self._objectives:
            self._objectives[compiled, groups] = TeacherObjective(self.env.teacher, self.cfg.r_var,
                                                                  self.cfg.first_bn_multiplier, self.env.amp,
                                                                  compile=compiled, groups=groups)
        return self._objectives[compiled, groups]

    def _synthesize(self, compiled: bool, gen: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any, bool]:
        from pipeline.methods.synthesis import synthesize_batch

        groups = len(kwargs["draws"]) if kwargs.get("draws") is not None else 1
        if compiled and not self._compile_failed:
            state = gen.get_state()
            try:
                return (*synthesize_batch(*args, gen=gen, objective=self.objective(True, groups), **kwargs), True)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back under auto
                if self.env.compile == "on" or _is_oom(exc):
                    raise
                log.warning("recover.compile=auto: torch.compile failed (%s: %s); running eagerly",
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                self._compile_failed = True
                gen.set_state(state)
        return (*synthesize_batch(*args, gen=gen, objective=self.objective(False, groups), **kwargs), False)

    def _synthesize_merged(self, compiled: bool, gen: Any, targets: Any, inits: list[Any], draws: list[Any],
                           params: Any) -> tuple[Any, Any, bool]:
        """Batches `inits` (with their `draws`) in one forward; out of GPU memory: halves, each in its own."""
        import torch

        env = self.env
        try:
            return self._synthesize(compiled, gen, env.teacher, targets.repeat(len(inits)), torch.cat(inits),
                                    params, draws=draws, mean=env.mean, std=env.std, autocast_dtype=env.amp,
                                    channels_last=env.channels_last)
        except Exception as exc:
            if not _is_oom(exc) or len(inits) == 1:
                raise
            half = len(inits) // 2
            self._max_groups = half
            log.warning("recover.batches_per_forward: %d batches in one forward ran out of GPU memory; "
                        "going on with %d", len(inits), half)
            if env.device.type == "cuda":
                torch.cuda.empty_cache()
            a = self._synthesize_merged(compiled, gen, targets, inits[:half], draws[:half], params)
            b = self._synthesize_merged(compiled, gen, targets, inits[half:], draws[half:], params)
            hist = {k: torch.cat([a[1][k], b[1][k]], dim=1) for k in a[1]}
            return torch.cat([a[0], b[0]]), hist, a[2] and b[2]

    def run(self, classes: range, ipc: range, gen: Any, unit_key: str) -> MethodOutput:
        import torch

        from pipeline.methods.synthesis import DWAParams

        env, c = self.env, self.cfg
        params = c.recover_params()
        targets = torch.tensor(list(classes), dtype=torch.long, device=env.device)
        out = MethodOutput()
        finals: list[dict[str, float]] = []
        radius: list[torch.Tensor] = []
        compiled = wants_compile(env.compile, c.iterations, len(ipc))
        compiled_batches = 0
        groups = forward_groups(env.batches_per_forward, env.device.type, len(targets), len(ipc),
                                self.dwa is not None)
        if self._max_groups is not None:
            groups = min(groups, self._max_groups)
        if groups > 1:
            return self._run_merged(classes, ipc, gen, params, targets, compiled, groups)
        for j in ipc:
            init = self._init_batch(classes, j, gen)
            subset = self.dwa.subset(env, classes, unit_key, j) if self.dwa is not None else None
            images, hist, was_compiled = self._synthesize(
                compiled, gen, env.teacher, targets, init, params, dwa_batch=subset,
                dwa=DWAParams(steps=self.dwa.steps, rho=self.dwa.rho) if subset is not None else None,
                mean=env.mean, std=env.std, autocast_dtype=env.amp, channels_last=env.channels_last)
            compiled_batches += int(was_compiled)
            if "dwa_delta_norm" in hist:
                radius.append(hist.pop("dwa_delta_norm"))
            self._keep(out, finals, hist, classes, images, j)
        return self._finish(out, finals, compiled_batches, len(ipc), radius, 1)

    def _run_merged(self, classes: range, ipc: range, gen: Any, params: Any, targets: Any, compiled: bool,
                    groups: int) -> MethodOutput:
        """SRe2L with `groups` IPC batches per forward: each batch's init and all its augmentations are drawn
        from `gen` in the order of the one-batch loop before any is optimized, so the draws are the same."""
        from pipeline.methods.synthesis import draw_augment

        env, c = self.env, self.cfg
        out = MethodOutput()
        finals: list[dict[str, float]] = []
        compiled_batches = 0
        order = list(ipc)
        for start in range(0, len(order), groups):
            chunk = order[start:start + groups]
            inits, draws = [], []
            for j in chunk:
                inits.append(self._init_batch(classes, j, gen))
                draws.append([draw_augment(gen, env.resolution, env.resolution, params.crop_scale_at(it),
                                           params.jitter, params.flip, params.crop) for it in range(c.iterations)])
            images, hist, was_compiled = self._synthesize_merged(compiled, gen, targets, inits, draws, params)
            compiled_batches += len(chunk) * int(was_compiled)
            n = len(targets)
            for g, j in enumerate(chunk):
                self._keep(out, finals, {k: v[:, g] for k, v in hist.items()}, classes, images[g * n:(g + 1) * n], j)
        return self._finish(out, finals, compiled_batches, len(ipc), [], groups)

    def _init_batch(self, classes: range, j: int, gen: Any) -> Any:
        """Batch `j`'s starting images, one per class: real ones where the init asks for them, else noise."""
        from pipeline.methods.synthesis import init_images

        env = self.env
        real = env.init_batch(classes, j) if env.init.startswith("real") else None
        return init_images("real" if real is not None else env.init, len(classes), env.resolution, gen,
                           real=real, device=env.device)

    def _keep(self, out: MethodOutput, finals: list[dict[str, float]], hist: dict[str, Any], classes: range,
              images: Any, j: int) -> None:
        """Adds batch `j`'s images to `out` and its loss summary (mean of the last 5 %, and the first) to
        `finals`; `hist` holds one loss curve per key for this batch."""
        tail = max(1, self.cfg.iterations // 20)
        last = {k: float(v[-tail:].mean()) for k, v in hist.items()}  # one host sync per batch
        last.update({f"{k}_first": float(v[0]) for k, v in hist.items()})
        finals.append(last)
        out.add(images, classes, [j] * len(classes))

    def _finish(self, out: MethodOutput, finals: list[dict[str, float]], compiled_batches: int, batches: int,
                radius: list[Any], groups: int) -> MethodOutput:
        import numpy as np
        import torch

        c = self.cfg
        out.metrics["image_iterations"] = len(out.images) * c.iterations
        out.metrics["compiled"] = bool(compiled_batches) and compiled_batches == batches
        out.metrics["batches_per_forward"] = min(groups, self._max_groups or groups)
        if radius and self.dwa.rho > 0:
            # Achieved ||delta|| / rho, mean over the unit's batches (official code: about 0.995).
            out.metrics["dwa_radius_ratio"] = round(float(torch.cat(radius).mean()) / self.dwa.rho, 6)
        for k in finals[0] if finals else []:
            out.metrics[f"loss_{k}"] = float(np.mean([f[k] for f in finals]))
        return out


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError)


@register("sre2l", description="SRe2L: optimize noise against the teacher's CE and BatchNorm statistics",
          needs=Needs(teacher=True, bn_teacher=True), config=Sre2lConfig, default_init="noise")
def open_sre2l(env: Any, cfg: Sre2lConfig) -> SynthesisWorker:
    return SynthesisWorker(env, cfg)
