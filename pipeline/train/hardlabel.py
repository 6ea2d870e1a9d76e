"""The `hard` student protocol: cross-entropy on the synthetic images' own labels, as DC, DSA and DM evaluate.

What the official evaluation (`evaluate_synset` of VICO-UoE/DatasetCondensation `utils.py`, used unchanged by DM
and DataDAM) does, and this file reproduces:

* a fresh ConvNet-3 (instance norm by default) trained from scratch on the synthetic set alone, cross-entropy on
  the hard labels, SGD with momentum 0.9 and weight decay 5e-4, lr 0.01, batch 256, the whole set shuffled
  every epoch (the last batch of an epoch may be smaller; nothing is repeated to fill it);
* the learning rate drops to 0.1x at half the epochs, where the official loop builds a new optimizer, so the
  momentum buffers restart there too (done here by clearing the optimizer state at that epoch);
* 300 epochs without augmentation (DC) or 1000 with DSA augmentation (DSA, DM, DataDAM: `DiffAugment` with no
  seed, so every image draws its own parameters and one operation group is drawn per batch).

Deviations: the images are the recover stage's 8-bit PNGs (the official code keeps float tensors); DC's own code
also augments MNIST at evaluation (crop/scale/rotate, `get_daparam`), which the paper's protocol and this one do
not. One process: a hard-label set is IPC x C images, small enough for one device, and splitting a batch of 10
images over DDP ranks would buy nothing. The epoch order and every augmentation are drawn from generators keyed
by (run seed, "train-hard", epoch, batch), so a resumed run continues with the same draws.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.core.imageops import normalize
from pipeline.core.seeding import derive_seed, generator
from pipeline.models import build_model
from pipeline.train import ddp
from pipeline.train.jobs import HardSpec, StudentJob, cell_seed, score_holdout, synthetic_index
from pipeline.train.trainloop import resume, save_atomic, save_checkpoint

log = logging.getLogger(__name__)

DSA_EPOCHS = 1000  # DSA's and DM's `epoch_eval_train` with augmentation
PLAIN_EPOCHS = 300  # DC's `epoch_eval_train`, no augmentation


def epoch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's batches: a seeded permutation of all n images cut into batches (the last one may be smaller)."""
    perm = torch.randperm(n, generator=generator(seed, "train-hard", "order", epoch)).tolist()
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def lr_factor(epoch: int, epochs: int) -> float:
    """1 for the first half of the epochs, 0.1 after (the official `lr_schedule = [Epoch // 2 + 1]`)."""
    return 1.0 if epoch < epochs // 2 else 0.1


def make_optimizer(model: torch.nn.Module, spec: HardSpec) -> tuple[torch.optim.Optimizer, Any]:
    """SGD (momentum, weight decay on every parameter) and the per-epoch step schedule of `lr_factor`."""
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(e, spec.epochs))


def train_epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, x_all: torch.Tensor, labels: torch.Tensor,
                spec: HardSpec, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """One epoch over the normalized images `x_all` [N, 3, R, R] (CPU) with hard `labels` [N] (or target
    distributions [N, C]: cross-entropy against them, the `own` protocol): the seeded order,
    DSA per image when `spec.dsa_strategy`, CE, one SGD step per batch. Returns (loss sum, images) float64.
    Pure compute (no files): the train stage and the benchmarks share it."""
    from pipeline.augment.dsa import augment

    if epoch == spec.epochs // 2 and epoch > 0:
        opt.state.clear()  # the official loop makes a new SGD here: momentum restarts with the lower lr
    model.train()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # on the device: no host sync per step
    for b, ids in enumerate(epoch_order(len(x_all), spec.batch_size, seed, epoch)):
        x = x_all[ids].to(device)
        y = labels[ids].to(device)
        if spec.dsa_strategy:
            x = augment(x, generator(seed, "train-hard", "dsa", epoch, b), spec.dsa_strategy, per_sample=True)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total[0] += loss.detach().double() * len(ids)
        total[1] += len(ids)
    return total.cpu()


def train_hard(job: StudentJob) -> dict[str, Any]:
    """Train the hard-label student of `job` in this process; resume from the last epoch's checkpoint."""
    from pipeline.data.synthetic import load_images

    spec = job.hard
    if spec is None:
        raise ValueError("a hard-protocol student job needs its HardSpec")
    device = ddp.device_for_rank()
    raw, labels = load_images(Path(job.synthetic_dir), synthetic_index(job), None)
    if job.protocol == "own" and job.set_labels:  # the set's learned logits: CE against their softmax (DATM / PAD)
        from pipeline.data.synthetic import load_set_labels

        learned = load_set_labels(job.set_labels)
        if learned.shape != (len(labels), job.data.num_classes):
            raise ValueError(f"the set's label vectors are {tuple(learned.shape)}, expected "
                             f"({len(labels)}, {job.data.num_classes}): rerun the recover stage")
        labels = torch.softmax(learned.float(), dim=1)
    x_all = normalize(raw.float().div_(255.0), job.data.mean, job.data.std)
    n, seed = len(x_all), cell_seed(job.data.seed, job.student_seed)  # init, order and DSA draws
    torch.manual_seed(derive_seed(seed, "train", "init"))
    model = build_model(spec.arch, job.data.num_classes, job.data.resolution).to(device)
    opt, sched = make_optimizer(model, spec)
    ckpt_path = Path(job.checkpoint)
    ckpt = resume(ckpt_path, job.config_hash, model, opt, sched, "train")
    resumed_from = int(ckpt["epoch"]) + 1 if ckpt else None
    start, history = resumed_from or 0, list(ckpt.get("history", [])) if ckpt else []
    t0 = time.time()
    every = job.eval_every
    for epoch in range(start, spec.epochs):
        total = train_epoch(model, opt, x_all, labels, spec, seed, epoch, device)
        sched.step()
        if every and ((epoch + 1) % every == 0 or epoch + 1 == spec.epochs):
            score_holdout(model, job, epoch, history, device)
        if (epoch + 1) % max(1, spec.epochs // 50) == 0 or epoch + 1 == spec.epochs:
            save_checkpoint(ckpt_path, model, opt, sched, epoch, job.config_hash, history=history)
        if (epoch + 1) % max(1, spec.epochs // 10) == 0 or epoch + 1 == spec.epochs:
            log.info("train (hard): epoch %d/%d ce %.4f (%.1fs)", epoch + 1, spec.epochs,
                     float(total[0] / max(1.0, float(total[1]))), time.time() - t0)
    save_atomic(model.state_dict(), Path(job.output))
    return {"epochs": spec.epochs, "num_images": n, "history": history, "resumed_from_epoch": resumed_from,
            "world_size": 1, "train_seconds": round(time.time() - t0, 2), "protocol": job.protocol,
            "targets": "learned" if labels.is_floating_point() else "hard",
            "peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None}
