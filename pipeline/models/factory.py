"""Model construction (teachers and students) and checked state-dict loading.

Two kinds of architecture names are accepted by `build_model`:

* the project's own small-image networks (`OWN_ARCHS`): the ConvNet-3 variants of the dataset-condensation
  literature (`convnet`, `convnet-in`, `convnet-nn`), `lenet` and `mlp`;
* every torchvision classification model name (`torchvision.models.list_models(module=torchvision.models)`,
  e.g. `resnet18`, `mobilenet_v3_small`, `vit_b_16`), built untrained with `weights=None`.

`available_archs()` lists them all; `check_arch(name)` validates a name without building anything.
"""

from __future__ import annotations

import difflib
import functools
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torchvision import models as tv_models

from pipeline.models.convnets import MLP, ConvNet, LeNet, Norm

# The project's own architectures (not in torchvision).
OWN_ARCHS: tuple[str, ...] = ("convnet", "convnet-in", "convnet-nn", "lenet", "mlp")


_CONVNET_NORMS: dict[str, Norm] = {"convnet": "batch", "convnet-in": "instance", "convnet-nn": "none"}

# Resolutions at or below this use the small-image ResNet stem (3x3 stride-1 conv1, no max-pool).
SMALL_IMAGE_MAX_RESOLUTION = 64

# Resolutions tried when a torchvision model cannot run at the requested one, to say in the error what works.
_TRIAL_RESOLUTIONS = (16, 28, 32, 64, 96, 112, 128, 160, 192, 224, 256, 299, 384, 448, 512)

@functools.cache
def _torchvision_archs() -> frozenset[str]:
    # module=tv_models keeps only the classification models: detection, segmentation, video, optical-flow and
    # quantized builders live in sub-modules and do not fit the (images -> logits) contract of the pipeline.
    return frozenset(tv_models.list_models(module=tv_models))


def available_archs() -> list[str]:
    """Every accepted architecture name, sorted: `OWN_ARCHS` plus torchvision's classification models."""
    return sorted({*OWN_ARCHS, *_torchvision_archs()})


def check_arch(name: str) -> None:
    """Raise ValueError if `name` is not an accepted architecture; builds nothing (cheap enough for config checks).

    The message suggests the closest names (difflib) and says how to list them all.
    """
    if name in OWN_ARCHS or name in _torchvision_archs():
        return
    names = available_archs()
    # Compare lower-cased so that e.g. 'ResNet18' still suggests 'resnet18'.
    close = difflib.get_close_matches(str(name).lower(), names, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    raise ValueError(
        f"unknown architecture {name!r}{hint}; accepted: the project's own {', '.join(OWN_ARCHS)} and any "
        "torchvision classification model (see pipeline.models.available_archs() or "
        "torchvision.models.list_models(module=torchvision.models))")


def build_model(arch: str, num_classes: int, resolution: int) -> nn.Module:
    """Build an untrained model for `resolution` x `resolution` RGB images.

    `arch` is one of `OWN_ARCHS` or a torchvision classification model name (`available_archs()`); anything
    else raises the ValueError of `check_arch`. torchvision models are built with `weights=None` and:

    * ResNet family (`torchvision.models.ResNet`: resnet*, resnext*, wide_resnet*): when
      `resolution <= SMALL_IMAGE_MAX_RESOLUTION` (64) they use the small-image (CIFAR) stem: conv1 becomes a
      3x3 stride-1 padding-1 conv without bias and the max-pool an `nn.Identity`, so a 32 px image is not
      downsampled 4x before the first block. No other family is changed: at small resolutions they keep their
      ImageNet stems and downsample to a few pixels (most still run, see below).
    * ViT (vit_*): built with `image_size=resolution`, which must be a multiple of the patch size; MaxViT with
      `input_size=(resolution, resolution)`.
    * inception_v3 and googlenet: built with `aux_logits=False` (training uses plain cross-entropy on one
      logits tensor; with auxiliary heads they return a tuple in train mode) and `init_weights=True` (their
      current from-scratch init, stated to silence torchvision's FutureWarning).

    Every torchvision model then gets a shape-only forward on the meta device (no compute, no memory), so a
    model that cannot run at `resolution` (e.g. inception_v3 or squeezenet at 16 px) raises a ValueError here
    naming the model, the resolution and resolutions that work, instead of failing deep inside a forward.
    """
    check_arch(arch)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    if arch in _CONVNET_NORMS:
        return ConvNet(num_classes, resolution, norm=_CONVNET_NORMS[arch])
    if arch == "lenet":
        return LeNet(num_classes, resolution)
    if arch == "mlp":
        return MLP(num_classes, resolution)
    return _build_torchvision(arch, num_classes, resolution)


def _vit_patch_size(arch: str) -> int | None:
    # torchvision's ViT builders are named vit_<size>_<patch> (vit_b_16, vit_h_14, ...).
    match = re.fullmatch(r"vit_[a-z]+_(\d+)", arch)
    return int(match.group(1)) if match else None


def _torchvision_kwargs(arch: str, resolution: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if _vit_patch_size(arch) is not None:
        kwargs["image_size"] = resolution  # the position embedding is sized for exactly this input
    elif arch.startswith("maxvit"):
        kwargs["input_size"] = (resolution, resolution)
    elif arch in ("inception_v3", "googlenet"):
        kwargs.update(aux_logits=False, init_weights=True)
    return kwargs


def _construct(arch: str, num_classes: int, resolution: int) -> nn.Module:
    kwargs = _torchvision_kwargs(arch, resolution)
    model = tv_models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    if isinstance(model, tv_models.ResNet) and resolution <= SMALL_IMAGE_MAX_RESOLUTION:
        # Same operations in the same order as before torchvision names were generalised, so a seed gives the
        # same initial weights for resnet18/50/101 as older runs; the init is torchvision's own for conv layers.
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    return model


def _meta_forward(model: nn.Module, num_classes: int, resolution: int) -> None:
    """Run `model` on a meta-device image batch of one, with meta stand-ins for its parameters and buffers.

    Meta tensors carry shapes only, so this checks that every layer accepts the sizes it gets, at no compute
    or memory cost and without touching the real weights. Eval mode: BatchNorm in train mode refuses a batch
    of one at 1x1 spatial size, which a real (larger) training batch would not hit.
    """
    state = {k: torch.empty_like(v, device="meta") for k, v in (*model.named_parameters(), *model.named_buffers())}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = functional_call(model, state, (torch.empty(1, 3, resolution, resolution, device="meta"),))
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise RuntimeError(f"expected logits of shape (1, {num_classes}), got {shape}")


def _runs_at(arch: str, resolution: int) -> bool:
    """Whether `arch` builds and runs at `resolution`, checked on the meta device (no weights allocated)."""
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = _construct(arch, 2, resolution)
        _meta_forward(model, 2, resolution)
    except Exception:  # any failure means "does not run there"; this only feeds an error message
        return False
    return True


def _resolution_error(arch: str, resolution: int, cause: BaseException) -> ValueError:
    patch = _vit_patch_size(arch)
    if patch is not None:
        lower, upper = max(patch, resolution // patch * patch), (resolution // patch + 1) * patch
        works = f"it needs a multiple of its patch size {patch} (e.g. {lower} or {upper})"
    else:
        # fork_rng: the trial builds must not move the global RNG, or the caller's seeding would depend on them.
        with torch.random.fork_rng(devices=[]):
            ok = [r for r in _TRIAL_RESOLUTIONS if r != resolution and _runs_at(arch, r)]
        if ok:
            works = f"it runs at {', '.join(map(str, ok[:6]))}{' and more' if len(ok) > 6 else ''}"
        else:
            works = f"it ran at none of {', '.join(map(str, _TRIAL_RESOLUTIONS))}"
    reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return ValueError(f"architecture {arch!r} cannot run on {resolution}x{resolution} images ({reason}); {works}. "
                      "Choose another data.resolution or architecture (convnet, convnet-in, lenet, mlp and the "
                      "ResNets run at small resolutions)")


def _build_torchvision(arch: str, num_classes: int, resolution: int) -> nn.Module:
    patch = _vit_patch_size(arch)
    if patch is not None and resolution % patch:
        # Checked before building: torchvision would only raise an AssertionError from inside the constructor.
        raise _resolution_error(arch, resolution, ValueError(f"{resolution} is not a multiple of {patch}"))
    try:
        model = _construct(arch, num_classes, resolution)
    except (ValueError, AssertionError, RuntimeError) as exc:  # size checks in constructors (e.g. MaxViT)
        raise _resolution_error(arch, resolution, exc) from exc
    try:
        with torch.random.fork_rng(devices=[]):
            _meta_forward(model, num_classes, resolution)
    except NotImplementedError:
        pass  # an op without a meta kernel: the check is inconclusive, so do not refuse a model that may work
    except (RuntimeError, ValueError, AssertionError, IndexError) as exc:
        raise _resolution_error(arch, resolution, exc) from exc
    return model


def has_batchnorm(model: nn.Module) -> bool:
    """True if `model` contains at least one `nn.BatchNorm2d` (what the recover BN loss hooks).

    Subclasses count, so torchvision models whose norm layers are BatchNorm2d (ResNets, MobileNets,
    EfficientNets, DenseNets, RegNets, VGG *_bn, ...) are detected; GroupNorm (`convnet-in`), LayerNorm (ViT,
    Swin, ConvNeXt) and models without norm (`convnet-nn`, `lenet`, `mlp`) are not.
    """
    return any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def _fmt_shape(shape: torch.Size | tuple[int, ...]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def _fmt_keys(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load `state_dict` into `model` strictly, after checking keys and shapes.

    On any mismatch a ValueError names `source`, the first few missing and unexpected keys, and each shape
    mismatch as "key: expected (a, b), found (c, d)"; what is not a mapping of names to tensors at all (a bare
    tensor, a list, a dict of other things) is "not a state_dict: SOURCE".
    """
    if not isinstance(state_dict, Mapping) or not state_dict or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
        kind = type(state_dict).__name__ if not isinstance(state_dict, Mapping) else (
            "an empty mapping" if not state_dict else "a mapping that does not hold only named tensors")
        raise ValueError(f"not a state_dict: {source} (found {kind})")
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
