"""What the unrolled inner loop of trajectory matching holds in memory, measured, not guessed.

`graph_bytes` runs the first one and two steps of the inner loop on the CPU at the real batch size and counts the
bytes of every tensor autograd saves for the backward pass (`torch.autograd.graph.saved_tensors_hooks`, each
storage once). The graph grows by the same amount per step, so the full unroll holds
    first + (syn_steps - 1) x (second - first)
plus the inputs. That is device-independent (float32 both ways); a GPU adds its allocator's rounding and the
kernels' workspaces, which `benchmarks/tm_memory.py` measures against it (docs/methods.md has the figures).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import Tensor

from pipeline.methods.trajectory.unroll import FlatNet, InnerLoop, unrolled


def _saved_bytes(fn: Any) -> int:
    seen: dict[tuple[int, int], int] = {}

    def pack(t: Tensor) -> Tensor:
        try:
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            seen[key] = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor without storage (e.g. a view of a functional)
            seen[(id(t), 0)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def graph_bytes(net: FlatNet, images: Tensor, labels: Tensor, loop: InnerLoop, start: Tensor, target: Tensor,
                gen: torch.Generator) -> dict[str, int]:
    """Bytes of the unrolled graph at `loop.syn_steps` (from one- and two-step measurements) and of its inputs."""
    x = images.detach().clone().requires_grad_(True)
    lr = torch.tensor(0.01, requires_grad=True)
    state = gen.get_state()
    one = _saved_bytes(lambda: unrolled(net, x, labels, lr, start, target, dataclasses.replace(loop, syn_steps=1), gen))
    gen.set_state(state)
    two = _saved_bytes(lambda: unrolled(net, x, labels, lr, start, target, dataclasses.replace(loop, syn_steps=2), gen))
    gen.set_state(state)
    per_step = max(0, two - one)
    inputs = (images.numel() * 4 * 3  # the images, their gradient and the momentum buffer
              + net.num_params * 4 * 3)  # start, target and the end point
    return {"first_step": one, "per_step": per_step, "graph": one + (loop.syn_steps - 1) * per_step,
            "inputs": inputs, "total": one + (loop.syn_steps - 1) * per_step + inputs}


def device_memory(device: torch.device) -> int:
    """Bytes the loop may use on `device`: a GPU's total memory, or the host's physical memory on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"
