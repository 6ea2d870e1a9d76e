"""The PIL loader: webdataset + torch DataLoader worker processes + PIL decoding and transforms.

Training: each (rank, DataLoader worker) draws shards with replacement (webdataset
`ResampledShards`) and shuffles samples in a buffer; the shard draws, the buffer and the
augmentations are seeded from (seed, epoch, rank, worker), so an epoch is reproducible.
Evaluation: this rank's samples (`rank_range`), split among the workers by shard when there are
enough shards, else by position.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from pipeline.core.seeding import derive_seed
from pipeline.data.images import IMAGE_EXTS, decode_rgb_image, pil_transform
from pipeline.data.loader_base import BaseLoader, Batch
from pipeline.data.sharding import rank_range


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class _WorkerSeed:
    """Picklable seed function of (seed, tag, epoch, rank, DataLoader worker id)."""

    def __init__(self, seed: int, tag: str, epoch: int, rank: int) -> None:
        self.parts = (seed, tag, epoch, rank)

    def __call__(self) -> int:
        seed, tag, epoch, rank = self.parts
        return derive_seed(seed, "loader", tag, epoch, rank, _worker()[0]) & 0x7FFFFFFF


class _Shuffle:
    """Pipeline stage: shuffle samples in a buffer, rng seeded per worker at iteration start."""

    def __init__(self, bufsize: int, seed_fn: Callable[[], int]) -> None:
        self.bufsize, self.seed_fn = bufsize, seed_fn

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        rng = random.Random(self.seed_fn())
        buf: list[dict] = []
        for sample in src:
            if len(buf) < self.bufsize:
                buf.append(sample)
                continue
            i = rng.randrange(len(buf))
            buf[i], sample = sample, buf[i]
            yield sample
        rng.shuffle(buf)
        yield from buf


class _Transform:
    """Pipeline stage: webdataset sample dict -> (uint8 image [3, R, R], int label)."""

    def __init__(self, resolution: int, train: bool, seed_fn: Callable[[], int]) -> None:
        self.resolution, self.train, self.seed_fn = resolution, train, seed_fn

    def __call__(self, src: Iterable[dict]) -> Iterator[tuple[torch.Tensor, int]]:
        rng = random.Random(self.seed_fn()) if self.train else None
        for sample in src:
            data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
            if data is None or "cls" not in sample:
                raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} lacks an image "
                                 f"({'/'.join(IMAGE_EXTS)}) or a cls member")
            yield pil_transform(decode_rgb_image(data), self.resolution, self.train, rng), int(sample["cls"])


class _KeepUrls:
    """Node splitter: keep the shards that hold samples of this rank."""

    def __init__(self, urls: Iterable[str]) -> None:
        self.urls = set(urls)

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        return (s for s in src if s["url"] in self.urls)


class _EvalSelect:
    """Sample filter: keep this rank's samples; optionally split them among workers by position."""

    def __init__(self, keep: dict[str, dict[str, int]], by_position: bool) -> None:
        self.keep, self.by_position = keep, by_position

    def __call__(self, sample: dict) -> bool:
        pos = self.keep.get(sample["__url__"], {}).get(sample["__key__"])
        if pos is None:
            return False
        if not self.by_position:
            return True
        worker, num_workers = _worker()
        return pos % num_workers == worker


class PilLoader(BaseLoader):
    """webdataset + torch DataLoader worker processes + PIL decoding (see the module docstring).

    Workers yield uint8 batches (4x less inter-process traffic); the main process re-batches
    them into exactly `batch_size` rows, pads evaluation, and normalizes (on the GPU when
    `device` is CUDA).
    """

    backend = "pil"

    def _train_dataset(self) -> Any:
        import webdataset as wds

        urls = [str(p) for p in self.shards]
        part = (self.seed, self.epoch, self.rank)
        # wds.WebDataset(resampled=True) seeds its shard sampler from pid and time; building the
        # same stages from webdataset's parts lets the draws follow (seed, epoch, rank, worker).
        return wds.DataPipeline(
            wds.ResampledShards(urls, seed=0, worker_seed=_WorkerSeed(part[0], "shards", *part[1:]),
                                deterministic=True),
            wds.tarfile_to_samples(),
            _Shuffle(self.shuffle_buffer, _WorkerSeed(part[0], "shuffle", *part[1:])),
            _Transform(self.resolution, True, _WorkerSeed(part[0], "augment", *part[1:])),
        )

    def _eval_dataset(self) -> Any:
        import webdataset as wds

        start, stop = rank_range(self.num_samples, self.rank, self.world_size)
        keep: dict[str, dict[str, int]] = {}
        offset = pos = 0
        for path, keys in zip(self.shards, self.keys, strict=True):
            lo, hi = max(start, offset), min(stop, offset + len(keys))
            if lo < hi:
                keep[str(path)] = {k: pos + i for i, k in enumerate(keys[lo - offset:hi - offset])}
                pos += hi - lo
            offset += len(keys)
        # Enough shards: workers split them; else every worker reads them all and keeps every n-th sample.
        by_shard = len(keep) >= max(1, self.num_workers)
        dataset = wds.WebDataset(
            [str(p) for p in self.shards], nodesplitter=_KeepUrls(keep),
            workersplitter=wds.split_by_worker if by_shard else None, shardshuffle=False, empty_check=False,
        )
        return dataset.select(_EvalSelect(keep, by_position=not by_shard)).compose(
            _Transform(self.resolution, False, _WorkerSeed(self.seed, "augment", self.epoch, self.rank)))

    def __iter__(self) -> Iterator[Batch]:
        if not self.train and self.rank_samples == 0:
            for _ in range(self.num_batches):
                yield self._padding(self.batch_size)
            return
        dataset = self._train_dataset() if self.train else self._eval_dataset()
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=self.batch_size, num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
        )
        chunks = iter(loader)
        try:
            yield from self._rebatch(chunks)
        finally:
            del chunks  # shuts the workers down (training streams never end on their own)

    def _rebatch(self, chunks: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[Batch]:
        b = self.batch_size
        images: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        have = produced = 0
        for x, y in chunks:
            images.append(x)
            labels.append(y)
            have += len(y)
            while have >= b and produced < self.num_batches:
                xs, ys = (images[0], labels[0]) if len(images) == 1 else (torch.cat(images), torch.cat(labels))
                yield self._normalize(xs[:b]), ys[:b].to(self.device, dtype=torch.int64)
                images, labels, have = [xs[b:]], [ys[b:]], have - b
                produced += 1
            if produced == self.num_batches:
                if self.train:
                    return
                if have:
                    raise RuntimeError(f"rank {self.rank} read more evaluation samples than its share")
        if self.train:
            raise RuntimeError(f"the training stream ended after {produced} of {self.num_batches} batches")
        real = produced * b + have
        if real != self.rank_samples:
            raise RuntimeError(f"rank {self.rank} read {real} evaluation samples, expected {self.rank_samples}")
        if have:
            pad_x, pad_y = self._padding(b - have)
            xs = self._normalize(torch.cat(images))
            yield torch.cat([xs, pad_x]), torch.cat([torch.cat(labels).to(self.device, dtype=torch.int64), pad_y])
            produced += 1
        for _ in range(self.num_batches - produced):
            yield self._padding(b)
