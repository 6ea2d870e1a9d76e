"""DWA: SRe2L with directed weight adjustment (Du et al., NeurIPS 2024;
https://github.com/AngusDujw/Diversity-Driven-Synthesis).

Before each synthetic batch the teacher's parameters move by K normalized ascent steps of total radius rho on
CE over one real subset B, then SRe2L's recover runs against the perturbed teacher, which is restored after
the batch. B is drawn here, per worker, from the unit's own classes: class-balanced, fresh for every batch,
the same B for all K steps (see docs/methods.md, DWA, for how this differs from the official code and why).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipeline.core.seeding import generator
from pipeline.methods.base import Needs, doc_field, register
from pipeline.methods.sre2l import Sre2lConfig, SynthesisWorker


@dataclass
class DwaConfig(Sre2lConfig):
    """DWA's settings (`recover.dwa.*`): SRe2L's plus the perturbation. Defaults: the official ImageNet values
    except `iterations` (official 2000), `jitter` (32 at 224 px) and K (15 on ImageNet, 12 on CIFAR/Tiny).
    SRe2L's keys include CDA's crop schedule (`crop_schedule=cda`): DWA's official code has none, so DWA + CDA is
    a combination made here, not a published method."""

    r_var: float = doc_field(2.0, "weight of the variance term inside the BN loss (official: ImageNet 2, "
                                  "CIFAR/Tiny 11)")
    steps: int = doc_field(12, "K: normalized ascent steps on the teacher's weights before each batch")
    rho: float = doc_field(15e-3, "total radius of the weight perturbation")
    batch_size: int = doc_field(0, "size of the real subset B (0 = the synthesis batch: one image per class)")

    def validate(self) -> None:
        super().validate()
        if self.steps < 1:
            raise ValueError(f"steps must be > 0, got {self.steps}")
        if not self.rho >= 0:
            raise ValueError(f"rho must be >= 0, got {self.rho}")
        if self.batch_size < 0:
            raise ValueError(f"batch_size must be >= 0, got {self.batch_size}")

    def subset(self, env: Any, classes: range, key: str, j: int) -> tuple[Any, Any]:
        """DWA's real subset B for batch j of a unit: class-balanced over the unit's classes, fresh per batch.

        B holds `ceil(batch_size / classes)` images of every class of the unit (default size = the synthesis
        batch, i.e. one image per class, like the official code's batch of real init images), drawn without
        replacement where the class has enough images, from a generator keyed by
        (run seed, "recover", "dwa", unit key, j). The same B serves all K ascent steps.
        """
        import torch

        pool = env.require_real()
        per_class = max(1, math.ceil((self.batch_size or len(classes)) / len(classes)))
        g = generator(env.seed, "recover", "dwa", key, j)
        rows: list[int] = []
        for c in classes:
            candidates = pool.rows(c)
            if per_class <= len(candidates):
                pick = torch.randperm(len(candidates), generator=g)[:per_class].tolist()
            else:
                pick = torch.randint(len(candidates), (per_class,), generator=g).tolist()
            rows += [candidates[i] for i in pick]
        labels = torch.tensor([pool.label(i) for i in rows], dtype=torch.long, device=env.device)
        return pool.batch(rows), labels


@register("dwa", description="DWA: SRe2L against a teacher perturbed towards real images before each batch",
          needs=Needs(teacher=True, bn_teacher=True, real_images=True), config=DwaConfig, default_init="real")
def open_dwa(env: Any, cfg: DwaConfig) -> SynthesisWorker:
    return SynthesisWorker(env, cfg, dwa=cfg)
