"""Tests for pipeline.models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.models import ARCHS, build_model, has_batchnorm, load_state_dict_checked


@pytest.mark.parametrize("arch", ARCHS)
def test_build_model_small_resolution_forward(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, num_classes=7, resolution=32).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    assert has_batchnorm(model)


def test_resnet_stem_depends_on_resolution() -> None:
    small = build_model("resnet18", num_classes=5, resolution=64)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1) and small.conv1.bias is None
    assert isinstance(small.maxpool, nn.Identity)
    large = build_model("resnet18", num_classes=5, resolution=224)
    assert large.conv1.kernel_size == (7, 7) and large.conv1.stride == (2, 2)
    assert isinstance(large.maxpool, nn.MaxPool2d)
    with torch.no_grad():
        assert large.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 5)


def test_convnet_structure() -> None:
    model = build_model("convnet", num_classes=3, resolution=16)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    pools = [m for m in model.modules() if isinstance(m, nn.AvgPool2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) == 3 and len(bns) == 3 and len(pools) == 3 and len(linears) == 1
    assert all(c.out_channels == 128 and c.kernel_size == (3, 3) for c in convs)
    assert linears[0].in_features == 128 * (16 // 8) ** 2


def test_unknown_arch_message() -> None:
    with pytest.raises(ValueError) as info:
        build_model("vgg11", num_classes=10, resolution=32)
    msg = str(info.value)
    assert "vgg11" in msg
    assert all(a in msg for a in ARCHS)


def test_has_batchnorm_false_without_bn() -> None:
    assert not has_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))


def test_load_checked_wrong_class_count() -> None:
    model = build_model("convnet", num_classes=10, resolution=16)
    other = build_model("convnet", num_classes=5, resolution=16)
    with pytest.raises(ValueError) as info:
        load_state_dict_checked(model, other.state_dict(), source="ckpt/teacher.pt")
    msg = str(info.value)
    assert "ckpt/teacher.pt" in msg
    assert "classifier.weight: expected (10, 512), found (5, 512)" in msg
    assert "classifier.bias: expected (10), found (5)" in msg


def test_load_checked_missing_and_unexpected_keys() -> None:
    model = build_model("convnet", num_classes=4, resolution=16)
    sd = dict(model.state_dict())
    del sd["features.1.running_mean"]
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as info:
        load_state_dict_checked(model, sd, source="somewhere")
    msg = str(info.value)
    assert "somewhere" in msg and "features.1.running_mean" in msg and "extra.weight" in msg


def test_load_checked_success_copies_values() -> None:
    torch.manual_seed(1)
    src = build_model("convnet", num_classes=4, resolution=16)
    dst = build_model("convnet", num_classes=4, resolution=16)
    load_state_dict_checked(dst, src.state_dict(), source="src")
    for (k, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
