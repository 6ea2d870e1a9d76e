"""Student training on the synthetic set with teacher soft labels (stored or online).

Stored mode reads the relabel stage's files (top-k fp16 logits + logZ per view, see `pipeline.softlabels`),
after checking their class count, temperature and view checksum against this student; online mode runs the
teacher on each batch and uses the full target softmax(z / T).

The view of image i in epoch e (crop, flip, CutMix/Mixup partner and box) is a pure function
of (run seed, e, i) (`pipeline.augment.views.draw_view`), so stored soft labels line up with the
student's crops for any batch size and number of ranks. The epoch's image order is shared
by all ranks and padded by wrap-around so every rank runs the same number of batches.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.augment.views import ViewConfig, draw_views, render_batch, render_views_batched
from pipeline.core.imageops import IMAGENET_MEAN, IMAGENET_STD, normalize
from pipeline.core.seeding import derive_seed, generator
from pipeline.models import build_model
from pipeline.softlabels import SoftLabelTable, ViewSource, full_target, kd_loss, read_soft_labels
from pipeline.train import ddp, trainloop
from pipeline.train.jobs import StudentJob, cell_seed, score_holdout, synthetic_index
from pipeline.train.optim import cosine_schedule, make_optimizer
from pipeline.train.trainloop import (
    autocast,
    resume,
    save_atomic,
    save_checkpoint,
    sync_buffers,
    wrap_ddp,
)

log = logging.getLogger(__name__)


def epoch_batches(num_images: int, global_batch: int, world: int, rank: int, seed: int, epoch: int) -> list[list[int]]:
    """This rank's batches of image ids for one epoch: same count on every rank, every image at least once."""
    perm = torch.randperm(num_images, generator=generator(seed, "train-order", epoch)).tolist()
    n_batches = math.ceil(num_images / global_batch)
    need = n_batches * global_batch
    order = (perm * math.ceil(need / num_images))[:need]
    return [order[b * global_batch:(b + 1) * global_batch][rank::world] for b in range(n_batches)]


class ViewBatches(torch.utils.data.Dataset):
    """Item b = (normalized views [B,3,R,R], image ids [B]) of this rank's b-th batch of an epoch."""

    def __init__(self, images: torch.Tensor, batches: list[list[int]], seed: int, epoch: int, cfg: ViewConfig,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.images, self.batches, self.seed, self.epoch, self.cfg = images, batches, seed, epoch, cfg
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.batches[b]
        views = render_views(self.images, ids, self.seed, self.epoch, self.cfg, self.mean, self.std)
        return views, torch.tensor(ids, dtype=torch.long)


def views_on_device(setting: str, device: torch.device) -> bool:
    """Whether `train.views_on_device` renders batched views on `device` (auto: on a GPU only)."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def render_views(images: torch.Tensor, ids: list[int], seed: int, epoch: int, cfg: ViewConfig,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 batched: bool = False) -> torch.Tensor:
    """Views of `ids` in `epoch`, normalized with (mean, std) (`data.mean` / `data.std`): the same for relabel
    and for the student. `batched`: all of them in one call on `images`' device (`render_views_batched`, equal to
    the per-view loop to 2 float32 ulps), else one at a time on the CPU."""
    params = draw_views(seed, epoch, ids, len(images), cfg)
    if batched:
        return normalize(render_views_batched(images, ids, params, cfg.resolution), mean, std)
    imgs = [images[i].float() / 255.0 for i in ids]
    partners = [images[p.partner].float() / 255.0 if p.partner >= 0 else None for p in params]
    return normalize(render_batch(imgs, partners, params, cfg.resolution), mean, std)


def load_teacher(job: StudentJob, device: torch.device) -> nn.Module:
    """The teacher named by a student job (online relabel)."""
    return trainloop.load_teacher(job.teacher_arch, job.data.num_classes, job.data.resolution, job.teacher, device)


def train_student(job: StudentJob) -> dict[str, Any]:
    """DDP student training; resume from the last epoch's checkpoint."""
    from pipeline.data.synthetic import load_images

    if job.protocol in ("hard", "own"):
        from pipeline.train.hardlabel import train_hard

        return train_hard(job)

    ddp.init_from_env()
    rank, world, _ = ddp.dist_info()
    device = ddp.device_for_rank()
    images, _ = load_images(Path(job.synthetic_dir), synthetic_index(job), None)
    seed, n, num_classes, temp = job.data.seed, len(images), job.data.num_classes, job.temperature
    own = cell_seed(seed, job.student_seed)  # init and order; the views (and soft labels) keep the run seed
    cfg = job.views
    torch.manual_seed(derive_seed(own, "train", "init"))
    model = build_model(job.arch, num_classes, job.data.resolution).to(device)
    opt = make_optimizer(model, lr=job.lr, weight_decay=job.weight_decay, name=job.optimizer, decay_1d=job.decay_1d)
    sched = cosine_schedule(opt, job.epochs, warmup_epochs=job.warmup_epochs)
    # The official Tiny-ImageNet students scale the KD loss by T^2 (Hinton et al.); ImageNet / CIFAR do not.
    loss_scale = temp * temp if job.loss_t2 else 1.0
    table = _soft_labels(job, n, device) if job.relabel_mode == "stored" else None
    teacher = load_teacher(job, device) if table is None else None
    ckpt_path = Path(job.checkpoint)
    ckpt = resume(ckpt_path, job.config_hash, model, opt, sched, "train")
    resumed_from = int(ckpt["epoch"]) + 1 if ckpt else None
    start, history = resumed_from or 0, list(ckpt.get("history", [])) if ckpt else []
    net = wrap_ddp(model, device)
    # the synthetic set (uint8) held on the device once, when its views are rendered there
    on_device = images.to(device) if views_on_device(job.views_on_device, device) else None
    t0 = time.time()
    every = job.eval_every
    for epoch in range(start, job.epochs):
        net.train()
        batches = epoch_batches(n, job.batch_size, world, rank, own, epoch)
        if on_device is not None:  # one batched call per batch, on the device
            loader = ((render_views(on_device, ids, seed, epoch, cfg, job.data.mean, job.data.std, batched=True),
                       torch.tensor(ids, dtype=torch.long)) for ids in batches)
        else:
            data = ViewBatches(images, batches, seed, epoch, cfg, job.data.mean, job.data.std)
            loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False,
                                                 num_workers=job.view_workers, persistent_workers=False)
        total = torch.zeros(2, dtype=torch.float64, device=device)
        for x, ids in loader:
            x = x.to(device, non_blocking=True)
            if table is not None:
                target = table.targets(epoch, ids.tolist(), device)
            else:  # online: the full target softmax(z / T), nothing truncated
                with torch.no_grad(), autocast(device, job.amp):
                    logits = teacher(x)
                target = full_target(logits.float(), temp)
            with autocast(device, job.amp):
                out = net(x).float()
            loss = kd_loss(out, target, temp) * loss_scale
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total[0] += loss.detach() * len(ids)
            total[1] += len(ids)
        sched.step()
        sync_buffers(model)
        if every and ((epoch + 1) % every == 0 or epoch + 1 == job.epochs) and ddp.is_rank0():
            score_holdout(model, job, epoch, history, device)
        ddp.all_reduce_sum(total)
        if ddp.is_rank0():
            save_checkpoint(ckpt_path, model, opt, sched, epoch, job.config_hash, history=history)
            if (epoch + 1) % max(1, job.epochs // 10) == 0 or epoch + 1 == job.epochs:
                log.info("train: epoch %d/%d kd loss %.4f (%.1fs)", epoch + 1, job.epochs,
                         float(total[0] / max(1.0, float(total[1]))), time.time() - t0)
        ddp.barrier()
    if ddp.is_rank0():
        save_atomic(model.state_dict(), Path(job.output))
    return {"epochs": job.epochs, "num_images": n, "history": history, "resumed_from_epoch": resumed_from,
            "world_size": world, "train_seconds": round(time.time() - t0, 2),
            "peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None}


def _soft_labels(job: StudentJob, num_images: int, device: torch.device) -> SoftLabelTable:
    """The stored soft labels, checked against this student: C, T, and the views of every row.

    Redrawing the views of every row costs ~60 us a view, so the ranks split the files and sum a flag
    per file; every rank then raises the same error, naming the first file that does not match.
    """
    rank, world, _ = ddp.dist_info()
    table = read_soft_labels(list(job.soft_labels), num_classes=job.data.num_classes, temperature=job.temperature)
    views = ViewSource(job.data.seed, num_images, job.views)
    if not table.paths:
        return table
    bad = torch.zeros(len(table.paths), dtype=torch.float32, device=device)
    for i in table.check_views(views, rank, world):
        bad[i] = 1.0
    ddp.all_reduce_sum(bad)
    if bool((bad > 0).any()):
        raise table.view_error(int((bad > 0).nonzero()[0]), views)
    return table
