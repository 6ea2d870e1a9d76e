"""The full-real reference: a student trained on every real training image (less the holdout slice) under the
hard-label protocol, scored on val. HLR = acc(full real, hard) - acc(method, hard) needs it.

It is the most expensive student of a run (all of the train split instead of IPC images per class), and it
does not depend on the method, so it is cached: a folder per key of what it depends on (the ingest shards'
digests, the holdout slice, the student, its seed and the hard protocol's settings), shared by every run that
points `eval.baseline_dir` at the same folder. A result file is written last (atomically), so a folder without
one is unfinished work that resumes from its checkpoint.

The training images are decoded once into memory ([N, 3, R, R] uint8 at the data resolution, center crop):
fine for digits, CIFAR or Tiny-ImageNet sized sets; for ImageNet-1K at 224 px that is 150 GB, so docs/reliability.md
says to leave `full-real` out of `eval.baselines` there.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.imageops import normalize
from pipeline.core.seeding import derive_seed
from pipeline.data.holdout import HoldoutSpec, holdout_rows
from pipeline.models import build_model
from pipeline.train import ddp
from pipeline.train.hardlabel import make_optimizer, train_epoch
from pipeline.train.jobs import HardSpec
from pipeline.train.trainloop import DataSpec, evaluate, resume, save_atomic, save_checkpoint, val_loader

log = logging.getLogger(__name__)

RESULT = "result.json"


@dataclass(frozen=True)
class FullRealJob:
    """One full-real reference student: where it lives (`folder`), what it trains on and how."""

    data: DataSpec  # real data: class count, resolution, normalization, val shards
    holdout: HoldoutSpec  # the train shards' index and the slice left out of training
    hard: HardSpec  # the hard protocol (its arch is the student)
    seed: int  # model init, batch order and DSA draws (the cell's seed)
    folder: str  # cache folder of this key: checkpoint, weights, result

    def key_payload(self) -> dict[str, Any]:
        """What the result depends on besides the shards' contents (the caller adds their digests)."""
        d = self.data
        return {"hard": asdict(self.hard), "seed": self.seed, "resolution": d.resolution, "mean": list(d.mean),
                "std": list(d.std), "num_classes": d.num_classes, "holdout": [self.holdout.fraction, self.holdout.seed]}


def cached_result(folder: Path) -> dict[str, Any] | None:
    """The finished result in `folder`, or None (absent or unreadable: the work is redone or resumed)."""
    try:
        return json.loads((Path(folder) / RESULT).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def load_train_images(holdout: HoldoutSpec, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every real training image not in the holdout slice, as uint8 [N, 3, R, R] and labels [N], in index order."""
    x, labels, _ = load_train_split(holdout, resolution)
    return x, labels


def load_train_split(holdout: HoldoutSpec, resolution: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """`load_train_images` and the index row of each image (the rows per-sample statistics are keyed by)."""
    from pipeline.core.imageops import center_crop
    from pipeline.data.synthetic import decode_rgb

    images = holdout.images()
    held = set(holdout_rows(images.rows_of_class(), holdout.fraction, holdout.seed))
    rows = [r for r in range(len(images.cls)) if r not in held]
    x = np.stack([center_crop(decode_rgb(images.raw(r)), resolution) for r in rows])
    labels = torch.tensor([int(images.cls[r]) for r in rows])
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), labels, rows


def train_full_real(job: FullRealJob) -> dict[str, Any]:
    """Train (or resume, or read from the cache) the reference student; its val top-1 / top-5 and cost."""
    folder = Path(job.folder)
    done = cached_result(folder)
    if done is not None:
        return {**done, "cached": True}
    folder.mkdir(parents=True, exist_ok=True)
    device = ddp.device_for_rank()
    spec, d = job.hard, job.data
    raw, labels = load_train_images(job.holdout, d.resolution)
    x_all = normalize(raw.float().div_(255.0), d.mean, d.std)
    torch.manual_seed(derive_seed(job.seed, "train", "init"))
    model = build_model(spec.arch, d.num_classes, d.resolution).to(device)
    opt, sched = make_optimizer(model, spec)
    key = folder.name
    ckpt_path = folder / "last.pt"
    ckpt = resume(ckpt_path, key, model, opt, sched, "full-real")
    start = int(ckpt["epoch"]) + 1 if ckpt else 0
    t0 = time.time()
    for epoch in range(start, spec.epochs):
        total = train_epoch(model, opt, x_all, labels, spec, job.seed, epoch, device)
        sched.step()
        if (epoch + 1) % max(1, spec.epochs // 20) == 0 or epoch + 1 == spec.epochs:
            save_checkpoint(ckpt_path, model, opt, sched, epoch, key)
        if (epoch + 1) % max(1, spec.epochs // 5) == 0 or epoch + 1 == spec.epochs:
            log.info("full-real %s seed %d: epoch %d/%d ce %.4f (%.1fs)", spec.arch, job.seed, epoch + 1, spec.epochs,
                     float(total[0] / max(1.0, float(total[1]))), time.time() - t0)
    save_atomic(model.state_dict(), folder / "student.pt")
    m = evaluate(model, val_loader(d, 0, 1, device), device)
    seconds = time.time() - t0
    result = {"protocol": "hard", "student": spec.arch, "top1": m["top1"], "top5": m["top5"], "val_images": m["n"],
              "num_images": len(x_all), "epochs": spec.epochs, "train_seconds": round(seconds, 2),
              "images_per_s": round((spec.epochs - start) * len(x_all) / seconds, 2) if seconds > 0 else None}
    tmp = folder / (RESULT + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(folder / RESULT)
    ckpt_path.unlink(missing_ok=True)
    return {**result, "cached": False}
