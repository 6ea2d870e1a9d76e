"""The DALI loader: an NVIDIA DALI pipeline per epoch (CPU-only with device="cpu", "mixed" GPU decoding on CUDA).

Training: the shard order is permuted per epoch (the same permutation on every rank), the reader
splits the samples into `world_size` contiguous parts (part `rank`) and shuffles in a buffer of
`initial_fill` samples; the pipeline seed comes from (seed, epoch, rank). The transforms are those
of `pipeline.data.images`, built from DALI operators.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.augment.crops import CROP_RATIO, CROP_SCALE, CROP_TRIES
from pipeline.core.seeding import derive_seed
from pipeline.data.images import IMAGE_EXTS, SMALL_PAD, SMALL_RESOLUTION
from pipeline.data.loader_base import PAD_LABEL, BaseLoader, Batch

DALI_INSTALL_HINT = "install it with `pip install -e .[dali]` (the nvidia-dali-cuda130 wheel)"


def import_dali() -> Any:
    """The `nvidia.dali` module; ImportError with an install hint when it does not import."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn  # noqa: F401
        import nvidia.dali.types  # noqa: F401
    except (ImportError, OSError) as exc:
        raise ImportError(f"the DALI loader needs NVIDIA DALI, which does not import ({exc}); "
                          f"{DALI_INSTALL_HINT}, or use the PIL loader (backend='pil')") from exc
    return dali


class DaliLoader(BaseLoader):
    """NVIDIA DALI pipeline (CPU-only with `device="cpu"`, "mixed" GPU decoding on CUDA).

    One pipeline is built per iteration (epoch) and torn down at its end. Labels are parsed in
    Python from the ascii `cls` member (DALI reads it as raw uint8 bytes).
    """

    backend = "dali"

    def __init__(self, shards: Sequence[str | Path], **kwargs: Any) -> None:
        import_dali()
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
                    encoded, device=decoder_device, output_type=types.RGB, random_area=list(CROP_SCALE),
                    random_aspect_ratio=list(CROP_RATIO), num_attempts=CROP_TRIES,
                )
                images = fn.resize(images, resize_x=r, resize_y=r)
            else:
                images = fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB)
                if not self.train and r > SMALL_RESOLUTION:
                    images = fn.resize(images, resize_shorter=int(r * 256 / 224))
                else:
                    images = fn.resize(images, resize_x=r, resize_y=r)
                if self.train:  # pad 4 on every side, then an integer-offset random crop of R
                    images = fn.crop(images, crop=(r + 2 * SMALL_PAD, r + 2 * SMALL_PAD), out_of_bounds_policy="pad")
                    steps = [i / (2 * SMALL_PAD) for i in range(2 * SMALL_PAD + 1)]
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
