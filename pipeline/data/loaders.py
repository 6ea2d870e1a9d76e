"""Batched readers of the real WebDataset shards: a PIL + DataLoader path and a DALI path.

Both backends keep one contract. A loader is an iterable over batches
``(images, labels)``: ``images`` float32 ``[B, 3, R, R]`` normalized with the loader's
mean/std (``data.mean`` / ``data.std``, ImageNet's by default), ``labels`` int64 ``[B]``; ``len(loader)`` is the number of batches one epoch
yields on this rank, and it is the same on every rank, so DDP never waits on a rank that
ran out of data. Every batch is full (``B`` rows).

Training (``train=True``) needs ``num_samples`` (the number of training samples) and yields
``num_samples // (batch_size * world_size)`` batches per rank and epoch.

How each backend draws its shards and shuffles: ``pipeline.data.pil_loader`` and
``pipeline.data.dali_loader``.

Evaluation (``train=False``) reads each sample exactly once over all ranks: rank ``r`` of
``W`` takes samples ``[floor(r*N/W), floor((r+1)*N/W))`` of the shards read in the given order
(the split DALI's reader uses, so both backends give a rank the same samples). Ranks then
pad to ``ceil(ceil(N/W) / B)`` full batches. Padding rows carry the label ``PAD_LABEL`` (-1)
and meaningless images: an evaluator must count only rows with ``labels >= 0``.

The transforms, the same in both backends, are in ``pipeline.data.images``.

Modules: ``sharding`` (shard lists, keys, each rank's share, epoch lengths), ``images`` (decoding,
transforms), ``loader_base`` (arguments, checks, normalization, padding), ``pil_loader``,
``dali_loader``; this module picks the backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.data.dali_loader import DaliLoader, import_dali
from pipeline.data.loader_base import PAD_LABEL  # noqa: F401 - re-export (tests)
from pipeline.data.pil_loader import PilLoader
from pipeline.data.sharding import eval_batches, rank_range, shard_paths  # noqa: F401 - re-export (tests)

BACKENDS = ("auto", "pil", "dali")


def dali_available() -> bool:
    """Whether `nvidia.dali` imports."""
    try:
        import_dali()
    except ImportError:
        return False
    return True


def make_loader(shards: Sequence[str | Path], *, backend: str = "auto", **options: Any) -> PilLoader | DaliLoader:
    """A loader over `shards` with the contract of this module's docstring.

    backend: "pil", "dali" or "auto" (DALI when it imports, else PIL); "dali" without DALI
    raises ImportError with an install hint. options: the keyword arguments
    of `BaseLoader` (one home for their defaults): train, batch_size, resolution (required),
    rank, world_size, num_workers, seed, epoch, num_samples, device, shuffle_buffer, mean, std.
    DALI decodes with the "mixed" (GPU) decoder when `device` is CUDA.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be auto, pil or dali, not {backend!r}")
    if backend == "auto":
        backend = "dali" if dali_available() else "pil"
    cls: type[PilLoader] | type[DaliLoader] = DaliLoader if backend == "dali" else PilLoader
    return cls(shards, **options)
