"""Fairness metrics of a distilled set against its baselines, in fractions (accuracies arrive in percent).

- IOR (improvement over random) = acc(method) - acc(random-real), same protocol and student;
- HLR (hard-label recovery gap) = acc(full real, hard) - acc(method, hard), same student;
- LRS (label-robust score) = (exp((IOR - HLR) / 2) - exp(-1)) / (e - exp(-1)), on fractions, so it lies in
  [0, 1] (DD-Ranking's published code mixes percent units into this formula; this one does not).

Accuracies over student seeds are averaged first: IOR and HLR are differences of means.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from typing import Any


def ior(method_top1_pct: float | None, random_top1_pct: float | None) -> float | None:
    if method_top1_pct is None or random_top1_pct is None:
        return None
    return (method_top1_pct - random_top1_pct) / 100.0


def hlr(full_top1_pct: float | None, method_hard_top1_pct: float | None) -> float | None:
    if full_top1_pct is None or method_hard_top1_pct is None:
        return None
    return (full_top1_pct - method_hard_top1_pct) / 100.0


def lrs(ior_value: float | None, hlr_value: float | None) -> float | None:
    if ior_value is None or hlr_value is None:
        return None
    return (math.exp((ior_value - hlr_value) / 2.0) - math.exp(-1.0)) / (math.e - math.exp(-1.0))


def _mean(cells: Iterable[Mapping[str, Any]], protocol: str, student: str) -> float | None:
    vals = [float(c["top1"]) for c in cells if c.get("protocol") == protocol and c.get("student") == student
            and c.get("top1") is not None]
    return statistics.fmean(vals) if vals else None


def fairness_rows(cells: list[dict], baselines: dict) -> list[dict]:
    """One row per (protocol, student) of the method's cells, in their order: n (seeds), top1 (mean, percent),
    random_top1, full_top1 (means, percent, or None), ior, hlr (from the student's hard cells), lrs."""
    rand = ((baselines or {}).get("random-real") or {}).get("cells") or []
    full = ((baselines or {}).get("full-real") or {}).get("cells") or []
    rows = []
    for protocol, student in dict.fromkeys((c["protocol"], c["student"]) for c in cells):
        n = sum(1 for c in cells if c["protocol"] == protocol and c["student"] == student)
        top1 = _mean(cells, protocol, student)
        random_top1 = _mean(rand, protocol, student)
        full_top1 = _mean(full, "hard", student)
        i = ior(top1, random_top1)
        h = hlr(full_top1, _mean(cells, "hard", student))
        rows.append({"protocol": protocol, "student": student, "n": n, "top1": top1, "random_top1": random_top1,
                     "full_top1": full_top1, "ior": i, "hlr": h, "lrs": lrs(i, h)})
    return rows
