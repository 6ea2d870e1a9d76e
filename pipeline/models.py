"""Model construction (teachers and students) and checked state-dict loading."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torchvision import models as tv_models

ARCHS = ("convnet", "resnet18", "resnet50", "resnet101")

_RESNETS = {
    "resnet18": tv_models.resnet18,
    "resnet50": tv_models.resnet50,
    "resnet101": tv_models.resnet101,
}

# Resolutions at or below this use the small-image ResNet stem (3x3 stride-1 conv1, no max-pool).
SMALL_IMAGE_MAX_RESOLUTION = 64


class ConvNet(nn.Module):
    """The 3-block ConvNet of the dataset-condensation literature, with BatchNorm.

    Each block is Conv2d(3x3, `width`, padding 1) -> BatchNorm2d -> ReLU -> AvgPool2d(2); the features are
    flattened and fed to one Linear layer.
    """

    def __init__(self, num_classes: int, resolution: int, width: int = 128, depth: int = 3) -> None:
        super().__init__()
        if resolution < 2**depth:
            raise ValueError(f"convnet needs resolution >= {2**depth}, got {resolution}")
        layers: list[nn.Module] = []
        in_ch = 3
        for _ in range(depth):
            layers += [
                nn.Conv2d(in_ch, width, kernel_size=3, padding=1),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(2),
            ]
            in_ch = width
        self.features = nn.Sequential(*layers)
        side = resolution // 2**depth
        self.classifier = nn.Linear(width * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, num_classes] for images [N, 3, H, W]."""
        return self.classifier(torch.flatten(self.features(x), 1))


def build_model(arch: str, num_classes: int, resolution: int) -> nn.Module:
    """Build an untrained model.

    `arch` is one of `ARCHS`. ResNets are torchvision's (`weights=None`); when `resolution <= 64` they use the
    small-image stem (conv1 3x3 stride 1 padding 1 without bias, max-pool replaced by `nn.Identity`).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    if arch == "convnet":
        return ConvNet(num_classes, resolution)
    if arch in _RESNETS:
        model = _RESNETS[arch](weights=None, num_classes=num_classes)
        if resolution <= SMALL_IMAGE_MAX_RESOLUTION:
            model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
            model.maxpool = nn.Identity()
        return model
    raise ValueError(f"unknown arch {arch!r}; valid archs: {', '.join(ARCHS)}")


def has_batchnorm(model: nn.Module) -> bool:
    """True if `model` contains at least one `nn.BatchNorm2d` (what the recover BN loss hooks)."""
    return any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def _fmt_shape(shape: torch.Size | tuple[int, ...]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def _fmt_keys(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load `state_dict` into `model` strictly, after checking keys and shapes.

    On any mismatch a ValueError names `source`, the first few missing and unexpected keys, and each shape
    mismatch as "key: expected (a, b), found (c, d)".
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shape_errors = [
        f"{k}: expected {_fmt_shape(expected[k].shape)}, found {_fmt_shape(tuple(state_dict[k].shape))}"
        for k in expected
        if k in state_dict and tuple(expected[k].shape) != tuple(state_dict[k].shape)
    ]
    if missing or unexpected or shape_errors:
        parts = [f"state dict from {source} does not match the model"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_fmt_keys(unexpected)}")
            for prefix in ("module.", "_orig_mod."):
                if all(k.startswith(prefix) for k in unexpected) and missing:
                    parts.append(f"hint: keys carry a {prefix!r} prefix (wrapped model?)")
        if shape_errors:
            parts.append(f"shape mismatches ({len(shape_errors)}): " + "; ".join(shape_errors[:5]))
        raise ValueError("; ".join(parts))
    model.load_state_dict(state_dict, strict=True)
