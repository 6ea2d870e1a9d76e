"""Pure compute of the matching recover methods: tensors and generators in, tensors out (no files, no Ray).

* DC, gradient matching: Zhao, Mopuri & Bilen, "Dataset Condensation with Gradient Matching", ICLR 2021;
* DSA, DC with Siamese augmentation: Zhao & Bilen, ICML 2021 (`pipeline.augment.dsa`);
* DM, distribution matching: Zhao & Bilen, "Dataset Condensation with Distribution Matching", WACV 2023;
  all three after https://github.com/VICO-UoE/DatasetCondensation (`main.py`, `main_DM.py`, `utils.py`);
* DataDAM, attention matching: Sajedi et al., ICCV 2023, https://github.com/DataDistillation/DataDAM
  (`main_DataDAM.py`, `utils.py` `get_attention`).

Shared by all: the synthetic images of the classes of a unit are one leaf tensor [K * ipc, 3, H, W] in normalized
space, class-major, optimized together by SGD with momentum 0.5; every outer iteration builds a fresh randomly
initialized ConvNet-3 (instance norm by default) from a seed drawn from the unit's generator, without touching
the global RNG. The official code never clamps the images while optimizing, nor does this file: the caller
denormalizes and clamps to [0, 1] only when encoding. Losses are recorded per iteration as device tensors
(no host sync inside the loops), divided by the number of classes as the official logs do.

Both loops take an optional `LoopCheckpoint` (below; the recover stage hands a `pipeline.run.unit_state` file):
they save their whole state at iteration boundaries when it says a save is due, and start from the saved state when
there is one, so a resumed loop returns the same bytes as one that never stopped.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from pipeline.augment.dsa import DEFAULT_PARAMS, DSAParams, apply, draw, to_device
from pipeline.models import ConvNet, Norm


class LoopCheckpoint(Protocol):
    """What a resumable loop needs: the last saved state (or None), whether a save is due now, and a save. The recover
    stage hands one per unit (`RecoverEnv.checkpoint`, a `pipeline.run.unit_state.UnitCheckpoint`)."""

    def load(self) -> dict[str, Any] | None: ...

    def due(self) -> bool: ...

    def save(self, state: dict[str, Any]) -> None: ...

# --------------------------------------------------------------------------------------------------
# Networks and real images


@dataclass(frozen=True)
class NetSpec:
    """The randomly initialized network of every outer iteration (official default: ConvNet-3, width 128,
    instance norm = GroupNorm(width, width))."""

    num_classes: int
    resolution: int
    width: int = 128
    depth: int = 3
    norm: Norm = "instance"


def fresh_net(spec: NetSpec, gen: torch.Generator, device: torch.device | str = "cpu") -> ConvNet:
    """A new ConvNet with PyTorch's default initialization, seeded from `gen`: the same generator state gives the
    same weights (on a given device type), and the global RNGs are left exactly as they were.

    The official code reseeds the global RNG from the clock for every network (`get_network`); a seed drawn from
    the unit's generator keeps the randomness while making a unit reproducible. On CUDA the network is built on
    the device from the device's generator (forked and restored), so no weights are copied from the host and
    nothing waits for the GPU; elsewhere it is built on the CPU and moved.
    """
    device = torch.device(device)
    seed = int(torch.randint(2**62, (), generator=gen))

    def build() -> ConvNet:
        return ConvNet(spec.num_classes, spec.resolution, width=spec.width, depth=spec.depth, norm=spec.norm)

    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index]), torch.device(f"cuda:{index}"):
            torch.cuda.default_generators[index].manual_seed(seed)
            return build()
    with torch.random.fork_rng(devices=[]):  # restores the CPU RNG on exit; no CUDA RNG is touched
        torch.random.default_generator.manual_seed(seed)  # CPU only (torch.manual_seed would also reseed CUDA)
        return build().to(device)


class RealImages:
    """The real training images of a unit's classes, kept on the device as uint8, sampled per iteration.

    uint8 is 4x smaller than float and exact for 8-bit sources (the ingest shards always are): `normalized`
    images in are turned back into bytes once, and each sample is normalized again on the device.
    """

    def __init__(self, per_class: Sequence[Tensor], mean: Sequence[float], std: Sequence[float]) -> None:
        if not per_class or any(t.dim() != 4 or t.shape[0] == 0 for t in per_class):
            raise ValueError("RealImages needs a non-empty [N, 3, H, W] tensor for every class")
        self.images = list(per_class)
        dev = per_class[0].device
        self.mean = torch.tensor(mean, dtype=torch.float32, device=dev).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=dev).view(1, -1, 1, 1)

    @staticmethod
    def to_bytes(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
        """Normalized float images (what `RealPool.batch` returns) back to uint8, rounding."""
        m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        return (x.float() * s + m).mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)

    @classmethod
    def from_normalized(cls, per_class: Sequence[Tensor], mean: Sequence[float], std: Sequence[float]) -> RealImages:
        return cls([cls.to_bytes(x, mean, std) for x in per_class], mean, std)

    def __len__(self) -> int:
        return len(self.images)

    def count(self, k: int) -> int:
        return int(self.images[k].shape[0])

    def sample(self, k: int, n: int, gen: torch.Generator) -> Tensor:
        """n normalized images of class k: the first n of a random permutation, as the official `get_images`
        (`np.random.permutation(indices_class[c])[:n]`): without replacement, all of the class if it has fewer."""
        idx = torch.randperm(self.count(k), generator=gen)[:n]
        x = self.images[k][to_device(idx, self.images[k].device)].float().div_(255.0)
        return (x - self.mean) / self.std


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


def siamese_views(reals: Sequence[Tensor], syns: Sequence[Tensor], gen: torch.Generator, strategy: str,
                  params: DSAParams = DEFAULT_PARAMS) -> tuple[list[Tensor], list[Tensor]]:
    """One Siamese DSA draw per class, applied to that class's real and synthetic batch."""
    out_r, out_s = [], []
    for r, s in zip(reals, syns, strict=True):
        d = draw(gen, strategy, r.shape[-2], r.shape[-1], n=1, params=params)
        out_r.append(apply(r, d, params))
        out_s.append(apply(s, d, params))
    return out_r, out_s


def resume_loop(ckpt: LoopCheckpoint | None, x: Tensor, opt: torch.optim.Optimizer, gen: torch.Generator,
            hist: dict[str, Tensor], iterations: int) -> int:
    """Restore a saved loop state into (x, opt, gen, hist); the iteration to continue from (0 = none saved)."""
    state = ckpt.load() if ckpt is not None else None
    if state is None:
        return 0
    if (tuple(state["x"].shape) != tuple(x.shape) or state.get("iterations") != iterations
            or set(state["hist"]) != set(hist)):
        raise ValueError(f"the unit checkpoint holds images {tuple(state['x'].shape)} after "
                         f"{state.get('iterations')} iterations, this loop has {tuple(x.shape)} and {iterations}: "
                         "it belongs to another unit; delete it")
    with torch.no_grad():
        x.copy_(state["x"])
        for key, h in hist.items():
            h.copy_(state["hist"][key])
    opt.load_state_dict(state["opt"])  # the momentum buffer, moved to x's device
    gen.set_state(state["gen"])
    return int(state["it"])


def save_loop(ckpt: LoopCheckpoint | None, it: int, iterations: int, x: Tensor, opt: torch.optim.Optimizer,
          gen: torch.Generator, hist: dict[str, Tensor]) -> None:
    """After iteration `it - 1`: save the state when the checkpoint says a save is due (never after the last)."""
    if ckpt is None or it >= iterations or not ckpt.due():
        return
    state: dict[str, Any] = {"it": it, "iterations": iterations, "x": x.detach().cpu(), "opt": opt.state_dict(),
                             "gen": gen.get_state(), "hist": {k: h.cpu() for k, h in hist.items()},
                             "loss": float(hist["total"][it - 1])}
    ckpt.save(state)


def check_syn(syn: Tensor, k_classes: int, ipc: int) -> None:
    if syn.dim() != 4 or syn.shape[0] != k_classes * ipc:
        raise ValueError(f"synthetic images must be [{k_classes} classes x {ipc} ipc, 3, H, W], "
                         f"got {tuple(syn.shape)}")


def summarize(hist: dict[str, Tensor]) -> dict[str, float]:
    """loss_first / loss_last (mean of the last 5 % of iterations, at least one) per history, `total` named
    plainly (`loss_first`, `loss_last`), the others `loss_<key>_first` / `_last`: one host sync for all."""
    keys = list(hist)
    n = hist[keys[0]].shape[0]
    tail = max(1, n // 20)
    stacked = torch.stack([torch.stack([hist[k][0], hist[k][-tail:].mean()]) for k in keys]).tolist()
    out: dict[str, float] = {}
    for k, (first, last) in zip(keys, stacked, strict=True):
        name = "loss" if k == "total" else f"loss_{k}"
        out[f"{name}_first"], out[f"{name}_last"] = float(first), float(last)
    return out
