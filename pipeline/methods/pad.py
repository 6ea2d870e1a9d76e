"""PAD, prioritize alignment (Li et al., "Prioritize Alignment in Dataset Distillation", 2024;
github.com/NUS-HPC-AI-Lab/PAD @2a4bc91, `distill/PAD.py`), on DATM (Guo et al., "Towards Lossless Dataset
Distillation via Difficulty-Aligned Trajectory Matching", ICLR 2024; github.com/NUS-HPC-AI-Lab/DATM @97ae510).

MTT's loop (`pipeline.methods.mtt`) with:
* DATM's start-epoch window: t uniform in [min_start_epoch, upper), upper growing from `start_upper` to
  max_start_epoch over `start_growth_iterations` iterations (IPC 1: fixed; a shortened schedule keeps DATM's
  proportions: at IPC 10 from half of max_start_epoch over the first tenth of the iterations);
* DATM's learned soft labels: logits [IPC x C, C], initialized per image as the mean final-epoch logits of the
  experts that classify it correctly (all experts where none does), learned by SGD (lr_label, momentum 0.9);
  the inner loop's loss is CE against their softmax. They are stored with the set, and the `own` student protocol
  learns them (DATM's and PAD's evaluation);
* DATM's threshold: an iteration whose loss exceeds `loss_threshold` updates nothing;
* PAD's parameter selection (`mask`): `loss-ratio` (today's `PAD.py`: leave out the `mask_ratio` share of single
  parameters whose error is smallest, every iteration) or `deep-layers` (the paper's, and the deleted
  `PAD_depth.py`: leave out the first `mask_ratio` share of the flat parameter vector, the shallow layers);
* PAD's easy-first data scheduler for the experts: `experts.schedule = pad` (the experts stage).

Defaults: auto (0, or -1 where 0 is a value) = PAD's CIFAR-10 config for the run's IPC row (1, 10, 50; see
`pipeline.methods.mtt.official_row`). Differences: the init images are those the squeeze teacher classifies
correctly (`recover.init = real-correct`; DATM/PAD ask the first expert); the experts are trained with plain SGD
(DATM/PAD: GSAM); no ZCA; PAD.py's undefined `loss_threshold_low` (an AttributeError as committed) is read as
"mask when mask_ratio > 0".
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from pipeline.methods.base import Needs, doc_field, register
from pipeline.methods.mtt import MEMORY_CHOICES, TM_DIFFERENCES, TrajectoryWorker, check_window, official_row

log = logging.getLogger(__name__)

# PAD's CIFAR-10 configs by IPC row: expert_epochs, max_start_epoch, start_upper, start_growth_iterations, lr_img,
# lr_lr, lr_label, loss_threshold, mask_ratio (syn_steps 80, lr_teacher 0.01, 10000 iterations throughout).
PAD_ROWS = {1: (2, 4, 0, 0, 100.0, 1e-7, 5.0, 1.1, 0.0), 10: (2, 20, 10, 1000, 100.0, 1e-5, 2.0, 1.0, 0.5),
            50: (3, 40, 20, 2000, 1000.0, 1e-5, 2.0, 1.0, 0.25)}
OFFICIAL_ITERATIONS = 10000
PAD_KEYS = ("expert_epochs", "max_start_epoch", "start_upper", "start_growth_iterations", "lr_img", "lr_lr", "lr_label",
            "loss_threshold", "mask_ratio")
MASK_CHOICES = ("loss-ratio", "deep-layers", "none")
MINUS_ONE_AUTO = ("start_upper", "start_growth_iterations", "mask_ratio")


@dataclass
class PadConfig:
    """PAD's settings (`recover.pad.*`); 0 (or -1 where 0 is a value) = auto: PAD's CIFAR-10 value for the IPC."""

    iterations: int = doc_field(OFFICIAL_ITERATIONS, "outer iterations (official 10000)")
    syn_steps: int = doc_field(80, "student steps per iteration (official 80)")
    expert_epochs: int = doc_field(0, "epochs of the expert the student's steps must cover; auto 2 / 2 / 3")
    min_start_epoch: int = doc_field(0, "start epochs are drawn from [min_start_epoch, upper) (official 0)")
    max_start_epoch: int = doc_field(0, "the final upper bound of the start epoch; auto 4 / 20 / 40")
    start_upper: int = doc_field(-1, "the first upper bound, growing to max_start_epoch (0 = fixed window); "
                                     "auto (-1) 0 / 10 / 20, i.e. 0 / 1/2 / 1/2 of max_start_epoch")
    start_growth_iterations: int = doc_field(-1, "iterations over which the upper bound grows; auto (-1) 0 / 1000 / "
                                                 "2000, i.e. 0 / 1/10 / 1/5 of iterations")
    lr_img: float = doc_field(0.0, "SGD lr of the images (momentum 0.5); auto 100 / 100 / 1000")
    lr_lr: float = doc_field(0.0, "SGD lr of the learned step size (momentum 0.5); auto 1e-7 / 1e-5 / 1e-5")
    lr_teacher: float = doc_field(0.01, "the step size's initial value (official 0.01)")
    lr_label: float = doc_field(0.0, "SGD lr of the learned label logits (momentum 0.9); auto 5 / 2 / 2")
    label_momentum: float = doc_field(0.9, "SGD momentum of the labels (official 0.9)")
    loss_threshold: float = doc_field(0.0, "no update in an iteration whose loss is above it; auto 1.1 / 1 / 1")
    mask: str = doc_field("loss-ratio", "parameter selection: loss-ratio (today's PAD.py: the smallest-error share "
                                        "of single parameters left out) | deep-layers (the paper's: the first share "
                                        "of the flat vector, the shallow layers, left out) | none")
    mask_ratio: float = doc_field(-1.0, "the share the mask leaves out; auto (-1) 0 / 0.5 / 0.25 (PAD's loss_ratio "
                                        "and depth_ratio)")
    batch_syn: int = doc_field(0, "synthetic images per student step; 0 = all (PAD's configs: at least all)")
    strategy: str = doc_field("color_crop_cutout_flip_scale_rotate", "DSA strategy of every student step")
    memory: str = doc_field("unrolled", "unrolled (official) | tesla (constant memory; see recover.mtt.memory)")

    def validate(self) -> None:
        from pipeline.methods.dm import check_strategy

        if self.iterations < 1:
            raise ValueError(f"iterations must be > 0, got {self.iterations}")
        if self.syn_steps < 1:
            raise ValueError(f"syn_steps must be >= 1, got {self.syn_steps}")
        for key in ("expert_epochs", "min_start_epoch", "max_start_epoch", "batch_syn"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        for key in ("lr_img", "lr_lr", "lr_label", "loss_threshold"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be > 0 (or 0 = auto), got {getattr(self, key)}")
        if not self.lr_teacher > 0:
            raise ValueError(f"lr_teacher must be > 0, got {self.lr_teacher}")
        if not 0 <= self.label_momentum < 1:
            raise ValueError(f"label_momentum must be in [0, 1), got {self.label_momentum}")
        if self.mask not in MASK_CHOICES:
            raise ValueError(f"mask must be one of {', '.join(MASK_CHOICES)}, got {self.mask!r}")
        if not (self.mask_ratio == -1.0 or 0.0 <= self.mask_ratio < 1.0):
            raise ValueError(f"mask_ratio must be in [0, 1) (or -1 = auto), got {self.mask_ratio}")
        if self.memory not in MEMORY_CHOICES:
            raise ValueError(f"memory must be one of {', '.join(MEMORY_CHOICES)}, got {self.memory!r}")
        check_strategy(self.strategy)

    def resolved(self, ipc: int) -> dict[str, Any]:
        row = dict(zip(PAD_KEYS, PAD_ROWS[official_row(ipc)], strict=True))
        # auto is -1 for the keys where 0 is a value, 0 for the others
        out = {k: v if getattr(self, k) == (-1 if k in MINUS_ONE_AUTO else 0) else getattr(self, k)
               for k, v in row.items()}
        # DATM's growing window keeps its proportions when max_start_epoch or iterations are not the official ones
        # (a shortened schedule): it starts at start_upper / max_start_epoch of the bound (1/2 at IPC 10 and 50) and
        # grows over that share of the iterations (1/10, 1/5); at the official values these are the official ones
        if self.start_upper == -1 and row["start_upper"]:
            out["start_upper"] = round(row["start_upper"] * out["max_start_epoch"] / row["max_start_epoch"])
        if self.start_growth_iterations == -1 and row["start_growth_iterations"]:
            share = row["start_growth_iterations"] / OFFICIAL_ITERATIONS
            out["start_growth_iterations"] = round(share * self.iterations)
        return {**out, "syn_steps": self.syn_steps, "lr_teacher": self.lr_teacher,
                "min_start_epoch": self.min_start_epoch}

    def validate_run(self, cfg: Any) -> None:
        r = self.resolved(cfg.recover.ipc)
        check_window(r, cfg, "pad")
        if r["min_start_epoch"] >= r["max_start_epoch"]:
            raise ValueError(f"config key 'recover.pad.min_start_epoch' ({r['min_start_epoch']}) must be below "
                             f"max_start_epoch ({r['max_start_epoch']})")
        if r["start_upper"] and not r["min_start_epoch"] < r["start_upper"] <= r["max_start_epoch"]:
            raise ValueError(f"config key 'recover.pad.start_upper' ({r['start_upper']}): the start window's first upper "
                             f"bound must be above min_start_epoch ({r['min_start_epoch']}) and at most max_start_epoch "
                             f"({r['max_start_epoch']}); set it in that range, 0 for a fixed window, or -1 (auto: "
                             "DATM's share of max_start_epoch)")
        if cfg.experts.schedule == "none":
            log.warning("recover.method=pad with experts.schedule=none: PAD trains its experts with its easy-first "
                        "data scheduler (experts.schedule=pad or auto)")


class PadWorker(TrajectoryWorker):
    learns_labels = True

    def settings(self, ipc: int) -> Any:
        from pipeline.methods.trajectory import InnerLoop, TrajectoryMatching

        r, c = self.cfg.resolved(ipc), self.cfg
        inner = InnerLoop(syn_steps=r["syn_steps"], batch_syn=c.batch_syn, strategy=c.strategy,
                          mask=c.mask if r["mask_ratio"] > 0 else "none", mask_ratio=r["mask_ratio"],
                          memory=c.memory)
        return TrajectoryMatching(iterations=c.iterations, inner=inner, expert_epochs=r["expert_epochs"],
                                  max_start_epoch=r["max_start_epoch"], min_start_epoch=r["min_start_epoch"],
                                  start_upper=r["start_upper"], start_growth_iterations=r["start_growth_iterations"],
                                  lr_img=r["lr_img"], lr_lr=r["lr_lr"], lr_label=r["lr_label"],
                                  label_momentum=c.label_momentum,
                                  loss_threshold=r["loss_threshold"] if r["loss_threshold"] > 0 else math.inf)

    def initial_labels(self, reader: Any, net: Any, images: Any, classes: range, ipc: range) -> Any:
        """Per image, the mean final-epoch logits of the experts that classify it correctly (DATM's init; all
        experts for an image none classifies correctly)."""
        import torch

        hard = super().initial_labels(reader, net, images, classes, ipc)
        total = torch.zeros(len(images), len(classes), device=images.device)
        count = torch.zeros(len(images), 1, device=images.device)
        every = torch.zeros_like(total)
        with torch.no_grad():
            for e in range(reader.num_experts):
                logits = net(images, reader.snapshot(e, reader.epochs).to(images.device)).float()
                right = (logits.argmax(1) == hard).float().unsqueeze(1)
                total += logits * right
                count += right
                every += logits
        return torch.where(count > 0, total / count.clamp_min(1), every / reader.num_experts)


@register("pad", description="PAD: trajectory matching with DATM's learned soft labels and start window, PAD's "
                             "parameter selection and easy-first experts",
          needs=Needs(real_images=True, artifacts=("trajectories",)), config=PadConfig, all_classes=True,
          default_init="real-correct", hard_augment="dsa",
          differences=(*TM_DIFFERENCES,
                       "the experts are trained with plain SGD (DATM and PAD: GSAM, rho 0.01, alpha 0.3)",
                       "the experts' easy-first data schedule orders each class by the teacher's mean loss over its "
                       "last training epochs, for any per-class count (official: a precomputed GraNd / uncertainty "
                       "ranking of DeepCore, hard-coded as 5000 images per class)",
                       "init real-correct asks the squeeze teacher (official: the first expert's final epoch)",
                       "the mask applies whenever mask_ratio > 0 (PAD.py as committed reads an undefined "
                       "loss_threshold_low)"))
def open_pad(env: Any, cfg: PadConfig) -> PadWorker:
    return PadWorker(env, cfg)
