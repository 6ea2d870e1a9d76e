"""Deterministic seeds derived from (run seed, stage, unit key, ...)."""

from __future__ import annotations

import hashlib

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
