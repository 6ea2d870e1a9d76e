"""The pure core of SRe2L and DWA: tensors and a `torch.Generator` in, tensors out (no files, no Ray).

Owns: `objective` (hyperparameters, the BatchNorm-statistics term, the teacher's side of an iteration),
`augment` (one crop / flip / roll draw per batch and iteration, CDA's crop-scale schedule), `dwa` (the directed weight perturbation and its
undoing), `loop` (initial images, the cosine lr, `synthesize_batch`). Used by the `sre2l` and `dwa` plug-ins and
`distill bench`. May import: `pipeline.core`, `pipeline.augment` (crop geometry); nothing above `pipeline.methods`.
"""

from pipeline.methods.synthesis.augment import AugDraw, apply_augment, augment_batch, cda_min_scale, draw_augment
from pipeline.methods.synthesis.dwa import dwa_perturb, perturbation_norm, restore_parameters
from pipeline.methods.synthesis.loop import clamp_to_image_, cosine_lr, init_images, synthesize_batch
from pipeline.methods.synthesis.objective import BNStatsHook, DWAParams, RecoverParams, TeacherObjective

__all__ = [
    "AugDraw", "BNStatsHook", "DWAParams", "RecoverParams", "TeacherObjective", "apply_augment", "augment_batch",
    "cda_min_scale", "clamp_to_image_", "cosine_lr", "draw_augment", "dwa_perturb", "init_images", "perturbation_norm",
    "restore_parameters", "synthesize_batch",
]
