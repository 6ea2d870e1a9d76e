"""SRe2L recover (Yin, Xing, Shen, NeurIPS 2023; https://github.com/VILA-Lab/SRe2L).

Per batch of one image of each class of the unit: Adam on the normalized pixels against the frozen teacher,
loss CE + r_bn * BN-statistics term, one random crop / flip / roll per iteration, last iterate saved. The
compute is `pipeline.synthesis.synthesize_batch`; this file only maps the config onto it. DWA
(`pipeline.methods.dwa`) is the same worker with a weight perturbation before each batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.methods.base import MethodOutput, Needs, doc_field, register


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
    crop_scale_min: float = doc_field(0.08, "smallest area fraction of the random-resized crop")

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


class SynthesisWorker:
    """Runs `synthesize_batch` for each IPC index of a unit; with `dwa` settings, DWA's perturbation first."""

    def __init__(self, env: Any, cfg: Sre2lConfig, dwa: Any = None) -> None:
        self.env, self.cfg, self.dwa = env, cfg, dwa

    def run(self, classes: range, ipc: range, gen: Any, unit_key: str) -> MethodOutput:
        import numpy as np
        import torch

        from pipeline.synthesis import DWAParams, RecoverParams, init_images, synthesize_batch

        env, c = self.env, self.cfg
        params = RecoverParams(iterations=c.iterations, lr=c.lr, r_bn=c.r_bn, r_var=c.r_var,
                               first_bn_multiplier=c.first_bn_multiplier, crop_scale=(c.crop_scale_min, 1.0),
                               jitter=c.jitter, crop=c.crop, flip=c.flip)
        targets = torch.tensor(list(classes), dtype=torch.long, device=env.device)
        out = MethodOutput(images=[], classes=[], ipc_index=[])
        finals: list[dict[str, float]] = []
        radius: list[torch.Tensor] = []
        for j in ipc:
            real = env.init_batch(classes, j) if env.init.startswith("real") else None
            init = init_images("real" if real is not None else env.init, len(targets), env.resolution, gen,
                               real=real, device=env.device)
            subset = self.dwa.subset(env, classes, unit_key, j) if self.dwa is not None else None
            images, hist = synthesize_batch(
                env.teacher, targets, init, params, gen, dwa_batch=subset,
                dwa=DWAParams(steps=self.dwa.steps, rho=self.dwa.rho) if subset is not None else None,
                mean=env.mean, std=env.std, autocast_dtype=env.amp, channels_last=env.channels_last)
            if "dwa_delta_norm" in hist:
                radius.append(hist.pop("dwa_delta_norm"))
            tail = max(1, c.iterations // 20)
            last = {k: float(v[-tail:].mean()) for k, v in hist.items()}  # one host sync per batch
            last.update({f"{k}_first": float(v[0]) for k, v in hist.items()})
            finals.append(last)
            for cls, img in zip(classes, images, strict=True):
                out.images.append(img)
                out.classes.append(cls)
                out.ipc_index.append(j)
        out.metrics["image_iterations"] = len(out.images) * c.iterations
        if radius and self.dwa.rho > 0:
            # Achieved ||delta|| / rho, mean over the unit's batches (official code: about 0.995).
            out.metrics["dwa_radius_ratio"] = round(float(torch.cat(radius).mean()) / self.dwa.rho, 6)
        for k in finals[0] if finals else []:
            out.metrics[f"loss_{k}"] = float(np.mean([f[k] for f in finals]))
        return out


@register("sre2l", description="SRe2L: optimize noise against the teacher's CE and BatchNorm statistics",
          needs=Needs(teacher=True, bn_teacher=True), config=Sre2lConfig, default_init="noise")
def open_sre2l(env: Any, cfg: Sre2lConfig) -> SynthesisWorker:
    return SynthesisWorker(env, cfg)
