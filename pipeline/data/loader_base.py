"""What the PIL and DALI loaders share: their arguments and checks, epoch length, normalization, padding."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline.core.imageops import IMAGENET_MEAN, IMAGENET_STD
from pipeline.data.sharding import eval_batches, rank_range, shard_keys, train_batches

PAD_LABEL = -1
"""Label of the padding rows that evaluation batches carry so all ranks yield equal counts."""

Batch = tuple[torch.Tensor, torch.Tensor]


class BaseLoader:
    """Shared arguments, checks, epoch length, normalization and padding of both backends.

    The arguments are those of `make_loader` (it passes them on): num_workers: DataLoader worker
    processes (PIL) or DALI CPU threads. num_samples: total training samples, required when `train`;
    ignored for evaluation, which counts the samples from the shard indexes. device: where the
    batches land ("cpu", "cuda", "cuda:N"). shuffle_buffer: samples held for shuffling (train).
    mean, std: per-channel normalization on the [0, 1] scale (`data.mean` / `data.std`; ImageNet's
    by default). Call `set_epoch` to reuse a loader for another epoch.
    """

    backend = ""

    def __init__(
        self,
        shards: Sequence[str | Path],
        *,
        train: bool,
        batch_size: int,
        resolution: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 2,
        seed: int = 0,
        epoch: int = 0,
        num_samples: int | None = None,
        device: str = "cpu",
        shuffle_buffer: int = 1000,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.shards = [Path(s) for s in shards]
        if not self.shards:
            raise ValueError("no shards to read")
        missing = [str(p) for p in self.shards if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"missing shards: {missing[:3]}")
        if batch_size < 1 or resolution < 1:
            raise ValueError(f"batch_size and resolution must be positive, got {batch_size}, {resolution}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.train = train
        self.batch_size = batch_size
        self.resolution = resolution
        self.rank = rank
        self.world_size = world_size
        self.num_workers = max(0, num_workers)
        self.seed = seed
        self.epoch = epoch
        self.device = torch.device(device)
        self.shuffle_buffer = max(1, shuffle_buffer)
        if train:
            if num_samples is None:
                raise ValueError("a training loader needs num_samples (the number of training samples)")
            self.num_samples = num_samples
            self.num_batches = train_batches(num_samples, batch_size, world_size)
            if self.num_batches < 1:
                raise ValueError(f"{num_samples} samples make no full batch of {batch_size} on each of "
                                 f"{world_size} ranks; lower the batch size")
            self.keys: list[list[str]] = []
        else:
            self.keys = [shard_keys(p) for p in self.shards]
            self.num_samples = sum(len(k) for k in self.keys)
            if self.num_samples == 0:
                raise ValueError("the shards hold no samples")
            self.num_batches = eval_batches(self.num_samples, batch_size, world_size)
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self._mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1) * 255

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Use the seeds (and, for DALI training, the shard order) of `epoch` on the next iteration."""
        self.epoch = epoch

    @property
    def rank_samples(self) -> int:
        """Real (non-padding) samples this rank yields per epoch."""
        if self.train:
            return self.num_batches * self.batch_size
        start, stop = rank_range(self.num_samples, self.rank, self.world_size)
        return stop - start

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, R, R] -> normalized float32 on the loader's device."""
        x = images.to(self.device, non_blocking=True).float()
        return x.sub_(self._mean).div_(self._std)

    def _padding(self, n: int) -> Batch:
        images = torch.zeros(n, 3, self.resolution, self.resolution, dtype=torch.uint8)
        return self._normalize(images), torch.full((n,), PAD_LABEL, dtype=torch.int64, device=self.device)

    def __repr__(self) -> str:
        mode = "train" if self.train else "eval"
        return (f"{type(self).__name__}({mode}, {len(self.shards)} shards, batch {self.batch_size}, "
                f"res {self.resolution}, rank {self.rank}/{self.world_size}, {self.num_batches} batches)")
