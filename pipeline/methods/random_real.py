"""The random-real baseline: IPC real training images per class, picked by a seeded order.

Every table needs it: under the same soft-label protocol, random real images match many distillation methods.
The pick for (class, j) is the j-th image of the class's order keyed by (run seed, "real-pick", class), the
same images real-initialized methods start from.
"""

from __future__ import annotations

from typing import Any

from pipeline.methods.base import MethodOutput, Needs, register


class RandomRealWorker:
    def __init__(self, env: Any) -> None:
        self.env = env

    def run(self, classes: range, ipc: range, gen: Any, unit_key: str) -> MethodOutput:
        from pipeline.core.imageops import denormalize

        env = self.env
        out = MethodOutput(metrics={"image_iterations": 0})
        for j in ipc:
            out.add(denormalize(env.real_init(classes, j), env.mean, env.std).clamp(0, 1), classes, [j] * len(classes))
        return out


@register("random-real", description="baseline: IPC random real training images per class",
          needs=Needs(real_images=True), default_init="real", synthesizes=False)
def open_random_real(env: Any, cfg: None) -> RandomRealWorker:
    return RandomRealWorker(env)
