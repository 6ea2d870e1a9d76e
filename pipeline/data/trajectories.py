"""Expert trajectories on disk: one file per expert, the parameters of its network at every epoch boundary.

The experts stage (`pipeline.run.stages.experts`) writes them; trajectory matching (`mtt`, `pad`) reads them
through `TrajectoryReader`. A file holds a float32 tensor [epochs + 1, P] (row 0 = the initial parameters, row e =
after epoch e), the network's parameter names and shapes in `named_parameters()` order (buffers are not kept: the
instance-normed ConvNet has none, as in MTT's `buffer.py`, which saves parameters only), and what the network is
(architecture, classes, resolution), so a reader can refuse a file made for another network.

Size: 4 bytes x P x (epochs + 1) per expert. ConvNet-3 (width 128, instance norm): P = 320,010 at 32 px with 10
classes (65 MB for 50 epochs, MTT's 100 experts 6.5 GB); 311,050 at 28 px (3 x 3 final map); at 64 px the
classifier grows to 8,192 x C (200 classes: 1,938,120 parameters, 395 MB for 50 epochs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FORMAT = "distill-trajectory/1"


def expert_name(index: int) -> str:
    return f"expert-{index:04d}.pt"


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    """Every parameter of `model`, flattened and concatenated in `named_parameters()` order (float32, CPU)."""
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()])


def layout(model: torch.nn.Module) -> tuple[list[str], list[list[int]]]:
    names, shapes = zip(*[(n, list(p.shape)) for n, p in model.named_parameters()], strict=True)
    return list(names), list(shapes)


def write_trajectory(path: Path, snapshots: torch.Tensor, meta: dict[str, Any], names: list[str],
                     shapes: list[list[int]]) -> None:
    """Write one expert's trajectory atomically (a reader never sees half a file)."""
    from manifests.store import atomic_path

    if snapshots.dim() != 2 or snapshots.shape[1] != sum(math.prod(s) for s in shapes):
        raise ValueError(f"trajectory {path.name}: snapshots {tuple(snapshots.shape)} do not match the layout")
    obj = {"format": FORMAT, "meta": dict(meta), "names": names, "shapes": shapes,
           "params": snapshots.float().contiguous()}
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as fh:  # a file object: the same bytes in every run
        torch.save(obj, fh)


def read_trajectory(path: Path) -> dict[str, Any]:
    """One expert's file, checked; a ValueError naming the file when it is not a trajectory of this format."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file
        raise ValueError(f"expert trajectory {path} cannot be read ({exc}); delete it and run the experts stage "
                         "again") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"{path} is not an expert trajectory of format {FORMAT}")
    p = obj["params"]
    if p.dim() != 2 or p.shape[1] != sum(math.prod(s) for s in obj["shapes"]):
        raise ValueError(f"expert trajectory {path}: parameters {tuple(p.shape)} do not match its layout")
    return obj


@dataclass
class TrajectoryReader:
    """The experts of a run: `num_experts` files of `epochs + 1` snapshots each, loaded on demand (an LRU of
    `cache` experts in host memory: 100 experts of ConvNet-3 do not all fit on a laptop)."""

    paths: list[Path]
    epochs: int
    meta: dict[str, Any]
    cache: int = 4

    def __post_init__(self) -> None:
        self._loaded: dict[int, torch.Tensor] = {}
        self._order: list[int] = []
        self._layout: tuple[list[str], list[list[int]]] | None = None

    @property
    def num_experts(self) -> int:
        return len(self.paths)

    def params(self, expert: int) -> torch.Tensor:
        """[epochs + 1, P] float32 of one expert (CPU)."""
        if expert not in self._loaded:
            obj = read_trajectory(self.paths[expert])
            if obj["params"].shape[0] != self.epochs + 1:
                raise ValueError(f"expert trajectory {self.paths[expert]}: {obj['params'].shape[0]} snapshots, "
                                 f"expected {self.epochs + 1}")
            for key in ("arch", "num_classes", "resolution"):
                if obj["meta"].get(key) != self.meta.get(key):
                    raise ValueError(f"expert trajectory {self.paths[expert]}: {key} {obj['meta'].get(key)!r}, "
                                     f"this run has {self.meta.get(key)!r}")
            self._layout = (obj["names"], obj["shapes"])
            self._loaded[expert] = obj["params"]
            self._order.append(expert)
            while len(self._order) > max(1, self.cache):
                self._loaded.pop(self._order.pop(0))
        return self._loaded[expert]

    def snapshot(self, expert: int, epoch: int) -> torch.Tensor:
        """The flat parameters of `expert` after `epoch` epochs (0 = its initialization)."""
        if not 0 <= epoch <= self.epochs:
            raise IndexError(f"epoch {epoch} outside the trajectories' 0..{self.epochs}")
        return self.params(expert)[epoch]

    def layout(self) -> tuple[list[str], list[list[int]]]:
        """(names, shapes) of the parameters in flat order."""
        if self._layout is None:
            self.params(0)
        assert self._layout is not None
        return self._layout
