"""The SRe2L / DWA objective: its hyperparameters, the BatchNorm-statistics term and the teacher's side of an
iteration (forward of the augmented batch, CE, BN statistics), optionally compiled.

The loss is CE(teacher(aug(x)), y) + r_bn * sum_l m_l * (||mu_l - rm_l||_2 + r_var * ||var_l - rv_l||_2), with the
statistics taken on the input of each BatchNorm2d layer l (running mean rm_l, running variance rv_l).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import TracebackType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.methods.synthesis.augment import CDA_MODES, cda_min_scale

_NO_BN_MESSAGE = "the teacher has no BatchNorm2d layers; SRe2L/DWA recover needs BN statistics"


@dataclass(frozen=True)
class RecoverParams:
    """Hyperparameters of the recover optimization (defaults: SRe2L/DWA ImageNet, except `iterations`)."""

    iterations: int
    lr: float = 0.25
    betas: tuple[float, float] = (0.5, 0.9)
    r_bn: float = 0.01
    r_var: float = 1.0
    first_bn_multiplier: float = 10.0
    crop_scale: tuple[float, float] = (0.08, 1.0)
    jitter: int = 32
    flip: bool = True
    crop: bool = True
    # CDA (curriculum): "cda" moves the crop's smallest area from cda_scale_start down to crop_scale[0] over the
    # first cda_milestone x iterations (`cda_min_scale`); "none" keeps crop_scale throughout.
    crop_schedule: str = "none"
    cda_milestone: float = 1.0
    cda_scale_start: float = 1.0
    cda_mode: str = "cosine"

    def crop_scale_at(self, it: int) -> tuple[float, float]:
        """The area range of iteration `it`'s random-resized crop: `crop_scale` itself without a schedule."""
        if self.crop_schedule == "none":
            return self.crop_scale
        lo, hi = self.crop_scale
        low = cda_min_scale(it, self.iterations, self.cda_milestone, self.cda_scale_start, lo, self.cda_mode)
        return min(low, hi), hi

    def __post_init__(self) -> None:
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"iterations must be an int >= 1, got {self.iterations!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two values in [0, 1), got {self.betas!r}")
        for name in ("r_bn", "r_var", "first_bn_multiplier"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale!r}")
        if isinstance(self.jitter, bool) or not isinstance(self.jitter, int) or self.jitter < 0:
            raise ValueError(f"jitter must be an int >= 0 (pixels), got {self.jitter!r}")
        if not isinstance(self.flip, bool) or not isinstance(self.crop, bool):
            raise ValueError(f"flip and crop must be bools, got {self.flip!r}, {self.crop!r}")
        if self.crop_schedule not in ("none", "cda"):
            raise ValueError(f"crop_schedule must be 'none' or 'cda', got {self.crop_schedule!r}")
        if self.crop_schedule == "cda":
            if not self.crop:
                raise ValueError("crop_schedule 'cda' schedules the random-resized crop, which crop=False turns off")
            if not 0.0 < self.cda_milestone <= 1.0:
                raise ValueError(f"cda_milestone must be in (0, 1], got {self.cda_milestone!r}")
            if not lo <= self.cda_scale_start <= hi:
                raise ValueError(f"cda_scale_start must be in [{lo}, {hi}] (the crop_scale range), got "
                                 f"{self.cda_scale_start!r}")
            if self.cda_mode not in CDA_MODES:
                raise ValueError(f"cda_mode must be one of {', '.join(CDA_MODES)}, got {self.cda_mode!r}")


@dataclass(frozen=True)
class DWAParams:
    """Directed weight adjustment: `steps` (K) ascent steps with total perturbation norm at most `rho`."""

    steps: int = 15
    rho: float = 15e-3

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"DWA steps must be an int >= 1, got {self.steps!r}")
        if not self.rho >= 0:
            raise ValueError(f"DWA rho must be >= 0, got {self.rho!r}")


class BNStatsHook:
    """Context manager hooking every `nn.BatchNorm2d` of a model to compute the BN-matching loss.

    On each forward, a hook takes the BN *input*, computes per-channel mean and biased variance over (N, H, W)
    in float32 and stores ||mean - running_mean||_2 + r_var * ||var - running_var||_2 for that layer.
    `loss(first_bn_multiplier)` sums the stored terms, the first BN layer (module order) weighted by the
    multiplier. Hooks are removed on exit.
    """

    def __init__(self, model: nn.Module, r_var: float = 1.0) -> None:
        self.r_var = float(r_var)
        self._bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self._bns:
            raise ValueError(_NO_BN_MESSAGE)
        for bn in self._bns:
            if bn.running_mean is None or bn.running_var is None:
                raise ValueError(
                    "every BatchNorm2d of the teacher needs running statistics (track_running_stats=True)"
                )
        self._terms: dict[int, Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.active = True  # False: the hooks stay registered but compute nothing (other forwards of the teacher)
        # > 1: the forward holds this many batches of equal size, one after the other; each term is then [groups],
        # the statistics of each batch alone (what that batch would give in a forward of its own).
        self.groups = 1

    def _make_hook(self, index: int):  # noqa: ANN202 - torch hook signature
        def hook(module: nn.BatchNorm2d, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if not self.active:
                return
            with torch.autocast(device_type=inputs[0].device.type, enabled=False):
                x = inputs[0].float()
                if self.groups == 1:
                    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
                    dims: int | tuple[int, ...] | None = None
                else:  # [G * B, C, H, W] -> per batch: mean, var [G, C]
                    var, mean = torch.var_mean(x.unflatten(0, (self.groups, -1)), dim=(1, 3, 4), correction=0)
                    dims = -1
                term = torch.linalg.vector_norm(mean - module.running_mean.float(), dim=dims) + self.r_var * (
                    torch.linalg.vector_norm(var - module.running_var.float(), dim=dims)
                )
            self._terms[index] = term

        return hook

    def __enter__(self) -> BNStatsHook:
        self._terms.clear()
        self._handles = [bn.register_forward_hook(self._make_hook(i)) for i, bn in enumerate(self._bns)]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._terms.clear()

    def terms(self) -> list[Tensor]:
        """The per-layer terms of the last forward, in module order (layers that did not run are skipped)."""
        return [self._terms[i] for i in sorted(self._terms)]

    def loss(self, first_bn_multiplier: float = 10.0) -> Tensor:
        """sum_l m_l * term_l over the last forward, with m = first_bn_multiplier for the first BN, else 1."""
        if not self._terms:
            raise RuntimeError("no BatchNorm2d statistics captured; run a forward inside the context first")
        total: Tensor | None = None
        for i in sorted(self._terms):
            t = self._terms[i] * first_bn_multiplier if i == 0 else self._terms[i]
            total = t if total is None else total + t
        assert total is not None
        return total


class TeacherObjective:
    """The teacher's part of one recover iteration: forward of an augmented batch, CE and the BN-statistics loss.

    `objective(xa, targets)` returns (ce, bn), both float32 scalars; the loss is ce + r_bn * bn. With
    `groups` = G > 1 the batch is G batches of equal size one after the other, and ce and bn are [G]: each
    batch's CE mean and BN-statistics term computed on its rows alone. The teacher runs in eval mode (BN
    normalizes with its running statistics), so a row's logits do not depend on the other rows of the forward,
    and sum(ce + r_bn * bn) has, for each batch's pixels, the gradient that batch has in a forward of its own.
    The BN hooks
    are registered once, for the object's life (`close()` removes them), and compute only inside a call, so
    other forwards of the teacher (DWA's ascent steps, feature passes) do not pay for them.

    `compile=True` wraps the call in `torch.compile` (static shapes): one compilation per batch shape and
    teacher, reused by every batch of the worker that owns the object. Parameters are inputs of the compiled
    graph, not constants, so DWA's in-place perturbation is seen. The compiled kernels fuse the memory-bound
    work around the convolutions (the BN statistics, BN, ReLU, pooling): about 2x per iteration for the
    ConvNet at 32 px on CPU, for a compilation of 20-40 s; its float results differ from eager in rounding
    only (`tests/test_synthesis.py` states the tolerance).
    """

    def __init__(self, teacher: nn.Module, r_var: float, first_bn_multiplier: float,
                 autocast_dtype: torch.dtype | None = None, compile: bool = False, groups: int = 1) -> None:
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be an int >= 1, got {groups!r}")
        self.teacher = teacher
        self.first_bn_multiplier = float(first_bn_multiplier)
        self.autocast_dtype = autocast_dtype
        self.groups = groups
        self.hook = BNStatsHook(teacher, r_var=r_var)  # raises early if the teacher has no BatchNorm2d
        self.hook.__enter__()
        self.hook.active = False
        self.hook.groups = groups
        if compile:  # inductor's C++ toolchain probe warns about CUDA_HOME on every CPU-only machine
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        self._fn = torch.compile(self._forward, dynamic=False) if compile else self._forward

    def _forward(self, xa: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        with torch.autocast(device_type=xa.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None):
            logits = self.teacher(xa)
        if self.groups == 1:
            ce = F.cross_entropy(logits.float(), targets)
        else:  # each batch's own mean
            ce = F.cross_entropy(logits.float(), targets, reduction="none").unflatten(0, (self.groups, -1)).mean(1)
        return ce, self.hook.loss(self.first_bn_multiplier)

    def __call__(self, xa: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        if xa.shape[0] % self.groups:
            raise ValueError(f"a batch of {xa.shape[0]} images does not split into {self.groups} equal batches")
        self.hook.active = True
        try:
            return self._fn(xa, targets)
        finally:
            self.hook.active = False
            self.hook._terms.clear()

    def close(self) -> None:
        self.hook.__exit__(None, None, None)
