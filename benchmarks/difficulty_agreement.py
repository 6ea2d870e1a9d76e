"""Does the teacher's per-sample loss order each class as EL2N does? (PAD's experts schedule, `experts.schedule=pad`)

PAD orders every class by a precomputed difficulty (GraNd or uncertainty scores from DeepCore); this project orders
it by the squeeze teacher's mean cross-entropy over its last `squeeze.stats_window` epochs. This script measures how
close that order is to EL2N (Paul et al., "Deep Learning on a Data Diet", NeurIPS 2021: the norm of softmax(f(x)) -
onehot(y), averaged over networks early in training), computed from the run's own experts at one epoch:

    python benchmarks/difficulty_agreement.py RUN_DIR [--epoch 2]

RUN_DIR is a finished run of `mtt` or `pad` (its experts, ingest and squeeze statistics). Prints, per class and
overall, Spearman's rank correlation of the two scores over the class's training images (the holdout slice left
out), and the share of the easiest quarter by one score that is also in the easiest quarter by the other.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--epoch", type=int, default=2, help="the experts' snapshot EL2N is computed at")
    args = p.parse_args(argv)

    from pipeline.config import config_from_json
    from pipeline.core.imageops import normalize
    from pipeline.methods.trajectory import FlatNet
    from pipeline.models import build_model
    from pipeline.run.base import RunContext
    from pipeline.run.runner import compute_hashes
    from pipeline.run.stages.experts import ExpertsWorker, trajectory_reader

    run_dir = Path(args.run_dir)
    cfg = config_from_json(run_dir / "config.json")
    ctx = RunContext(run_dir=run_dir, config=cfg, run_id="difficulty", hashes=compute_hashes(cfg))
    reader = trajectory_reader(ctx)
    worker = ExpertsWorker(ctx)
    from pipeline.data.holdout import HoldoutSpec
    from pipeline.run.stages.common import real_meta
    from pipeline.train.full_real import load_train_split

    shards = real_meta(ctx)["shards"]["train"]
    holdout = HoldoutSpec(str(ctx.path("real")), tuple(str(ctx.path("real", f"{n}.parquet")) for n in shards),
                          cfg.eval.holdout_fraction, cfg.data.shuffle_seed)
    raw, labels, rows = load_train_split(holdout, cfg.data.resolution)
    x = normalize(raw.float().div_(255.0), cfg.data.mean, cfg.data.std)
    teacher_loss = worker._difficulty(rows)
    m = reader.meta
    net = FlatNet(build_model(m["arch"], m["num_classes"], m["resolution"]), *reader.layout())
    el2n = torch.zeros(len(x))
    with torch.no_grad():
        for e in range(reader.num_experts):
            probs = torch.cat([net(x[i:i + 512], reader.snapshot(e, args.epoch)).softmax(1)
                               for i in range(0, len(x), 512)])
            el2n += (probs - torch.nn.functional.one_hot(labels, probs.shape[1]).float()).norm(dim=1)
    el2n /= reader.num_experts
    rhos, overlaps = [], []
    for c in range(m["num_classes"]):
        pos = (labels == c).nonzero().flatten()
        a, b = teacher_loss[pos], el2n[pos]
        q = max(1, len(pos) // 4)
        easy_a, easy_b = set(a.argsort()[:q].tolist()), set(b.argsort()[:q].tolist())
        rhos.append(spearman(a, b))
        overlaps.append(len(easy_a & easy_b) / q)
    out = {"run": str(run_dir), "data": cfg.data.dataset, "experts": reader.num_experts, "epoch": args.epoch,
           "images": len(x), "spearman_mean": round(statistics.fmean(rhos), 3),
           "spearman_min": round(min(rhos), 3), "easiest_quarter_overlap_mean": round(statistics.fmean(overlaps), 3),
           "per_class_spearman": [round(r, 3) for r in rhos]}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
