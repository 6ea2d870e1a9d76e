"""Which end of the loss-score ranking to keep: measured on a holdout slice of the *training* split.

    python benchmarks/loss_score_end.py --run-dir runs/demo            # a run whose squeeze recorded statistics

Per class, a seeded 20 % of the training images is held out; the rest is the pool. From the pool, IPC images per
class are chosen by the class-normalized loss score from the squeeze stage's loss buffers (`score` or `score2`,
lowest first = `take=low`, highest first = `take=high`) or at random; a hard-protocol student (ConvNet-3 IN, SGD,
`pipeline.train.hardlabel`, no augmentation) is trained on them and scored on the held-out training images. The
validation split is never read. The teacher saw the held-out images while training (the statistics come from it),
the students never do.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    import pyarrow.parquet as pq
    import torch

    from pipeline.config import config_from_json
    from pipeline.core.seeding import generator
    from pipeline.data.classmap import read_class_map
    from pipeline.methods.realpool import RealPool
    from pipeline.methods.selection import loss_scores, rank
    from pipeline.models import build_model
    from pipeline.train.hardlabel import make_optimizer, train_epoch
    from pipeline.train.jobs import HardSpec

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--ipcs", default="1,10")
    p.add_argument("--epochs", default="300,100", help="student epochs per IPC (same order as --ipcs)")
    p.add_argument("--seeds", default="0,1", help="split/student seeds")
    p.add_argument("--scores", default="score")
    p.add_argument("--holdout", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Path(args.run_dir)
    cfg = config_from_json(run / "config.json")
    names = read_class_map(run / "real")["shards"]["train"]
    mean, std = tuple(cfg.data.mean), tuple(cfg.data.std)
    pool = RealPool(run / "real", [run / "real" / f"{n}.parquet" for n in names], 0, cfg.data.resolution, mean, std,
                    torch.device("cpu"))
    stats = pq.read_table(run / "checkpoints" / "teacher-samples.parquet")
    ll_all = torch.tensor(stats.column("loss_label_mean").to_numpy(), dtype=torch.float64)
    lp_all = torch.tensor(stats.column("loss_pred_mean").to_numpy(), dtype=torch.float64)
    classes = sorted(pool.by_class)
    rows_out = []
    for ipc, epochs in zip([int(i) for i in args.ipcs.split(",")], [int(e) for e in args.epochs.split(",")],
                           strict=True):
        for seed in [int(s) for s in args.seeds.split(",")]:
            split_pool, held = {}, []
            for c in classes:
                rows = pool.rows(c)
                perm = [rows[i] for i in torch.randperm(len(rows), generator=generator(seed, "holdout", c)).tolist()]
                k = max(1, round(args.holdout * len(rows)))
                held += perm[:k]
                split_pool[c] = perm[k:]
            x_held = pool.batch(held)
            y_held = torch.tensor([pool.label(r) for r in held])
            choices = [("random", None, None)] + [(s, s, t) for s in args.scores.split(",") for t in ("low", "high")]
            for name, score, take in choices:
                picks = []
                for c in classes:
                    cand = split_pool[c]
                    if score is None:
                        order = cand  # already a seeded random order
                    else:
                        idx = torch.tensor(cand)
                        order = [cand[i] for i in rank(loss_scores(ll_all[idx], lp_all[idx], score), take == "high")]
                    picks += order[:ipc]
                x = pool.batch(picks)
                y = torch.tensor([pool.label(r) for r in picks])
                spec = HardSpec(arch="convnet-in", epochs=epochs, batch_size=256, lr=0.01, momentum=0.9,
                                weight_decay=5e-4, dsa_strategy="")
                torch.manual_seed(seed)
                model = build_model(spec.arch, len(classes), cfg.data.resolution)
                opt, sched = make_optimizer(model, spec)
                for epoch in range(epochs):
                    train_epoch(model, opt, x, y, spec, seed, epoch, torch.device("cpu"))
                    sched.step()
                model.eval()
                with torch.no_grad():
                    acc = float((model(x_held).argmax(1) == y_held).float().mean()) * 100
                row = {"ipc": ipc, "seed": seed, "choice": name if take is None else f"{name}-{take}",
                       "holdout_top1": round(acc, 2), "epochs": epochs}
                print(json.dumps(row), flush=True)
                rows_out.append(row)
    print("\n| IPC | choice | holdout top-1 (mean over seeds) |\n|---:|---|---:|")
    for key in sorted({(r["ipc"], r["choice"]) for r in rows_out}):
        vals = [r["holdout_top1"] for r in rows_out if (r["ipc"], r["choice"]) == key]
        print(f"| {key[0]} | {key[1]} | {statistics.fmean(vals):.1f} (n={len(vals)}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
