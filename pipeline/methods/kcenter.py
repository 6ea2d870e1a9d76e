"""k-center selection: per class, a greedy farthest-first traversal of the real training images in the teacher's
penultimate feature space (the input of its last nn.Linear), after Sener & Savarese's core-set (ICLR 2018).

Real images are chosen, not synthesized. From a start drawn per class (generator keyed by (run seed, "recover",
"k-center", class): the same start whatever the unit split, and the same selection that `recover.init =
real-k-center` starts other methods from), each next image is the one farthest from its nearest chosen image
(`pipeline.methods.selection.k_center`). Slicing, repeats for short classes and metrics as in
`pipeline.methods.herding`.
"""

from __future__ import annotations

from typing import Any

from pipeline.methods.base import Needs, register
from pipeline.methods.herding import SelectionWorker


@register("k-center", description="selection: per class, greedy k-center (farthest-first) real images in the "
                                  "teacher's feature space",
          needs=Needs(teacher=True, real_images=True), whole_class=True, default_init="real", synthesizes=False,
          selection="greedy")
def open_k_center(env: Any, cfg: None) -> SelectionWorker:
    return SelectionWorker(env, "k-center")
