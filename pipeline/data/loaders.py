"""Batched readers of the real WebDataset shards: a PIL + DataLoader path and a DALI path.

Both backends keep one contract. A loader is an iterable over batches
``(images, labels)``: ``images`` float32 ``[B, 3, R, R]`` normalized with the loader's
mean/std (``data.mean`` / ``data.std``, ImageNet's by default), ``labels`` int64 ``[B]``; ``len(loader)`` is the number of batches one epoch
yields on this rank, and it is the same on every rank, so DDP never waits on a rank that
ran out of data. Every batch is full (``B`` rows).

Training (``train=True``) needs ``num_samples`` (the number of training samples) and yields
``num_samples // (batch_size * world_size)`` batches per rank and epoch.

- PIL: each (rank, DataLoader worker) draws shards with replacement (webdataset
  ``ResampledShards``) and shuffles samples in a buffer; the shard draws, the buffer and the
  augmentations are seeded from ``(seed, epoch, rank, worker)``, so an epoch is reproducible.
- DALI: the shard order is permuted per epoch (the same permutation on every rank), the
  reader splits the samples into ``world_size`` contiguous parts (part ``rank``) and shuffles
  in a buffer of ``initial_fill`` samples; the pipeline seed comes from ``(seed, epoch, rank)``.

Evaluation (``train=False``) reads each sample exactly once over all ranks: rank ``r`` of
``W`` takes samples ``[floor(r*N/W), floor((r+1)*N/W))`` of the shards read in the given order
(the split DALI's reader uses, so both backends give a rank the same samples). Ranks then
pad to ``ceil(ceil(N/W) / B)`` full batches. Padding rows carry the label ``PAD_LABEL`` (-1)
and meaningless images: an evaluator must count only rows with ``labels >= 0``.

Transforms (the same in both backends; R = resolution):

=========  ======================================================  ==================================
           R > 64                                                  R <= 64
=========  ======================================================  ==================================
train      RandomResizedCrop(R, scale 0.08-1, ratio 3/4-4/3), flip   resize to R x R, pad 4, random crop R, flip
eval       resize shorter side to int(R * 256 / 224), center crop R  resize to R x R
=========  ======================================================  ==================================
"""

from __future__ import annotations

import json
import math
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.seeding import derive_seed
from pipeline.synthesis import IMAGENET_MEAN, IMAGENET_STD

PAD_LABEL = -1
"""Label of the padding rows that evaluation batches carry so all ranks yield equal counts."""

SMALL_RESOLUTION = 64
"""At or below this side, the CIFAR-style transforms apply (pad-and-crop, plain resize)."""

IMAGE_EXTS = ("jpg", "jpeg", "png")
DALI_INSTALL_HINT = "install it with `pip install -e .[dali]` (the nvidia-dali-cuda130 wheel)"
_RRC_SCALE = (0.08, 1.0)
_RRC_RATIO = (3 / 4, 4 / 3)
_PAD = 4

Batch = tuple[torch.Tensor, torch.Tensor]


# ----------------------------------------------------------------------------- shard bookkeeping


def shard_paths(real_dir: str | Path, split: str) -> list[Path]:
    """The tar paths of `split` ("train" or "val") listed in `real_dir`/classes.json, in its order.

    The list comes from the class map written by ingest (not from a glob), so a half-written
    or stale shard in the folder is never read.
    """
    real_dir = Path(real_dir)
    meta_path = real_dir / "classes.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: run the ingest stage first")
    shards = json.loads(meta_path.read_text()).get("shards", {})
    if split not in shards:
        raise ValueError(f"{meta_path} lists no '{split}' shards (it has: {sorted(shards)})")
    return [real_dir / f"{name}.tar" for name in shards[split]]


def shard_keys(shard: str | Path) -> list[str]:
    """Sample keys of one shard in stored order: from its parquet index, else its `.idx`, else the tar."""
    shard = Path(shard)
    parquet, idx = shard.with_suffix(".parquet"), shard.with_suffix(".idx")
    if parquet.is_file():
        import pyarrow.parquet as pq

        return [str(k) for k in pq.read_table(parquet, columns=["key"]).column("key").to_pylist()]
    if idx.is_file():
        lines = idx.read_text().splitlines()[1:]
        # v1.2 lines: `ext offset size name` per member; the first member's name gives the key.
        return [line.split()[3].split(".", 1)[0] for line in lines if line.strip()]
    keys: list[str] = []
    with tarfile.open(shard, mode="r:") as tar:
        for member in tar:
            if member.isfile() and not member.name.startswith("."):
                key = member.name.rsplit("/", 1)[-1].split(".", 1)[0]
                if not keys or keys[-1] != key:
                    keys.append(key)
    return keys


def rank_range(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """Half-open range of the global sample positions that `rank` evaluates (DALI's split)."""
    return num_samples * rank // world_size, num_samples * (rank + 1) // world_size


def train_batches(num_samples: int, batch_size: int, world_size: int) -> int:
    """Batches per rank and training epoch: `num_samples // (batch_size * world_size)`."""
    return num_samples // (batch_size * world_size)


def eval_batches(num_samples: int, batch_size: int, world_size: int) -> int:
    """Batches per rank for evaluation: enough for the largest rank share, padded."""
    return math.ceil(math.ceil(num_samples / world_size) / batch_size)


# ----------------------------------------------------------------------------- backend choice


def dali_available() -> bool:
    """Whether `nvidia.dali` imports."""
    try:
        _import_dali()
    except ImportError:
        return False
    return True


def _import_dali() -> Any:
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn  # noqa: F401
        import nvidia.dali.types  # noqa: F401
    except (ImportError, OSError) as exc:
        raise ImportError(f"the DALI loader needs NVIDIA DALI, which does not import ({exc}); "
                          f"{DALI_INSTALL_HINT}, or use the PIL loader (backend='pil')") from exc
    return dali


def make_loader(
    shards: Sequence[str | Path],
    *,
    train: bool,
    batch_size: int,
    resolution: int,
    rank: int = 0,
    world_size: int = 1,
    backend: str = "auto",
    num_workers: int = 2,
    seed: int = 0,
    epoch: int = 0,
    num_samples: int | None = None,
    device: str = "cpu",
    shuffle_buffer: int = 1000,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> PilLoader | DaliLoader:
    """A loader over `shards` with the contract of this module's docstring.

    backend: "pil", "dali" or "auto" (DALI when it imports, else PIL); "dali" without DALI
    raises ImportError with an install hint. num_workers: DataLoader worker processes (PIL) or
    DALI CPU threads. num_samples: total training samples, required when `train`; ignored for
    evaluation, which counts the samples from the shard indexes. device: where the batches
    land ("cpu", "cuda", "cuda:N"); DALI decodes with the "mixed" (GPU) decoder on CUDA.
    shuffle_buffer: samples held for shuffling (train). mean, std: per-channel normalization on the
    [0, 1] scale (`data.mean` / `data.std`; ImageNet's by default). Call `set_epoch` to reuse a loader.
    """
    if backend not in ("auto", "pil", "dali"):
        raise ValueError(f"backend must be auto, pil or dali, not {backend!r}")
    if backend == "auto":
        backend = "dali" if dali_available() else "pil"
    cls: type[PilLoader] | type[DaliLoader] = DaliLoader if backend == "dali" else PilLoader
    return cls(shards, train=train, batch_size=batch_size, resolution=resolution, rank=rank,
               world_size=world_size, num_workers=num_workers, seed=seed, epoch=epoch,
               num_samples=num_samples, device=device, shuffle_buffer=shuffle_buffer, mean=mean, std=std)


# ----------------------------------------------------------------------------- common base


class _Loader:
    """Shared arguments, checks, epoch length and normalization."""

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


# ----------------------------------------------------------------------------- PIL path


def decode_rgb(data: bytes) -> Any:
    """PIL image in RGB from encoded bytes (grey, palette, CMYK and alpha images converted)."""
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


def random_resized_crop_box(width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a RandomResizedCrop window (torchvision's algorithm, scale 0.08-1, ratio 3/4-4/3)."""
    area = width * height
    log_ratio = (math.log(_RRC_RATIO[0]), math.log(_RRC_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*_RRC_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < _RRC_RATIO[0]:
        w, h = width, int(round(width / _RRC_RATIO[0]))
    elif in_ratio > _RRC_RATIO[1]:
        w, h = int(round(height * _RRC_RATIO[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def pil_transform(img: Any, resolution: int, train: bool, rng: random.Random | None = None) -> torch.Tensor:
    """The module's transform of one RGB PIL image -> uint8 tensor [3, R, R] (not normalized)."""
    from PIL import Image

    r = resolution
    bilinear = Image.Resampling.BILINEAR
    if train:
        if rng is None:
            raise ValueError("training transforms need an rng")
        if r > SMALL_RESOLUTION:
            left, top, w, h = random_resized_crop_box(img.width, img.height, rng)
            arr = np.asarray(img.resize((r, r), bilinear, box=(left, top, left + w, top + h)))
        else:
            small = np.asarray(img.resize((r, r), bilinear))
            padded = np.zeros((r + 2 * _PAD, r + 2 * _PAD, 3), dtype=np.uint8)
            padded[_PAD:_PAD + r, _PAD:_PAD + r] = small
            top, left = rng.randint(0, 2 * _PAD), rng.randint(0, 2 * _PAD)
            arr = padded[top:top + r, left:left + r]
        if rng.random() < 0.5:
            arr = arr[:, ::-1]
    elif r > SMALL_RESOLUTION:
        short = int(r * 256 / 224)
        w, h = img.size
        size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        resized = img.resize(size, bilinear)
        top, left = int(round((size[1] - r) / 2.0)), int(round((size[0] - r) / 2.0))
        arr = np.asarray(resized)[top:top + r, left:left + r]
    else:
        arr = np.asarray(img.resize((r, r), bilinear))
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


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
            yield pil_transform(decode_rgb(data), self.resolution, self.train, rng), int(sample["cls"])


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


class PilLoader(_Loader):
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


# ----------------------------------------------------------------------------- DALI path


class DaliLoader(_Loader):
    """NVIDIA DALI pipeline (CPU-only with `device="cpu"`, "mixed" GPU decoding on CUDA).

    One pipeline is built per iteration (epoch) and torn down at its end. Labels are parsed in
    Python from the ascii `cls` member (DALI reads it as raw uint8 bytes).
    """

    backend = "dali"

    def __init__(self, shards: Sequence[str | Path], **kwargs: Any) -> None:
        _import_dali()
        super().__init__(shards, **kwargs)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"the DALI loader runs on cpu or cuda, not {self.device}")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())

    def _paths(self) -> list[Path]:
        if not self.train:
            return list(self.shards)
        # One permutation per epoch, the same on every rank, so the ranks' parts stay disjoint.
        order = list(range(len(self.shards)))
        random.Random(derive_seed(self.seed, "loader", "dali-shard-order", self.epoch)).shuffle(order)
        return [self.shards[i] for i in order]

    def _build(self) -> Any:
        from nvidia.dali import Pipeline, fn, types

        paths = self._paths()
        idx = [p.with_suffix(".idx") for p in paths]
        gpu = self.device.type == "cuda"
        r = self.resolution
        pipe = Pipeline(
            batch_size=self.batch_size, num_threads=max(1, self.num_workers),
            device_id=self.device.index if gpu else None, prefetch_queue_depth=2,
            seed=derive_seed(self.seed, "loader", "dali", self.epoch, self.rank) & 0x7FFFFFFF,
        )
        with pipe:
            encoded, cls = fn.readers.webdataset(
                paths=[str(p) for p in paths],
                index_paths=[str(p) for p in idx] if all(p.is_file() for p in idx) else None,
                ext=[";".join(IMAGE_EXTS), "cls"], missing_component_behavior="error",
                shard_id=self.rank, num_shards=self.world_size, random_shuffle=self.train,
                initial_fill=self.shuffle_buffer, pad_last_batch=not self.train, name="reader",
            )
            decoder_device = "mixed" if gpu else "cpu"
            mirror: Any = 0
            crop_pos: dict[str, Any] = {}
            if self.train and r > SMALL_RESOLUTION:
                images = fn.decoders.image_random_crop(
                    encoded, device=decoder_device, output_type=types.RGB, random_area=list(_RRC_SCALE),
                    random_aspect_ratio=list(_RRC_RATIO), num_attempts=10,
                )
                images = fn.resize(images, resize_x=r, resize_y=r)
            else:
                images = fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB)
                if not self.train and r > SMALL_RESOLUTION:
                    images = fn.resize(images, resize_shorter=int(r * 256 / 224))
                else:
                    images = fn.resize(images, resize_x=r, resize_y=r)
                if self.train:  # pad 4 on every side, then an integer-offset random crop of R
                    images = fn.crop(images, crop=(r + 2 * _PAD, r + 2 * _PAD), out_of_bounds_policy="pad")
                    steps = [i / (2 * _PAD) for i in range(2 * _PAD + 1)]
                    crop_pos = {"crop_pos_x": fn.random.uniform(values=steps),
                                "crop_pos_y": fn.random.uniform(values=steps)}
            if self.train:
                mirror = fn.random.coin_flip(probability=0.5)
            images = fn.crop_mirror_normalize(
                images, dtype=types.FLOAT, output_layout="CHW", crop=(r, r), mirror=mirror,
                mean=[m * 255 for m in self.mean], std=[s * 255 for s in self.std], **crop_pos,
            )
            pipe.set_outputs(images, cls)
        pipe.build()
        return pipe

    def _to_torch(self, images: Any) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        tensor = images.as_tensor()
        out = torch.empty(tuple(tensor.shape()), dtype=torch.float32, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        return feed_ndarray(tensor, out, cuda_stream=stream)

    def __iter__(self) -> Iterator[Batch]:
        b = self.batch_size
        real = self.rank_samples
        pipe = self._build() if real else None
        try:
            for i in range(self.num_batches):
                valid = b if self.train else min(b, max(0, real - i * b))
                if valid == 0:  # past this rank's share: a whole padding batch, no read
                    yield self._padding(b)
                    continue
                images, cls = pipe.run()
                labels = torch.tensor([int(bytes(np.asarray(t))) for t in cls], dtype=torch.int64)
                out = self._to_torch(images)
                if valid < b:  # DALI pads the last batch by repeating the last sample: blank those rows
                    labels[valid:] = PAD_LABEL
                    out[valid:] = self._padding(b - valid)[0]
                yield out, labels.to(self.device)
        finally:
            del pipe
