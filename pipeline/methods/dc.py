"""DC, gradient matching (Zhao, Mopuri & Bilen, "Dataset Condensation with Gradient Matching", ICLR 2021) and
DSA, the same with differentiable Siamese augmentation (Zhao & Bilen, ICML 2021); both from
https://github.com/VICO-UoE/DatasetCondensation, `main.py` and `utils.py` (`match_loss`, `distance_wb`,
`get_loops`, `DiffAugment`).

Per iteration a fresh random ConvNet-3 (instance norm); `outer_loop` times: for each class c the layer-wise
cosine distance between grad_theta CE(net(real_c)) (256 real images, a constant) and grad_theta CE(net(S_c))
(kept differentiable), summed over classes, one SGD step on the images (lr 0.1, momentum 0.5), then, except
after the last outer step, `inner_loop` epochs of plain SGD (lr 0.01, batch 256) of the network on S. DSA
applies one Siamese draw per class to real_c and S_c, and per-sample DSA in the inner loop. The compute is
`pipeline.methods.matching.gradient_matching`.

(outer, inner) per IPC is the official table (1: 1, 1; 10: 10, 50; 20: 20, 25; 30: 30, 20; 40: 40, 15;
50: 50, 10); the official code refuses other IPCs, here outer = IPC and inner is linearly interpolated
(`pipeline.methods.matching.dc_loops`), or both are set by `outer_loop` / `inner_loop`.

Differences from the official code: seeded networks (not the clock); a unit's classes are condensed without
the other classes, so with several units the inner loop trains the network on the unit's classes only
(identical while one unit holds all classes, the default up to 100); the network has max(2, classes of the
unit) outputs, since with one class the cross-entropy and its gradients vanish; fp32 even where `recover.amp`
asks for bf16 (the loss compares gradients through a second-order graph).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.methods.base import MethodOutput, Needs, doc_field, register
from pipeline.methods.dm import NetConfig, check_strategy, initial_images, load_real, method_output, net_spec


@dataclass
class DcConfig(NetConfig):
    """DC's settings (`recover.dc.*`). Defaults: the official `main.py` arguments (noise init)."""

    iterations: int = doc_field(1000, "outer iterations (one fresh network each); official 1000")
    outer_loop: int = doc_field(0, "image steps per iteration (0 = the official table by IPC, interpolated)")
    inner_loop: int = doc_field(0, "network epochs on the synthetic set between image steps (0 = the table)")
    lr_img: float = doc_field(0.1, "SGD learning rate on the normalized images")
    momentum: float = doc_field(0.5, "SGD momentum on the images")
    lr_net: float = doc_field(0.01, "SGD learning rate of the network in the inner loop (no momentum)")
    batch_real: int = doc_field(256, "real images per class per outer step (all of a class if it has fewer)")
    batch_train: int = doc_field(256, "batch size of the inner-loop training on the synthetic set")

    def validate(self) -> None:
        super().validate()
        for key in ("iterations", "batch_real", "batch_train"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        for key in ("outer_loop", "inner_loop"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0 (0 = from the table), got {getattr(self, key)}")
        for key in ("lr_img", "lr_net"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")

    def dsa_strategy(self) -> str | None:
        return None


@dataclass
class DsaConfig(DcConfig):
    """DSA's settings (`recover.dsa.*`): DC's plus the strategy. Defaults: the official readme command for CIFAR
    (`--method DSA --init real --dsa_strategy color_crop_cutout_flip_scale_rotate`, lr_img 0.1)."""

    strategy: str = doc_field("color_crop_cutout_flip_scale_rotate",
                              "Siamese DSA strategy, '_'-joined from color, crop, cutout, flip, scale, rotate; "
                              "official: drop flip for digits (color_crop_cutout_scale_rotate)")

    def validate(self) -> None:
        super().validate()
        check_strategy(self.strategy)

    def dsa_strategy(self) -> str | None:
        return self.strategy if self.strategy not in ("", "none", "None") else None


class GradientMatchingWorker:
    def __init__(self, env: Any, cfg: DcConfig) -> None:
        self.env, self.cfg = env, cfg

    def loops(self, ipc: int) -> tuple[int, int]:
        from pipeline.methods.matching import dc_loops

        outer, inner = dc_loops(ipc)
        return self.cfg.outer_loop or outer, self.cfg.inner_loop or inner

    def run(self, classes: range, ipc: range, gen: Any, unit_key: str) -> MethodOutput:
        from pipeline.methods.matching import GradientMatching, gradient_matching

        env, c = self.env, self.cfg
        outer, inner = self.loops(len(ipc))
        settings = GradientMatching(iterations=c.iterations, outer_loop=outer, inner_loop=inner, lr_img=c.lr_img,
                                    momentum=c.momentum, lr_net=c.lr_net, batch_real=c.batch_real,
                                    batch_train=c.batch_train, strategy=c.dsa_strategy())
        real = load_real(env, classes)
        init = initial_images(env, classes, ipc, gen)
        images, hist = gradient_matching(init, len(ipc), real, net_spec(env, c, classes), gen, settings,
                                         ckpt=env.checkpoint(unit_key))
        out = method_output(env, images, hist, classes, ipc, c.iterations)
        out.metrics.update(outer_loop=outer, inner_loop=inner)
        return out


@register("dc", description="DC: match real and synthetic gradients of random ConvNets trained on the synthetic set",
          needs=Needs(real_images=True), config=DcConfig, whole_class=True, default_init="noise")
def open_dc(env: Any, cfg: DcConfig) -> GradientMatchingWorker:
    return GradientMatchingWorker(env, cfg)


@register("dsa", description="DSA: DC with differentiable Siamese augmentation of real and synthetic images",
          needs=Needs(real_images=True), config=DsaConfig, whole_class=True, default_init="real",
          hard_augment="dsa")
def open_dsa(env: Any, cfg: DsaConfig) -> GradientMatchingWorker:
    return GradientMatchingWorker(env, cfg)
