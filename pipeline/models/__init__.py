"""Every network the pipeline builds: teachers, students, experts and the matching methods' random nets.

Owns: `convnets` (the project's ConvNet-3 variants, LeNet, MLP), `factory` (`build_model` for those and every
torchvision classification model, `check_arch`, checked state-dict loading). May import: `pipeline.core` only.
"""

from pipeline.models.convnets import MLP, ConvNet, LeNet, Norm
from pipeline.models.factory import (
    OWN_ARCHS,
    SMALL_IMAGE_MAX_RESOLUTION,
    available_archs,
    build_model,
    check_arch,
    has_batchnorm,
    load_state_dict_checked,
)

__all__ = [
    "MLP", "OWN_ARCHS", "SMALL_IMAGE_MAX_RESOLUTION", "ConvNet", "LeNet", "Norm", "available_archs", "build_model",
    "check_arch", "has_batchnorm", "load_state_dict_checked",
]
