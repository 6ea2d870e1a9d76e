"""The project's own small-image networks: the ConvNet-3 family of the dataset-condensation literature, LeNet-5
and a three-layer MLP (the architectures of DC's networks.py, with their input sizes computed from the resolution).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Norm = Literal["batch", "instance", "none"]


class ConvNet(nn.Module):
    """The ConvNet of the dataset-condensation literature (default depth 3, width 128).

    Each of the `depth` blocks is Conv2d(3x3, `width`, padding 1) -> norm -> ReLU -> AvgPool2d(2); the features
    are flattened and fed to one Linear layer. `norm` is "batch" (`nn.BatchNorm2d`), "instance" (the official
    'instancenorm': `nn.GroupNorm(width, width, affine=True)`, one group per channel) or "none" (the norm layer
    is left out, so later layer indices shift).

    From DC (Zhao et al., "Dataset Condensation with Gradient Matching", ICLR 2021), networks.py `ConvNet` of
    https://github.com/VICO-UoE/DatasetCondensation, itself after Gidaris & Komodakis (CVPR 2018). Note the
    names: the official 'ConvNet' (the default of DC, DSA, DM and MTT evaluations) is instance-normed, i.e.
    our `convnet-in`; our `convnet` is the official 'ConvNetBN' and `convnet-nn` is 'ConvNetNN'.

    With norm="batch", width 128, depth 3 the module layout (state-dict keys `features.{0,1,4,5,8,9}.*`,
    `classifier.*`) and the order in which parameters draw from the RNG are those of the BN-only ConvNet this
    project had before, so its checkpoints still load and a seed still gives the same initial weights.
    """

    def __init__(self, num_classes: int, resolution: int, width: int = 128, depth: int = 3,
                 norm: Norm = "batch") -> None:
        super().__init__()
        if norm not in ("batch", "instance", "none"):
            raise ValueError(f"ConvNet norm must be 'batch', 'instance' or 'none', got {norm!r}")
        if width < 1 or depth < 1:
            raise ValueError(f"ConvNet width and depth must be >= 1, got width={width}, depth={depth}")
        if resolution < 2**depth:
            raise ValueError(f"convnet of depth {depth} needs resolution >= {2**depth}, got {resolution}")
        layers: list[nn.Module] = []
        in_ch = 3
        for _ in range(depth):
            layers.append(nn.Conv2d(in_ch, width, kernel_size=3, padding=1))
            if norm == "batch":
                layers.append(nn.BatchNorm2d(width))
            elif norm == "instance":
                # GroupNorm with one group per channel normalises each (sample, channel) over H x W, which is
                # instance norm; the official code uses it instead of nn.InstanceNorm2d to get an affine
                # per-channel scale and shift without running statistics.
                layers.append(nn.GroupNorm(width, width, affine=True))
            layers += [nn.ReLU(inplace=True), nn.AvgPool2d(2)]
            in_ch = width
        self.features = nn.Sequential(*layers)
        side = resolution // 2**depth
        self.classifier = nn.Linear(width * side * side, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened features [N, width * side * side] before the classifier (what distribution matching uses)."""
        return torch.flatten(self.features(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, num_classes] for images [N, 3, H, W]."""
        return self.classifier(self.embed(x))


class LeNet(nn.Module):
    """LeNet-5 style network for small RGB images, for cross-architecture checks.

    Conv2d(3, 6, 5x5) -> ReLU -> MaxPool2d(2) -> Conv2d(6, 16, 5x5) -> ReLU -> MaxPool2d(2) -> flatten ->
    Linear(16 * s * s, 120) -> ReLU -> Linear(120, 84) -> ReLU -> Linear(84, num_classes), with no padding and
    s = ((resolution - 4) // 2 - 4) // 2 (5 at 32 px, 1 at 16 px), so any resolution >= 16 works.

    After LeCun et al., "Gradient-based learning applied to document recognition", Proc. IEEE 1998, in the
    form of the `LeNet` of DC's networks.py (3-channel branch; Zhao et al., ICLR 2021,
    https://github.com/VICO-UoE/DatasetCondensation), whose flattened size is fixed to 32 px inputs and is
    computed from `resolution` here. Module names (`features`, `fc_1`..`fc_3`) are the official ones.
    """

    MIN_RESOLUTION = 16  # 16 -> conv 12 -> pool 6 -> conv 2 -> pool 1; at 15 the last map is empty

    def __init__(self, num_classes: int, resolution: int) -> None:
        super().__init__()
        if resolution < self.MIN_RESOLUTION:
            raise ValueError(f"lenet needs resolution >= {self.MIN_RESOLUTION}, got {resolution}")
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        side = ((resolution - 4) // 2 - 4) // 2
        self.fc_1 = nn.Linear(16 * side * side, 120)
        self.fc_2 = nn.Linear(120, 84)
        self.fc_3 = nn.Linear(84, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The 84 features fed to the last Linear layer."""
        x = torch.flatten(self.features(x), 1)
        return torch.relu(self.fc_2(torch.relu(self.fc_1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, num_classes] for images [N, 3, H, W]."""
        return self.fc_3(self.embed(x))


class MLP(nn.Module):
    """Three-layer perceptron on the flattened image, for cross-architecture checks on small images.

    flatten -> Linear(3 * resolution**2, 128) -> ReLU -> Linear(128, 128) -> ReLU -> Linear(128, num_classes):
    two hidden layers of exactly 128 units (3072 inputs at 32 px).

    The `MLP` of DC's networks.py (Zhao et al., ICLR 2021, https://github.com/VICO-UoE/DatasetCondensation),
    with the input size computed from `resolution` instead of fixed to 32 px; module names are the official ones.
    """

    HIDDEN = 128

    def __init__(self, num_classes: int, resolution: int) -> None:
        super().__init__()
        self.fc_1 = nn.Linear(3 * resolution * resolution, self.HIDDEN)
        self.fc_2 = nn.Linear(self.HIDDEN, self.HIDDEN)
        self.fc_3 = nn.Linear(self.HIDDEN, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The 128 features fed to the last Linear layer."""
        return torch.relu(self.fc_2(torch.relu(self.fc_1(torch.flatten(x, 1)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, num_classes] for images [N, 3, H, W]."""
        return self.fc_3(self.embed(x))
