"""Tests for pipeline.models."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision import models as tv_models

import pipeline.models.factory as models_mod
from pipeline.models import (
    OWN_ARCHS,
    ConvNet,
    available_archs,
    build_model,
    check_arch,
    has_batchnorm,
    load_state_dict_checked,
)

# The state-dict keys of the BN ConvNet as saved by every checkpoint so far; they must never change.
CONVNET_KEYS = [
    "features.0.weight", "features.0.bias",
    "features.1.weight", "features.1.bias", "features.1.running_mean", "features.1.running_var",
    "features.1.num_batches_tracked",
    "features.4.weight", "features.4.bias",
    "features.5.weight", "features.5.bias", "features.5.running_mean", "features.5.running_var",
    "features.5.num_batches_tracked",
    "features.8.weight", "features.8.bias",
    "features.9.weight", "features.9.bias", "features.9.running_mean", "features.9.running_var",
    "features.9.num_batches_tracked",
    "classifier.weight", "classifier.bias",
]


def _forward(model: nn.Module, resolution: int, batch: int = 2) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.randn(batch, 3, resolution, resolution))


@pytest.mark.parametrize("arch", [*OWN_ARCHS, "resnet18"])
def test_forward_shape_at_32(arch: str) -> None:
    torch.manual_seed(0)
    out = _forward(build_model(arch, num_classes=7, resolution=32).eval(), 32)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("arch", "resolution"), [
    ("convnet", 64), ("convnet-in", 64), ("lenet", 16), ("lenet", 64), ("mlp", 64), ("resnet18", 64),
])
def test_forward_shape_other_resolutions(arch: str, resolution: int) -> None:
    torch.manual_seed(0)
    out = _forward(build_model(arch, num_classes=4, resolution=resolution).eval(), resolution)
    assert out.shape == (2, 4)


@pytest.mark.parametrize("arch", [*OWN_ARCHS, "resnet18", "resnet50", "resnet101"])
def test_own_and_recipe_arch_names_build(arch: str) -> None:
    check_arch(arch)
    assert isinstance(build_model(arch, num_classes=3, resolution=32), nn.Module)


def test_resnet_small_image_stem_depends_on_resolution() -> None:
    for res in (32, 64):
        small = build_model("resnet18", num_classes=5, resolution=res)
        assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1) and small.conv1.bias is None
        assert isinstance(small.maxpool, nn.Identity)
    large = build_model("resnet18", num_classes=5, resolution=224)
    assert large.conv1.kernel_size == (7, 7) and large.conv1.stride == (2, 2)
    assert isinstance(large.maxpool, nn.MaxPool2d)
    with torch.no_grad():
        assert large.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 5)


def test_small_image_stem_applies_to_resnext() -> None:
    model = build_model("resnext50_32x4d", num_classes=5, resolution=32)
    assert model.conv1.kernel_size == (3, 3) and isinstance(model.maxpool, nn.Identity)


def test_torchvision_model_that_is_not_a_resnet() -> None:
    torch.manual_seed(0)
    model = build_model("mobilenet_v3_small", num_classes=5, resolution=32)
    assert isinstance(model, tv_models.MobileNetV3)
    assert model.features[0][0].stride == (2, 2)  # only ResNets get the small-image stem
    with torch.no_grad():
        assert model.train()(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert has_batchnorm(model)
    squeeze = build_model("squeezenet1_0", num_classes=3, resolution=32).eval()
    assert _forward(squeeze, 32).shape == (2, 3)


def test_build_does_not_move_the_rng() -> None:
    # The meta-device check must not draw random numbers, or seeded runs would change with it.
    torch.manual_seed(0)
    tv_models.get_model("mobilenet_v3_small", weights=None, num_classes=5)
    expected = torch.rand(3)
    torch.manual_seed(0)
    build_model("mobilenet_v3_small", num_classes=5, resolution=32)
    assert torch.equal(torch.rand(3), expected)


def test_resolution_too_small_fails_at_build_with_what_works() -> None:
    with pytest.raises(ValueError) as info:
        build_model("squeezenet1_0", num_classes=3, resolution=16)
    msg = str(info.value)
    assert "squeezenet1_0" in msg and "16x16" in msg and "runs at 28, 32" in msg


def test_vit_resolution_must_be_a_multiple_of_the_patch() -> None:
    with pytest.raises(ValueError, match=r"vit_b_16.*40x40.*multiple of its patch size 16 \(e\.g\. 32 or 48\)"):
        build_model("vit_b_16", num_classes=3, resolution=40)


def test_vit_and_inception_builder_arguments() -> None:
    # Built on the meta device: shapes only, so these large models cost nothing to check.
    with torch.device("meta"):
        vit = build_model("vit_b_16", num_classes=3, resolution=32)
        inception = build_model("inception_v3", num_classes=3, resolution=96)
    assert vit.image_size == 32
    assert inception.AuxLogits is None and not inception.aux_logits
    out = inception.train()(torch.empty(2, 3, 96, 96, device="meta"))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3)  # plain logits in train mode, no tuple


def test_convnet_structure() -> None:
    model = build_model("convnet", num_classes=3, resolution=16)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    pools = [m for m in model.modules() if isinstance(m, nn.AvgPool2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) == 3 and len(bns) == 3 and len(pools) == 3 and len(linears) == 1
    assert all(c.out_channels == 128 and c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert linears[0].in_features == 128 * (16 // 8) ** 2


def test_convnet_state_dict_keys_unchanged() -> None:
    assert list(build_model("convnet", num_classes=10, resolution=32).state_dict()) == CONVNET_KEYS


def test_convnet_init_unchanged() -> None:
    # The layout and construction order of the original BN ConvNet, written out: same seed, same weights.
    def reference() -> nn.Module:
        layers: list[nn.Module] = []
        for in_ch in (3, 128, 128):
            layers += [nn.Conv2d(in_ch, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(inplace=True),
                       nn.AvgPool2d(2)]
        ref = nn.Module()
        ref.features = nn.Sequential(*layers)
        ref.classifier = nn.Linear(128 * 4 * 4, 10)
        return ref

    torch.manual_seed(3)
    expected = reference().state_dict()
    torch.manual_seed(3)
    got = build_model("convnet", num_classes=10, resolution=32).state_dict()
    assert list(got) == list(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_convnet_in_uses_instance_groupnorm() -> None:
    model = build_model("convnet-in", num_classes=3, resolution=32)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 3
    assert all(n.num_groups == 128 and n.num_channels == 128 and n.affine for n in norms)
    assert not has_batchnorm(model)


def test_convnet_nn_has_no_norm() -> None:
    model = build_model("convnet-nn", num_classes=3, resolution=32)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in model.modules())
    assert [type(m) for m in model.features[:3]] == [nn.Conv2d, nn.ReLU, nn.AvgPool2d]


def test_convnet_width_depth_and_bad_norm() -> None:
    model = ConvNet(num_classes=2, resolution=32, width=16, depth=2, norm="instance")
    assert model.classifier.in_features == 16 * 8 * 8
    with pytest.raises(ValueError, match="norm"):
        ConvNet(num_classes=2, resolution=32, norm="layer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="resolution >= 8"):
        build_model("convnet", num_classes=2, resolution=4)


@pytest.mark.parametrize(("arch", "dim"), [("convnet", 128 * 4 * 4), ("convnet-in", 128 * 4 * 4), ("lenet", 84),
                                           ("mlp", 128)])
def test_embed_is_the_classifier_input(arch: str, dim: int) -> None:
    torch.manual_seed(0)
    model = build_model(arch, num_classes=5, resolution=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.embed(x)
        head = model.classifier if arch.startswith("convnet") else model.fc_3
        assert feats.shape == (2, dim)
        assert torch.allclose(head(feats), model(x))


def test_lenet_and_mlp_sizes() -> None:
    lenet = build_model("lenet", num_classes=10, resolution=32)
    assert (lenet.fc_1.in_features, lenet.fc_1.out_features, lenet.fc_2.out_features) == (16 * 5 * 5, 120, 84)
    assert build_model("lenet", num_classes=10, resolution=16).fc_1.in_features == 16
    with pytest.raises(ValueError, match="lenet needs resolution >= 16"):
        build_model("lenet", num_classes=10, resolution=15)
    mlp = build_model("mlp", num_classes=10, resolution=32)
    assert [(fc.in_features, fc.out_features) for fc in (mlp.fc_1, mlp.fc_2, mlp.fc_3)] == [
        (3 * 32 * 32, 128), (128, 128), (128, 10)]


def test_unknown_arch_suggests_close_names() -> None:
    with pytest.raises(ValueError) as info:
        build_model("resnet81", num_classes=10, resolution=32)
    msg = str(info.value)
    assert "'resnet81'" in msg and "'resnet18'" in msg and "available_archs()" in msg
    with pytest.raises(ValueError, match="'convnet-in'"):
        check_arch("convnet_in")


def test_check_arch_builds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("check_arch built a model")

    monkeypatch.setattr(models_mod.tv_models, "get_model", fail)
    for cls in ("ConvNet", "LeNet", "MLP"):
        monkeypatch.setattr(models_mod, cls, fail)
    for name in ("convnet", "convnet-in", "lenet", "mlp", "resnet18", "vgg11", "vit_b_16"):
        check_arch(name)
    with pytest.raises(ValueError, match="resnet18"):
        check_arch("resnet81")


def test_available_archs() -> None:
    names = available_archs()
    assert names == sorted(set(names))
    assert set(OWN_ARCHS) <= set(names)
    assert set(tv_models.list_models(module=tv_models)) <= set(names)


@pytest.mark.parametrize(("arch", "expected"), [
    ("resnet18", True), ("convnet", True), ("convnet-in", False), ("convnet-nn", False), ("mlp", False),
    ("lenet", False),
])
def test_has_batchnorm(arch: str, expected: bool) -> None:
    assert has_batchnorm(build_model(arch, num_classes=3, resolution=32)) is expected


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
