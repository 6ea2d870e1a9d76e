"""Herding selection: per class, the IPC real training images whose running mean stays closest to the class mean
in the teacher's penultimate feature space (the input of its last nn.Linear).

Real images are chosen, not synthesized. The greedy rule is `pipeline.methods.selection.herding` (argmin of
|| mu_c - (s + x) / (t + 1) ||; DeepCore's `Herding` takes the argmax, a known bug, not followed here). The
features come from `RecoverEnv.features`: one teacher pass over all of a class's real images. The selection is
computed for the unit's whole IPC range from index 0 and sliced, so any IPC split gives the same images (the
method is still registered `whole_class`, one unit per class shard). A class with fewer real images than IPC
gives all of them, then repeats from the start of its selection; such classes are listed in `short_classes`.

`SelectionWorker` is shared with `pipeline.methods.kcenter`, `forgetting` and `loss_score` (rankings).
"""

from __future__ import annotations

import time
from typing import Any

from pipeline.methods.base import MethodOutput, Needs, register


class SelectionWorker:
    """Outputs the rows `env.selected_rows(kind, class, ...)` as images in [0, 1], class-major, selection order."""

    def __init__(self, env: Any, kind: str) -> None:
        self.env, self.kind = env, kind

    def run(self, classes: range, ipc: range, gen: Any, unit_key: str) -> MethodOutput:
        from pipeline.core.imageops import denormalize

        env = self.env
        pool = env.require_real()
        out = MethodOutput(metrics={"image_iterations": 0})
        feature_s = select_s = 0.0
        short: list[int] = []
        from pipeline.methods.base import get_method

        ranking = get_method(self.kind).selection == "ranking"
        for c in classes:
            t0 = time.perf_counter()
            if ranking:  # a per-sample score: the whole class ranked
                t1 = t0
                order = env.ranked_rows(self.kind, c)
                rows = order
            else:
                rows, _ = env.features(c)
                t1 = time.perf_counter()
                # From index 0 to the unit's last IPC index: prefix-stable, so any IPC split slices the same list.
                order = env.selected_rows(self.kind, c, ipc.stop)
            select_s += time.perf_counter() - t1
            feature_s += t1 - t0
            if len(rows) < ipc.stop:
                short.append(c)
            picks = [order[j % len(order)] for j in ipc]
            images = denormalize(pool.batch(picks), env.mean, env.std).clamp(0, 1)
            out.add(images, [c] * len(ipc), ipc)
        out.metrics.update(feature_seconds=round(feature_s, 3), selection_seconds=round(select_s, 3),
                           short_classes=short)
        return out


@register("herding", description="selection: per class, the real images whose running mean in the teacher's "
                                 "feature space stays closest to the class mean (greedy herding)",
          needs=Needs(teacher=True, real_images=True), whole_class=True, default_init="real", synthesizes=False,
          selection="greedy")
def open_herding(env: Any, cfg: None) -> SelectionWorker:
    return SelectionWorker(env, "herding")
