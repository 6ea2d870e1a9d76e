"""The student job specs and what every student protocol shares: the cell seed, the holdout scoring, the synthetic
set's index. `student` (kd) and `hardlabel` (hard) both build on this module; neither imports the other's spec."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.augment.views import ViewConfig
from pipeline.core.seeding import derive_seed
from pipeline.data.holdout import HoldoutSpec
from pipeline.train.trainloop import DataSpec, save_atomic


@dataclass(frozen=True)
class HardSpec:
    """The effective hard-label protocol of a student job (every `auto` resolved by the train stage)."""

    arch: str  # the student architecture (`train.hard_arch`)
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    dsa_strategy: str  # DSA augmentation strategy of every batch; "" = none


@dataclass(frozen=True)
class StudentJob:
    """The train stage's job (`train_student`): a student from scratch on the synthetic set and soft labels."""

    data: DataSpec  # the real data (class count, resolution, run seed, val shards for evaluation)
    views: ViewConfig  # how each (epoch, image) view is drawn: crop, flip, CutMix / Mixup (the relabel stage's too)
    arch: str  # `train.arch`: the student's architecture
    epochs: int  # training epochs
    batch_size: int  # global batch size, split over the ranks
    optimizer: str  # adamw | sgd | sgd-nesterov
    lr: float  # peak learning rate
    weight_decay: float  # weight decay
    decay_1d: bool  # also decay 1-D parameters (biases, norm weights)
    warmup_epochs: int  # linear warm-up epochs before the per-epoch cosine
    temperature: float  # T of the KD loss and of the soft labels
    loss_t2: bool  # multiply the KD loss by T^2 (the official Tiny-ImageNet students)
    amp: bool  # bf16 autocast on GPU
    relabel_mode: str  # stored (read `soft_labels`) | online (run the teacher on each batch)
    top_k: int  # classes kept per view in the stored soft labels
    soft_labels: tuple[str, ...]  # the relabel stage's parquet files (stored mode)
    teacher: str  # path of the teacher's state_dict (online mode)
    teacher_arch: str  # the teacher's architecture (online mode)
    synthetic_dir: str  # folder of the recover stage's shards
    synthetic_index: tuple[str, ...]  # the recover stage's parquet indexes, in unit order
    view_workers: int  # DataLoader processes rendering the views (0 = in the training process)
    eval_every: int  # evaluate on the val shards every N epochs (0 = never during training)
    checkpoint: str  # path of the end-of-epoch checkpoint it resumes from
    output: str  # path of the final state_dict (`checkpoints/student.pt`)
    config_hash: str  # the train stage's config hash: a checkpoint with another one is not resumed
    protocol: str = "kd"  # kd (this module) | hard | own (`pipeline.train.hardlabel.train_hard`, with `hard`)
    hard: HardSpec | None = None  # the hard-label protocol's settings (protocol "hard")
    student_seed: int = 0  # the matrix cell's student seed (`cell_seed`); the views stay the run seed's
    holdout: HoldoutSpec | None = None  # the holdout slice scored every `eval_every` epochs (never val)
    best_output: str = ""  # where the weights of the epoch best on the holdout go ('' = not kept)
    views_on_device: str = "off"  # auto | on | off (`train.views_on_device`): batched views on the device
    set_labels: tuple[str, ...] = ()  # protocol "own": the set's learned label files (logits), in image-id order


def cell_seed(run_seed: int, student_seed: int) -> int:
    """The seed of a matrix cell's model init and batch order: the run seed itself for student seed 0 (the student
    of a run without a matrix), else one derived from (run seed, "student", s)."""
    return run_seed if student_seed == 0 else derive_seed(run_seed, "student", student_seed)


def score_holdout(model: nn.Module, job: StudentJob, epoch: int, history: list[dict[str, Any]],
                  device: torch.device) -> None:
    """After `epoch` (0-based): the holdout top-1 into `history`; with `best_output`, the weights of the best epoch
    so far (the first of ties) written there. Val is never looked at during training."""
    from pipeline.data.holdout import holdout_top1

    if job.holdout is None:
        return
    top1 = holdout_top1(model, job.holdout, job.data.resolution, job.data.mean, job.data.std, device)
    best = max((h["holdout_top1"] for h in history if h.get("holdout_top1") is not None), default=None)
    history.append({"epoch": epoch + 1, "holdout_top1": top1})
    if job.best_output and top1 is not None and (best is None or top1 > best):
        save_atomic(model.state_dict(), Path(job.best_output))


def synthetic_index(job: StudentJob):  # noqa: ANN202 - pyarrow table
    """The synthetic set's index (every recover unit's parquet, in unit order)."""
    from pipeline.data.shards import read_index

    return read_index([Path(p) for p in job.synthetic_index])
