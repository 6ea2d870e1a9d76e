"""Training and evaluation loops shared by the squeeze (teacher) and train (student) stages.

Every function here runs unchanged in one process, under torchrun, or inside a Ray Train
worker: `pipeline.train.ddp.init_from_env()` joins the process group when there is one.
Checkpoints are written by rank 0 through a temp file and a rename, once per epoch, and
hold model, optimizer, scheduler, epoch and RNG states; a restarted job resumes from them
when their config hash matches.

A job takes one frozen, picklable spec (`TeacherJob` here, `pipeline.train.jobs.StudentJob`), built by its
stage from the run context; `DataSpec` is the real-data part they share.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.seeding import derive_seed
from pipeline.models import build_model, load_state_dict_checked
from pipeline.train import ddp

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- job specs


@dataclass(frozen=True)
class DataSpec:
    """The real data of a run as a job sees it (plain values: a spec crosses process boundaries)."""

    num_classes: int  # classes of the data set (the models' output size)
    resolution: int  # image side in pixels (`data.resolution`)
    seed: int  # the run seed: loader shuffling, and in the jobs model init, batch order and student views
    train_shards: tuple[str, ...]  # absolute paths of the real training shards (`real/train-*.tar`)
    val_shards: tuple[str, ...]  # absolute paths of the real validation shards
    num_train: int  # training samples over all shards (a training epoch's length)
    loader: str  # `data.loader`: auto | pil | dali
    num_workers: int  # loader worker processes (PIL) or DALI CPU threads (`data.num_workers`)
    eval_batch_size: int  # batch size of evaluation on the val shards (`eval.batch_size`)
    mean: tuple[float, ...]  # per-channel normalization mean on the [0, 1] scale (`data.mean`)
    std: tuple[float, ...]  # per-channel normalization std (`data.std`)


@dataclass(frozen=True)
class TeacherJob:
    """The squeeze stage's job: train the teacher (`train_teacher`) or import given weights (`import_teacher`)."""

    data: DataSpec  # the real data it trains and evaluates on
    arch: str  # `squeeze.arch`: a `pipeline.models` architecture name
    epochs: int  # training epochs
    batch_size: int  # global batch size, split over the ranks
    optimizer: str  # sgd | sgd-nesterov | adamw (weight decay on every parameter)
    warmup_epochs: int  # linear warm-up epochs before the per-epoch cosine
    lr: float  # peak learning rate
    weight_decay: float  # weight decay
    amp: bool  # bf16 autocast on GPU (CPU always runs fp32)
    weights: str  # `squeeze.weights`: a state_dict file or torchvision weights name to import ("" = train)
    checkpoint: str  # path of the end-of-epoch checkpoint it resumes from
    output: str  # path of the final state_dict (`checkpoints/teacher.pt`)
    config_hash: str  # the squeeze stage's config hash: a checkpoint with another one is not resumed
    sample_stats: str = ""  # the per-sample statistics parquet ("" = not recorded; `pipeline.train.sample_stats`)
    stats_window: int = 5  # epochs the loss buffers average over
    train_index: tuple[str, ...] = ()  # the train shards' parquet indexes (rows of the statistics)


# ---------------------------------------------------------------------------- checkpoints


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save through a temporary name and a rename (a crash never leaves half a file)."""
    from manifests.store import atomic_path

    # A file object, so the archive's inner name does not carry the temp name: the same weights give the same
    # bytes (and sha256) in every run.
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)


def load_weights(path: Path) -> dict[str, Any]:
    """Load a checkpoint or state_dict without unpickling arbitrary objects."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, model: nn.Module, opt: Any, sched: Any, epoch: int, config_hash: str,
                    **extra: Any) -> None:
    """The end-of-epoch checkpoint: model, optimizer, scheduler, epoch, RNG states, config hash (+ extra)."""
    save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "epoch": epoch, "rng": rng_state(), "config_hash": config_hash, **extra}, path)


def resume(path: Path, config_hash: str, model: nn.Module, opt: Any, sched: Any, job: str) -> dict[str, Any] | None:
    """Restore the last epoch's checkpoint into model/opt/sched when it matches `config_hash`.

    Returns the checkpoint (its "epoch" is the last finished one) or None when there is nothing to resume.
    """
    path = Path(path)
    if not path.exists():
        return None
    ckpt = load_weights(path)
    if ckpt.get("config_hash") != config_hash:
        return None
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"])
    if ddp.is_rank0():
        log.info("%s: resuming from the checkpoint of epoch %d", job, int(ckpt["epoch"]))
    return ckpt


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    if ddp.dist_info()[1] > 1:
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def sync_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank; no-op in one process.

    DDP broadcasts buffers at the start of each training forward, so after an epoch's last step every
    rank holds running statistics updated with its own last batch. Syncing before evaluating or finishing
    makes every rank's model the one rank 0 checkpoints and saves.
    """
    if ddp.dist_info()[1] > 1 and torch.distributed.is_initialized():
        for buf in unwrap(model).buffers():
            torch.distributed.broadcast(buf, 0)


def autocast(device: torch.device, enabled: bool) -> Any:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: torch.device, amp: bool = False) -> dict[str, float]:
    """Top-1 / top-5 over a loader; labels < 0 are padding (uneven DDP shards) and are ignored.

    Counts are summed over ranks, so every rank returns the global figures.
    """
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # correct1, correct5, n
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        keep = labels >= 0
        if not bool(keep.any()):
            continue
        with autocast(device, amp):
            logits = model(images[keep]).float()
        y = labels[keep]
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        counts[0] += (top[:, 0] == y).sum()
        counts[1] += (top == y[:, None]).any(dim=1).sum()
        counts[2] += y.numel()
    ddp.all_reduce_sum(counts)
    model.train(was_training)
    n = max(1.0, float(counts[2]))
    return {"top1": 100.0 * float(counts[0]) / n, "top5": 100.0 * float(counts[1]) / n, "n": int(counts[2])}


def val_loader(data: DataSpec, rank: int, world: int, device: torch.device) -> Any:
    """This rank's loader over the real val shards (padded with label -1 so every rank runs as many batches)."""
    from pipeline.data.loaders import make_loader

    return make_loader(list(data.val_shards), train=False, batch_size=data.eval_batch_size,
                       resolution=data.resolution, rank=rank, world_size=world, backend=data.loader,
                       num_workers=data.num_workers, seed=data.seed, device=device.type,
                       mean=data.mean, std=data.std)


# ---------------------------------------------------------------------------- teacher (squeeze)


def train_teacher(job: TeacherJob) -> dict[str, Any]:
    """Train the teacher on the real shards with DDP; resume from the last epoch's checkpoint."""
    from pipeline.data.loaders import make_loader

    ddp.init_from_env()
    rank, world, _ = ddp.dist_info()
    device = ddp.device_for_rank()
    data = job.data
    torch.manual_seed(derive_seed(data.seed, "squeeze", "init"))
    model = build_model(job.arch, data.num_classes, data.resolution).to(device)
    from pipeline.train.optim import cosine_schedule, make_optimizer

    # The official teacher scripts decay every parameter (SRe2L/DWA CIFAR squeeze, the Tiny-ImageNet trainer).
    opt = make_optimizer(model, lr=job.lr, weight_decay=job.weight_decay, name=job.optimizer, decay_1d=True)
    epochs = job.epochs
    sched = cosine_schedule(opt, epochs, warmup_epochs=job.warmup_epochs)
    ckpt_path = Path(job.checkpoint)
    ckpt = resume(ckpt_path, job.config_hash, model, opt, sched, "squeeze")
    resumed_from = int(ckpt["epoch"]) + 1 if ckpt else None
    start = resumed_from or 0
    stats = _sample_stats(job, ckpt)
    stats_seconds = 0.0
    net = wrap_ddp(model, device)
    per_rank = max(1, job.batch_size // world)
    t0 = time.time()
    loader = make_loader(list(data.train_shards), train=True, batch_size=per_rank, resolution=data.resolution,
                         rank=rank, world_size=world, backend=data.loader, num_workers=data.num_workers,
                         seed=data.seed, epoch=start, num_samples=data.num_train, device=device.type,
                         mean=data.mean, std=data.std)
    for epoch in range(start, epochs):
        net.train()
        loader.set_epoch(epoch)  # the epoch's seeds (and DALI shard order); the loader itself is built once
        total = torch.zeros(2, dtype=torch.float64, device=device)
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast(device, job.amp):
                loss = F.cross_entropy(net(images).float(), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total[0] += loss.detach() * labels.numel()
            total[1] += labels.numel()
        sched.step()
        sync_buffers(model)
        ddp.all_reduce_sum(total)
        extra = {}
        if stats is not None:
            stats_seconds += _score_epoch(job, model, stats, rank, world, device)
            extra["sample_stats"] = stats.state_dict()
        if ddp.is_rank0():
            save_checkpoint(ckpt_path, model, opt, sched, epoch, job.config_hash, **extra)
            log.info("squeeze: epoch %d/%d loss %.4f (%.1fs)", epoch + 1, epochs,
                     float(total[0] / max(1.0, float(total[1]))), time.time() - t0)
        ddp.barrier()
    metrics = evaluate(net, val_loader(data, rank, world, device), device, job.amp)
    if ddp.is_rank0():
        save_atomic(model.state_dict(), Path(job.output))
        if stats is not None:
            _write_sample_stats(job, stats)
    return {"teacher_top1": metrics["top1"], "teacher_top5": metrics["top5"], "val_images": metrics["n"],
            "epochs": epochs, "resumed_from_epoch": resumed_from, "world_size": world,
            "train_seconds": round(time.time() - t0, 2), "sample_stats_seconds": round(stats_seconds, 2)}


def _sample_stats(job: TeacherJob, ckpt: dict[str, Any] | None) -> Any:
    """The per-sample statistics accumulator: from the resumed checkpoint, fresh, or None when not recorded."""
    from pipeline.train.sample_stats import SampleStats

    if not job.sample_stats:
        return None
    if ckpt is not None and "sample_stats" in ckpt:
        return SampleStats.from_state(ckpt["sample_stats"])
    return SampleStats(job.data.num_train, job.stats_window)


def _score_epoch(job: TeacherJob, model: nn.Module, stats: Any, rank: int, world: int, device: torch.device) -> float:
    """Score every training sample with the epoch's teacher: each rank its share of the rows, summed.
    Returns the seconds it took (the squeeze record's `sample_stats_seconds`)."""
    from pipeline.data.sharding import rank_range
    from pipeline.train.sample_stats import score_rows

    t0 = time.time()
    data = job.data
    lo, hi = rank_range(data.num_train, rank, world)
    parts = score_rows(unwrap(model), Path(data.train_shards[0]).parent, [Path(p) for p in job.train_index],
                       range(lo, hi), data.num_train, data.resolution, data.mean, data.std, device,
                       batch_size=data.eval_batch_size, num_workers=data.num_workers)
    joined = torch.stack(parts)
    ddp.all_reduce_sum(joined)
    stats.add_epoch(joined[0] > 0.5, joined[1], joined[2])
    return time.time() - t0


def _write_sample_stats(job: TeacherJob, stats: Any) -> None:
    import pyarrow.parquet as pq

    from manifests.store import atomic_path
    from pipeline.data.shards import read_index

    index = read_index([Path(p) for p in job.train_index])
    with atomic_path(Path(job.sample_stats)) as tmp:
        pq.write_table(stats.table(index.column("key").to_pylist(), index.column("cls").to_pylist()), tmp)


def import_teacher(job: TeacherJob) -> dict[str, Any]:
    """Load `job.weights` (a state_dict file or a torchvision weights name), check them, evaluate."""
    device = ddp.device_for_rank()
    model = build_model(job.arch, job.data.num_classes, job.data.resolution)
    source = job.weights
    load_state_dict_checked(model, resolve_weights(source), source)
    model.to(device)
    metrics = evaluate(model, val_loader(job.data, 0, 1, device), device, job.amp)
    save_atomic(model.state_dict(), Path(job.output))
    return {"teacher_top1": metrics["top1"], "teacher_top5": metrics["top5"], "val_images": metrics["n"],
            "weights": source}


def load_teacher(arch: str, num_classes: int, resolution: int, path: Path, device: torch.device) -> nn.Module:
    """The squeeze stage's teacher, frozen in eval mode on `device`."""
    model = build_model(arch, num_classes, resolution)
    model.load_state_dict(load_weights(Path(path)))
    return model.to(device).eval().requires_grad_(False)


def resolve_weights(source: str) -> dict[str, torch.Tensor]:
    """A state_dict from a file (weights_only) or from torchvision's local cache; never downloads."""
    path = Path(source)
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"squeeze.weights: file not found: {path}")
        try:
            state = load_weights(path)
        except (OSError, MemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - torch.load's error depends on the bytes of a file it cannot read
            raise ValueError(f"squeeze.weights: not a state_dict: {path} ({type(exc).__name__}: {exc})") from None
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]  # one of our own checkpoints
        return state
    from torchvision.models import get_weight

    try:
        weights = get_weight(source)
    except (ValueError, KeyError, AttributeError):
        raise ValueError(f"squeeze.weights: '{source}' is neither a file nor a torchvision weights name "
                         "(e.g. ResNet18_Weights.IMAGENET1K_V1)") from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if not cached.exists():
        raise FileNotFoundError(
            f"squeeze.weights: torchvision weights {source} are not in the local cache ({cached}) and this "
            f"machine cannot download them; fetch {weights.url} elsewhere and copy it there, or pass a "
            "state_dict file")
    return torch.load(cached, map_location="cpu", weights_only=True)
