"""Student training on the synthetic set with teacher soft labels (stored or online).

Stored mode reads the relabel stage's files (top-k fp16 logits + logZ per view, see `pipeline.softlabels`),
after checking their class count, temperature and view checksum against this student; online mode runs the
teacher on each batch and uses the full target softmax(z / T).

The view of image i in epoch e (crop, flip, CutMix/Mixup partner and box) is a pure function
of (run seed, e, i) (`pipeline.augment.draw_view`), so stored soft labels line up with the
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

from pipeline import ddp, trainloop
from pipeline.augment import ViewConfig, draw_views, render_batch
from pipeline.models import build_model
from pipeline.optim import cosine_schedule, make_optimizer
from pipeline.seeding import derive_seed, generator
from pipeline.softlabels import SoftLabelTable, ViewSource, full_target, kd_loss, read_soft_labels
from pipeline.synthesis import IMAGENET_MEAN, IMAGENET_STD, normalize
from pipeline.trainloop import (
    autocast,
    evaluate,
    resume,
    save_atomic,
    save_checkpoint,
    sync_buffers,
    val_loader,
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


def render_views(images: torch.Tensor, ids: list[int], seed: int, epoch: int, cfg: ViewConfig,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Views of `ids` in `epoch`, normalized with (mean, std) (`data.mean` / `data.std`): the same for relabel
    and for the student."""
    params = draw_views(seed, epoch, ids, len(images), cfg)
    imgs = [images[i].float() / 255.0 for i in ids]
    partners = [images[p.partner].float() / 255.0 if p.partner >= 0 else None for p in params]
    return normalize(render_batch(imgs, partners, params, cfg.resolution), mean, std)


def view_config(args: dict[str, Any]) -> ViewConfig:
    return ViewConfig(resolution=args["resolution"], crop_scale=(args["crop_scale_min"], 1.0), mix=args["mix"],
                      mix_alpha=args["mix_alpha"])


def load_teacher(args: dict[str, Any], device: torch.device) -> nn.Module:
    """The teacher named by a student job's arguments (online relabel)."""
    return trainloop.load_teacher(args["teacher_arch"], args["num_classes"], args["resolution"], args["teacher"], device)


def train_student(args: dict[str, Any]) -> dict[str, Any]:
    """DDP student training; `args` is a plain dict (see the train stage) so it crosses process boundaries."""
    from pipeline.data.synthetic import load_images

    ddp.init_from_env()
    rank, world, _ = ddp.dist_info()
    device = ddp.device_for_rank()
    images, _ = load_images(Path(args["synthetic_dir"]), _index(args), None)
    n, num_classes, temp = len(images), args["num_classes"], args["temperature"]
    cfg = view_config(args)
    torch.manual_seed(derive_seed(args["seed"], "train", "init"))
    model = build_model(args["arch"], num_classes, args["resolution"]).to(device)
    opt = make_optimizer(model, lr=args["lr"], weight_decay=args["weight_decay"], name=args["optimizer"],
                         decay_1d=args["decay_1d"])
    sched = cosine_schedule(opt, args["epochs"], warmup_epochs=args["warmup_epochs"])
    # The official Tiny-ImageNet students scale the KD loss by T^2 (Hinton et al.); ImageNet / CIFAR do not.
    loss_scale = temp * temp if args["loss_t2"] else 1.0
    table = _soft_labels(args, n, cfg, device) if args["relabel_mode"] == "stored" else None
    teacher = load_teacher(args, device) if table is None else None
    ckpt_path = Path(args["checkpoint"])
    ckpt = resume(ckpt_path, args["config_hash"], model, opt, sched, "train")
    resumed_from = int(ckpt["epoch"]) + 1 if ckpt else None
    start, history = resumed_from or 0, list(ckpt.get("history", [])) if ckpt else []
    net = wrap_ddp(model, device)
    t0 = time.time()
    every = args["eval_every"]
    for epoch in range(start, args["epochs"]):
        net.train()
        batches = epoch_batches(n, args["batch_size"], world, rank, args["seed"], epoch)
        data = ViewBatches(images, batches, args["seed"], epoch, cfg, args["mean"], args["std"])
        loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False, num_workers=args["num_workers"],
                                             persistent_workers=False)
        total = torch.zeros(2, dtype=torch.float64, device=device)
        for x, ids in loader:
            x = x.to(device, non_blocking=True)
            if table is not None:
                target = table.targets(epoch, ids.tolist(), device)
            else:  # online: the full target softmax(z / T), nothing truncated
                with torch.no_grad(), autocast(device, args["amp"]):
                    logits = teacher(x)
                target = full_target(logits.float(), temp)
            with autocast(device, args["amp"]):
                out = net(x).float()
            loss = kd_loss(out, target, temp) * loss_scale
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total[0] += loss.detach() * len(ids)
            total[1] += len(ids)
        sched.step()
        sync_buffers(model)
        if every and (epoch + 1) % every == 0 and epoch + 1 < args["epochs"]:
            m = evaluate(net, val_loader(args, rank, world, device), device, args["amp"])
            history.append({"epoch": epoch + 1, "top1": m["top1"], "top5": m["top5"]})
        ddp.all_reduce_sum(total)
        if ddp.is_rank0():
            save_checkpoint(ckpt_path, model, opt, sched, epoch, args["config_hash"], history=history)
            if (epoch + 1) % max(1, args["epochs"] // 10) == 0 or epoch + 1 == args["epochs"]:
                log.info("train: epoch %d/%d kd loss %.4f (%.1fs)", epoch + 1, args["epochs"],
                         float(total[0] / max(1.0, float(total[1]))), time.time() - t0)
        ddp.barrier()
    if ddp.is_rank0():
        save_atomic(model.state_dict(), Path(args["output"]))
    return {"epochs": args["epochs"], "num_images": n, "history": history, "resumed_from_epoch": resumed_from,
            "world_size": world, "train_seconds": round(time.time() - t0, 2)}


def _soft_labels(args: dict[str, Any], num_images: int, cfg: ViewConfig, device: torch.device) -> SoftLabelTable:
    """The stored soft labels, checked against this student: C, T, and the views of every row.

    Redrawing the views of every row costs ~60 us a view, so the ranks split the files and sum a flag
    per file; every rank then raises the same error, naming the first file that does not match.
    """
    rank, world, _ = ddp.dist_info()
    table = read_soft_labels(args["soft_labels"], num_classes=args["num_classes"], temperature=args["temperature"])
    views = ViewSource(args["seed"], num_images, cfg)
    if not table.paths:
        return table
    bad = torch.zeros(len(table.paths), dtype=torch.float32, device=device)
    for i in table.check_views(views, rank, world):
        bad[i] = 1.0
    ddp.all_reduce_sum(bad)
    if bool((bad > 0).any()):
        raise table.view_error(int((bad > 0).nonzero()[0]), views)
    return table


def _index(args: dict[str, Any]):  # noqa: ANN202 - pyarrow table
    from pipeline.data.shards import read_index

    return read_index([Path(p) for p in args["synthetic_index"]])
