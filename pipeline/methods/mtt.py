"""MTT, matching training trajectories (Cazenavette et al., "Dataset Distillation by Matching Training
Trajectories", CVPR 2022; github.com/GeorgeCazenavette/mtt-distillation @50dccea, `distill.py`).

Each iteration samples an expert of the experts stage and a start epoch t < max_start_epoch, trains a student from
the expert's snapshot at t for `syn_steps` differentiable SGD steps on batches of the synthetic set with a learnable
step size, and moves the images (SGD, momentum 0.5) and the step size (its own SGD, momentum 0.5) to bring the
student close to the expert's snapshot at t + expert_epochs (`pipeline.methods.trajectory`). Labels are hard.
The learned step size is the set's `syn_lr` (the unit record's `set_values`); the official evaluation trains the
student with it (`args.lr_net = syn_lr`), and so do this project's `hard` and `own` students of an mtt set
(`train.hard_lr_from_set`).

Defaults: `auto` (0) takes the official CIFAR-10 row for the run's IPC (1, 10, 50; other IPCs the nearest row
below: IPC 2-10 the IPC-10 row, above 10 the IPC-50 row), the values given by the MTT authors (their README links
them as an image; the text is in justincui03/dc_benchmark `methods/tm/readme.md`). Differences: no ZCA whitening
(the official CIFAR-10 IPC 1 and 10 rows use it: the set is stored as images); every unit covers all classes (the
loss couples them); the expert and start epoch come from the unit's generator; images are clamped to [0, 1] only
when stored, as the official code saves them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pipeline.methods.base import MethodOutput, Needs, doc_field, register

log = logging.getLogger(__name__)

# Official CIFAR-10 rows by IPC: syn_steps, expert_epochs, max_start_epoch, lr_img, lr_lr, lr_teacher.
MTT_ROWS = {1: (50, 2, 2, 100.0, 1e-7, 0.01), 10: (30, 2, 20, 100.0, 1e-5, 0.001), 50: (30, 2, 40, 1000.0, 1e-5, 0.001)}
MEMORY_CHOICES = ("unrolled", "tesla")


def official_row(ipc: int) -> int:
    """The official row an IPC takes its `auto` values from: 1, 10 or 50."""
    return 1 if ipc <= 1 else 10 if ipc <= 10 else 50


@dataclass
class MttConfig:
    """MTT's settings (`recover.mtt.*`); 0 = auto: the official CIFAR-10 value for the run's IPC."""

    iterations: int = doc_field(5000, "outer iterations (official 5000)")
    syn_steps: int = doc_field(0, "student steps per iteration; auto 50 / 30 / 30 at IPC 1 / 10 / 50")
    expert_epochs: int = doc_field(0, "epochs of the expert the student's steps must cover; auto 2")
    max_start_epoch: int = doc_field(0, "start epochs are drawn from [0, max_start_epoch); auto 2 / 20 / 40")
    lr_img: float = doc_field(0.0, "SGD lr of the images (momentum 0.5); auto 100 / 100 / 1000")
    lr_lr: float = doc_field(0.0, "SGD lr of the learned step size (momentum 0.5); auto 1e-7 / 1e-5 / 1e-5")
    lr_teacher: float = doc_field(0.0, "the step size's initial value; auto 0.01 / 0.001 / 0.001")
    batch_syn: int = doc_field(0, "synthetic images per student step; 0 = all (official default)")
    strategy: str = doc_field("color_crop_cutout_flip_scale_rotate", "DSA strategy of every student step")
    memory: str = doc_field("unrolled", "unrolled: the official backward through all steps (memory grows with "
                                        "syn_steps x batch_syn; the estimate is logged before the run) | tesla: "
                                        "TESLA's constant-memory gradient (drops the Hessian terms)")

    def validate(self) -> None:
        from pipeline.methods.dm import check_strategy

        if self.iterations < 1:
            raise ValueError(f"iterations must be > 0, got {self.iterations}")
        for key in ("syn_steps", "expert_epochs", "max_start_epoch", "batch_syn"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 1 (or 0 = auto), got {getattr(self, key)}")
        for key in ("lr_img", "lr_lr", "lr_teacher"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be > 0 (or 0 = auto), got {getattr(self, key)}")
        if self.memory not in MEMORY_CHOICES:
            raise ValueError(f"memory must be one of {', '.join(MEMORY_CHOICES)}, got {self.memory!r}")
        check_strategy(self.strategy)

    def resolved(self, ipc: int) -> dict[str, Any]:
        """Every setting with auto replaced by the official value for `ipc`."""
        row = dict(zip(("syn_steps", "expert_epochs", "max_start_epoch", "lr_img", "lr_lr", "lr_teacher"),
                       MTT_ROWS[official_row(ipc)], strict=True))
        return {k: getattr(self, k) or v for k, v in row.items()}

    def validate_run(self, cfg: Any) -> None:
        check_window(self.resolved(cfg.recover.ipc), cfg, "mtt")


def check_window(r: dict[str, Any], cfg: Any, key: str) -> None:
    """The latest target epoch, max_start_epoch - 1 + expert_epochs, must be a snapshot the experts have."""
    last = r["max_start_epoch"] - 1 + r["expert_epochs"]
    if r["max_start_epoch"] >= cfg.experts.epochs or last > cfg.experts.epochs:
        raise ValueError(
            f"config key 'recover.{key}.max_start_epoch' ({r['max_start_epoch']}) with 'recover.{key}.expert_epochs' "
            f"({r['expert_epochs']}) needs snapshots up to epoch {last}, but the experts train for experts.epochs="
            f"{cfg.experts.epochs}: lower max_start_epoch (at most experts.epochs - expert_epochs + 1) or raise "
            "experts.epochs")


class TrajectoryWorker:
    """MTT; `pipeline.methods.pad` subclasses it (learned labels, the start window, the threshold, the masks)."""

    learns_labels = False

    def __init__(self, env: Any, cfg: Any) -> None:
        self.env, self.cfg = env, cfg

    def settings(self, ipc: int) -> Any:
        from pipeline.methods.trajectory import InnerLoop, TrajectoryMatching

        r = self.cfg.resolved(ipc)
        inner = InnerLoop(syn_steps=r["syn_steps"], batch_syn=self.cfg.batch_syn, strategy=self.cfg.strategy,
                          memory=self.cfg.memory)
        return TrajectoryMatching(iterations=self.cfg.iterations, inner=inner, expert_epochs=r["expert_epochs"],
                                  max_start_epoch=r["max_start_epoch"], lr_img=r["lr_img"], lr_lr=r["lr_lr"])

    def student(self, reader: Any) -> Any:
        from pipeline.methods.trajectory import FlatNet
        from pipeline.models import build_model

        m = reader.meta
        module = build_model(m["arch"], m["num_classes"], m["resolution"]).to(self.env.device)
        return FlatNet(module, *reader.layout())

    def initial_labels(self, reader: Any, net: Any, images: Any, classes: range, ipc: range) -> Any:
        import torch

        return torch.tensor([c for c in classes for _ in ipc], device=self.env.device)

    def run(self, classes: range, ipc: range, gen: Any, unit_key: str) -> MethodOutput:
        from pipeline.methods.dm import initial_images, method_output
        from pipeline.methods.matching import summarize
        from pipeline.methods.trajectory import trajectory_matching

        env = self.env
        if classes.start != 0 or classes.stop != len(env.extra.get("class_names") or range(classes.stop)):
            raise ValueError("trajectory matching makes every class in one unit")
        reader = env.artifact("trajectories")
        net = self.student(reader)
        s = self.settings(len(ipc))
        images = initial_images(env, classes, ipc, gen)
        labels = self.initial_labels(reader, net, images, classes, ipc)
        memory = self.memory_estimate(net, images, labels, s, reader, gen)
        lr0 = self.cfg.resolved(len(ipc))["lr_teacher"]
        x, y, syn_lr, hist = trajectory_matching(images, labels, lr0, reader, net, gen, s,
                                                 ckpt=env.checkpoint(unit_key))
        out = method_output(env, x, {"total": hist["total"]}, classes, ipc, s.iterations)
        if self.learns_labels:
            out.labels = list(y.float().cpu())
        out.values = {"syn_lr": syn_lr}
        out.metrics.update({"syn_lr": syn_lr, "syn_lr_first": float(hist["syn_lr"][0]),
                            "updates_applied": float(hist["applied"].mean()),
                            "start_epoch_mean": float(hist["start_epoch"].mean()), **memory})
        out.metrics.update({f"loss_{k}" if not k.startswith("loss") else k: v for k, v in summarize(
            {"total": hist["total"]}).items()})
        return out

    def memory_estimate(self, net: Any, images: Any, labels: Any, s: Any, reader: Any, gen: Any) -> dict[str, Any]:
        """The unrolled loop's measured graph size, logged (a warning when it would not fit the device)."""
        import torch

        from pipeline.methods.trajectory.memory import device_memory, gib, graph_bytes

        if s.inner.memory != "unrolled":
            return {}
        state = gen.get_state()
        start = reader.snapshot(0, 0).to(images.device)
        probe = torch.Generator(device=gen.device)
        probe.set_state(state)  # the estimate draws from a copy: the run's draws are unchanged
        est = graph_bytes(net, images.detach(), labels, s.inner, start, reader.snapshot(0, 1).to(images.device),
                          probe)
        have = device_memory(images.device)
        msg = (f"trajectory matching: the unrolled inner loop ({s.inner.syn_steps} steps of "
               f"{s.inner.batch_syn or len(images)} images) holds about {gib(est['total'])} "
               f"({gib(est['per_step'])} per step); the {images.device.type} has {gib(have)}")
        if have and est["total"] > 0.9 * have:
            log.warning("%s: it will not fit; set recover.<method>.memory=tesla (constant memory) or lower "
                        "syn_steps / batch_syn", msg)
        else:
            log.info(msg)
        return {"memory_estimate_bytes": est["total"], "memory_per_step_bytes": est["per_step"]}


TM_DIFFERENCES = (
    "no ZCA whitening (the official CIFAR-10 IPC 1 and 10 settings whiten): the set is stored as images",
    "the expert, start epoch, batches and DSA draws come from the unit's generator (official: the global RNG), so a "
    "rerun gives the same bytes on CPU",
    "the images are clamped to [0, 1] and stored as 8-bit PNG after the last iteration (never during it, as the "
    "official code)",
)


@register("mtt", description="MTT: match the parameters students reach on the synthetic set to expert trajectories",
          needs=Needs(real_images=True, artifacts=("trajectories",)), config=MttConfig, all_classes=True,
          default_init="real", hard_augment="dsa",
          differences=(*TM_DIFFERENCES, "auto settings for other IPCs take the nearest official row below "
                                        "(IPC 2-10: the IPC-10 row; above 10: the IPC-50 row)"))
def open_mtt(env: Any, cfg: MttConfig) -> TrajectoryWorker:
    return TrajectoryWorker(env, cfg)
