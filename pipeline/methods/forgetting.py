"""Forgetting selection: per class, the real training images the teacher forgot most often while it was trained.

A forgetting event is a transition from classified correctly to misclassified between two consecutive squeeze
epochs (Toneva et al., "An Empirical Study of Example Forgetting during Deep Neural Network Learning", ICLR 2019;
the "Forgetting" coreset baseline of the DC paper, Zhao et al., ICLR 2021). The counts are recorded by the squeeze
stage (`pipeline.train.sample_stats`, `checkpoints/teacher-samples.parquet`); images never classified correctly rank
first (as most forgotten), then the counts in decreasing order, ties in a seeded order per class. An imported
teacher (`squeeze.weights`) has no training and so no events: the configuration is refused at load.
"""

from __future__ import annotations

from typing import Any

from pipeline.methods.base import Needs, register
from pipeline.methods.herding import SelectionWorker


@register("forgetting", description="selection: per class, the real images with the most forgetting events "
                                    "(correct -> wrong) during the teacher's training; never-learned first",
          needs=Needs(real_images=True, squeeze_stats=True), whole_class=True, default_init="real",
          synthesizes=False, selection="ranking")
def open_forgetting(env: Any, cfg: None) -> SelectionWorker:
    return SelectionWorker(env, "forgetting")
