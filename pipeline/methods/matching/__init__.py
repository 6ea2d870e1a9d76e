"""Pure compute of the matching recover methods (DM, DataDAM, DC, DSA): tensors and generators in, tensors out.

Owns: `common` (the fresh random ConvNet of each iteration, the real images of a unit kept on the device, Siamese
DSA views, resumable loop state, loss summaries), `distribution` (DM / DataDAM losses and loop), `gradient` (DC /
DSA losses, inner training and loop). Used by the `dm`, `datadam`, `dc` and `dsa` plug-ins and `distill bench`.
May import: `pipeline.core`, `pipeline.augment` (DSA), `pipeline.models`; nothing above `pipeline.methods`.
"""

from pipeline.methods.matching.common import LoopCheckpoint, NetSpec, RealImages, fresh_net, siamese_views, summarize
from pipeline.methods.matching.distribution import (
    AttentionSpec,
    DistributionMatching,
    attention_map,
    class_means,
    distribution_matching,
    features,
    matching_loss,
    mean_distance,
)
from pipeline.methods.matching.gradient import (
    DC_LOOPS,
    GradientMatching,
    dc_loops,
    freeze_batchnorm,
    gradient_distance,
    gradient_matching,
    gradient_matching_loss,
    matched_parameters,
    train_on_synthetic,
)

__all__ = [
    "DC_LOOPS", "AttentionSpec", "DistributionMatching", "GradientMatching", "LoopCheckpoint", "NetSpec", "RealImages",
    "attention_map", "class_means", "dc_loops", "distribution_matching", "features", "freeze_batchnorm",
    "fresh_net", "gradient_distance", "gradient_matching", "gradient_matching_loss", "matched_parameters",
    "matching_loss", "mean_distance", "siamese_views", "summarize", "train_on_synthetic",
]
