"""Distributed, resumable dataset distillation (SRe2L / DWA recover) pipeline.

`pipeline` holds the typed config, the stages, the runner, the CLI and the pure
compute (models, synthesis, augmentation, soft labels). It never imports `ray`.
"""

__version__ = "0.1.0"
