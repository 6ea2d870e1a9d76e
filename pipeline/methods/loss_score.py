"""Loss-score selection: per class, real training images ranked by a class-normalized loss of the teacher.

score(x_i)  = l(f(x_i), y_i) / mean over the class of l(f(x_k), y_k)
score2(x_i) = (l_label(x_i) - l_pred(x_i)) / mean over the class of l_label(x_k)

with l_label the cross-entropy against the label and l_pred against the predicted class
(`pipeline.methods.selection.loss_scores`). The losses come from the loss buffers of the squeeze stage (each training
image's losses averaged over the last `squeeze.stats_window` epochs, `pipeline.train.sample_stats`) or from the final
teacher, run here on the class's images (`source = final`, which also works with an imported teacher). With a
per-class budget the normalization does not change which images a class keeps; it makes the recorded scores
comparable across classes.

Which end to keep (`take`): low (the easiest, most typical images) or high (the hardest). The default, low, was
chosen by measurement on a holdout slice of the bundled digits' *training* split (`benchmarks/loss_score_end.py`;
docs/benchmarks.md, "Which end of the loss-score ranking to keep"): at IPC 1 low 81.4 %, high 45.0 %, random 73.0 %.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.methods.base import Needs, doc_field, register
from pipeline.methods.herding import SelectionWorker


@dataclass
class LossScoreConfig:
    """`recover.loss_score.*`."""

    score: str = doc_field("score", "score (l_label / class mean) | score2 ((l_label - l_pred) / class mean)")
    source: str = doc_field("buffers", "buffers (losses averaged over the teacher's last training epochs, "
                                       "recorded by squeeze) | final (the final teacher, run in recover)")
    take: str = doc_field("low", "low (lowest scores first: the easiest images) | high (the hardest)")

    def validate(self) -> None:
        for key, choices in (("score", ("score", "score2")), ("source", ("buffers", "final")),
                             ("take", ("low", "high"))):
            if getattr(self, key) not in choices:
                raise ValueError(f"{key} must be one of {', '.join(choices)}, got {getattr(self, key)!r}")

    def needs_squeeze_stats(self) -> bool:
        return self.source == "buffers"


class LossScoreWorker(SelectionWorker):
    def __init__(self, env: Any, cfg: LossScoreConfig) -> None:
        super().__init__(env, "loss-score")
        env.loss_score = cfg


@register("loss-score", description="selection: per class, the real images with the lowest (or highest) "
                                    "class-normalized teacher loss (score / score2)",
          needs=Needs(teacher=True, real_images=True), config=LossScoreConfig, whole_class=True,
          default_init="real", synthesizes=False, selection="ranking")
def open_loss_score(env: Any, cfg: LossScoreConfig) -> LossScoreWorker:
    return LossScoreWorker(env, cfg)
