"""Deterministic seeds derived from (run seed, stage, unit key, ...), and a fixed CPU thread count."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch


def derive_seed(run_seed: int, *parts: object) -> int:
    """A 63-bit seed from the run seed and any keys (stage name, unit key, epoch, image id).

    Stable across processes, hosts and Python versions (no `hash()`).
    """
    text = "/".join([str(int(run_seed))] + [str(p) for p in parts])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def generator(run_seed: int, *parts: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator seeded by `derive_seed(run_seed, *parts)`."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(run_seed, *parts))
    return g


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with exactly `n` torch CPU threads, then restore the previous count.

    CPU kernels split their reductions by thread (BatchNorm's backward, sums), so float results depend on the
    thread count: a fixed count makes them depend on nothing else (not OMP_NUM_THREADS, not the CPU
    affinity, not what an executor set for its workers).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)
