"""DM, distribution matching (Zhao & Bilen, "Dataset Condensation with Distribution Matching", WACV 2023;
https://github.com/VICO-UoE/DatasetCondensation, `main_DM.py`).

Per iteration a fresh random ConvNet-3 (instance norm), in train mode and never trained, embeds a Siamese-DSA
view of 256 real images and of the IPC synthetic images of each class; the loss is
sum_c ||mean embed(real_c) - mean embed(S_c)||^2 and one SGD step (lr 1, momentum 0.5) moves all images. The
compute is `pipeline.methods.matching.distribution_matching`; this file maps the config onto it and holds what the
matching methods (`dm`, `datadam`, `dc`, `dsa`) share: loading a unit's real images, the init, the output.

Differences from the official code: the per-iteration network is seeded from the unit's generator instead of
the clock; the images of a unit's classes are optimized without the other classes (identical while one unit
holds all classes, the default up to 100 classes, because the loss is a sum over classes); the network of a
unit has max(2, classes of the unit) outputs (unused by DM's embedding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.methods.base import MethodOutput, Needs, doc_field, register

NORMS = ("instance", "batch", "none")
_LOAD_CHUNK = 512  # real images decoded at once while filling the cache (bounds the float temporary)


@dataclass
class NetConfig:
    """The random network of every outer iteration (`width`, `depth`, `norm`), shared by the matching methods."""

    width: int = doc_field(128, "ConvNet width (channels of every conv layer); official 128")
    depth: int = doc_field(3, "ConvNet depth (conv blocks); official 3")
    norm: str = doc_field("instance", "ConvNet norm: instance (official 'ConvNet': GroupNorm(width, width)) | "
                                      "batch | none")

    def validate(self) -> None:
        if self.width < 1 or self.depth < 1:
            raise ValueError(f"width and depth must be > 0, got {self.width}, {self.depth}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")


def check_strategy(strategy: str) -> None:
    from pipeline.augment.dsa import parse_strategy

    parse_strategy(strategy)  # ValueError naming the bad operation


@dataclass
class DmConfig(NetConfig):
    """DM's settings (`recover.dm.*`). Defaults: the official `main_DM.py` arguments and readme command for
    CIFAR (`--init real --lr_img 1`, 20000 iterations, batch_real 256, the full DSA strategy)."""

    iterations: int = doc_field(20000, "outer iterations (one fresh network and one image step each)")
    lr: float = doc_field(1.0, "SGD learning rate on the normalized images")
    momentum: float = doc_field(0.5, "SGD momentum on the images")
    batch_real: int = doc_field(256, "real images per class per iteration (all of a class if it has fewer)")
    strategy: str = doc_field("color_crop_cutout_flip_scale_rotate",
                              "Siamese DSA strategy, '_'-joined from color, crop, cutout, flip, scale, rotate "
                              "('none' = no augmentation); official: drop flip for digits "
                              "(color_crop_cutout_scale_rotate)")

    def validate(self) -> None:
        super().validate()
        if self.iterations < 1:
            raise ValueError(f"iterations must be > 0, got {self.iterations}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.batch_real < 1:
            raise ValueError(f"batch_real must be > 0, got {self.batch_real}")
        check_strategy(self.strategy)


def load_real(env: Any, classes: range) -> Any:
    """The unit's real training images, all of each class, as a `RealImages` cache (uint8) on the device."""
    import torch

    from pipeline.methods.matching import RealImages

    pool = env.require_real()
    per_class = []
    for c in classes:
        rows = pool.rows(c)
        chunks = [RealImages.to_bytes(pool.batch(rows[i:i + _LOAD_CHUNK]), env.mean, env.std)
                  for i in range(0, len(rows), _LOAD_CHUNK)]
        per_class.append(torch.cat(chunks).to(env.device))
    return RealImages(per_class, env.mean, env.std)


def initial_images(env: Any, classes: range, ipc: range, gen: Any) -> Any:
    """[K * ipc, 3, R, R] normalized, class-major: a real init = `env.init_batch(classes, j)` for each ipc index j
    (for `real`, the images random-real picks; `real-correct` / `real-herding` / `real-k-center` as the other
    methods), noise = standard normal from the unit's generator (the official `torch.randn`)."""
    import torch

    k, n = len(classes), len(ipc)
    if env.init.startswith("real"):
        per_j = torch.stack([env.init_batch(classes, j).float() for j in ipc], dim=1)  # [K, n, 3, R, R]
        return per_j.reshape(k * n, *per_j.shape[2:]).to(env.device)
    if env.init == "noise":
        return torch.randn((k * n, 3, env.resolution, env.resolution), generator=gen).to(env.device)
    raise ValueError(f"matching methods start from real or noise images, got init {env.init!r}")


def net_spec(env: Any, cfg: NetConfig, classes: range) -> Any:
    from pipeline.methods.matching import NetSpec

    return NetSpec(num_classes=max(2, len(classes)), resolution=env.resolution, width=cfg.width, depth=cfg.depth,
                   norm=cfg.norm)  # type: ignore[arg-type]


def method_output(env: Any, images: Any, hist: dict[str, Any], classes: range, ipc: range,
                  iterations: int) -> MethodOutput:
    """Denormalize and clamp to [0, 1] (only here: the official code never clamps while optimizing), one image
    per (class, ipc index) in class-major order, and the loss figures (one host sync)."""
    from pipeline.core.imageops import denormalize
    from pipeline.methods.matching import summarize

    pixels = denormalize(images, env.mean, env.std).clamp_(0.0, 1.0).cpu()
    out = MethodOutput(metrics=summarize(hist))
    out.add(pixels, [c for c in classes for _ in ipc], [j for _ in classes for j in ipc])  # class-major
    out.metrics["image_iterations"] = len(out.images) * iterations
    return out


class DistributionMatchingWorker:
    """DM; `pipeline.methods.datadam` subclasses it, adding the attention terms and its own image lr."""

    def __init__(self, env: Any, cfg: DmConfig) -> None:
        self.env, self.cfg = env, cfg

    def attention(self) -> Any:
        """None: DM has no attention term."""
        return None

    def image_lr(self, ipc: int) -> float:
        return self.cfg.lr

    def settings(self, ipc: int) -> Any:
        from pipeline.methods.matching import DistributionMatching

        c = self.cfg
        return DistributionMatching(iterations=c.iterations, lr=self.image_lr(ipc), momentum=c.momentum,
                                    batch_real=c.batch_real, strategy=c.strategy, attention=self.attention())

    def run(self, classes: range, ipc: range, gen: Any, unit_key: str) -> MethodOutput:
        from pipeline.methods.matching import distribution_matching

        env = self.env
        real = load_real(env, classes)
        init = initial_images(env, classes, ipc, gen)
        images, hist = distribution_matching(init, len(ipc), real, net_spec(env, self.cfg, classes), gen,
                                             self.settings(len(ipc)), amp=env.amp, ckpt=env.checkpoint(unit_key))
        return method_output(env, images, hist, classes, ipc, self.cfg.iterations)


@register("dm", description="DM: match mean embeddings of real and synthetic images in random ConvNets",
          needs=Needs(real_images=True), config=DmConfig, whole_class=True, default_init="real",
          hard_augment="dsa")
def open_dm(env: Any, cfg: DmConfig) -> DistributionMatchingWorker:
    return DistributionMatchingWorker(env, cfg)
