"""Pure compute of trajectory matching (MTT, DATM, PAD): tensors, generators and an expert reader in, tensors out.

Owns: `unroll` (the student at a flat parameter vector, the inner loop unrolled or TESLA's constant-memory
gradient, PAD's parameter masks), `loop` (the outer loop: expert and start-epoch sampling, the image / label /
step-size optimizers, resumable state), `memory` (what the unrolled inner loop needs). Used by the `mtt` and `pad`
plug-ins and `benchmarks/tm_memory.py`. May import: `pipeline.core`, `pipeline.augment`, `pipeline.models`.
"""

from pipeline.methods.trajectory.loop import TrajectoryMatching, start_window, trajectory_matching
from pipeline.methods.trajectory.unroll import (
    MASKS,
    MEMORY,
    FlatNet,
    InnerLoop,
    batches,
    matching_loss,
    param_mask,
    tesla,
    unrolled,
)

__all__ = ["MASKS", "MEMORY", "FlatNet", "InnerLoop", "TrajectoryMatching", "batches", "matching_loss", "param_mask",
           "start_window", "tesla", "trajectory_matching", "unrolled"]
