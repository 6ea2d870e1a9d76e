"""The methods' sanity table: every recover method on the bundled digits under the `hard` protocol, beside the
DC paper's MNIST numbers.

    python benchmarks/sanity_table.py --work runs/sanity            # all methods, IPC 1 and 10, seeds 0 1 2
    python benchmarks/sanity_table.py --work runs/sanity --methods dm,dc --ipcs 1

For each run seed the demo teacher is trained once (`<work>/teacher-s<seed>`: ingest + squeeze of the demo
recipe with that seed; processes of one seed may run side by side: a process waits while another trains or
checks it); each (method, IPC, seed) is a run directory cloned from it that runs recover, train
(`train.protocol=hard`) and evaluate with the demo recipe's settings, which shorten the matching methods (see
`distill recipes demo`). The hard student's epochs are `--student-epochs` (default 300 for every method: the
official 1000 for DSA-augmented sets is shortened). `--hard-augment dsa` trains every student with the DSA
augmentation (the hard protocol's `auto` gives it only to sets made by DSA, DM and DataDAM, as their papers
do): with `--methods random-real` that is the fair reference for those rows; such runs are kept apart (run
directory `<method>-ipc<i>-s<seed>-aug-dsa`, table row `<method> (aug dsa)`). Results are appended to
`<work>/results.jsonl` as each run finishes (`--set KEY=VALUE` adds overrides to every run, e.g. a matching
method's published schedule on a GPU; such runs get their own run directories and table rows too), so an interrupted table resumes where it stopped (a matching
method's unit from its last checkpoint inside the unit); the markdown table is printed at the end (and written
to `--out`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("random-real", "herding", "k-center", "forgetting", "loss-score", "sre2l", "dwa", "dm", "dc", "dsa",
           "datadam", "mtt", "pad")
# DC paper (Zhao, Mopuri & Bilen, "Dataset Condensation with Gradient Matching", ICLR 2021), Table 1, MNIST,
# ConvNet, IPC 1 / 10: mean +- std of test accuracy (%). Methods it does not report have no entry.
PAPER = {"random-real": ("64.9 +- 3.5", "95.1 +- 0.9"), "herding": ("89.2 +- 1.6", "93.7 +- 0.3"),
         "forgetting": ("35.5 +- 5.6", "68.1 +- 3.3"), "dc": ("91.7 +- 0.5", "97.4 +- 0.2"),
         "dsa": ("88.7 +- 0.6", "97.8 +- 0.1")}
# one hard student per run; the table has its own random-real rows (no in-run baselines, no kd cell)
COMMON = ["executor.kind=local", "data.num_workers=0", "eval.protocols=[]", "eval.baselines=[]"]


def teacher(work: Path, seed: int) -> Path:
    from pipeline.commands.recipes import load_config
    from pipeline.run.runner import run_pipeline

    run_dir = work / f"teacher-s{seed}"
    # another table process of this seed may be training or checking the teacher: wait for it
    run_pipeline(load_config("demo", overrides=[*COMMON, f"seed={seed}"]), run_dir, stages=["ingest", "squeeze"],
                 progress=False, on_busy=lambda who: print(f"waiting for {run_dir}: in use by {who}",
                                                           file=sys.stderr, flush=True))
    return run_dir


def _set_tag(extra: list[str]) -> str:
    """A short, stable name for a list of extra overrides (run directories and table rows keep such runs apart)."""
    import hashlib

    return hashlib.sha256("\n".join(sorted(extra)).encode()).hexdigest()[:8] if extra else ""


def one_run(work: Path, method: str, ipc: int, seed: int, epochs: int, augment: str = "auto",
            extra: list[str] | None = None, protocol: str = "hard") -> list[dict]:
    """One run directory; a row per protocol (`protocol` may name several, comma-separated: one recover, a student
    of each)."""
    from pipeline.commands.recipes import load_config
    from pipeline.run.runner import run_pipeline

    extra, protocols = list(extra or []), protocol.split(",")
    src = teacher(work, seed)
    run_dir = work / (f"{method}-ipc{ipc}-s{seed}" + ("" if augment == "auto" else f"-aug-{augment}")
                      + ("" if protocols == ["hard"] else "-" + "-".join(protocols))
                      + (f"-set-{_set_tag(extra)}" if extra else ""))
    if not run_dir.exists():
        shutil.copytree(src, run_dir)
    overrides = [*COMMON, f"seed={seed}", f"recover.method={method}", f"recover.ipc={ipc}",
                 f"recover.ipc_per_unit={min(ipc, 5)}", f"train.protocol={protocols[0]}", f"train.hard_epochs={epochs}",
                 f"experts.dir={work / 'experts'}",  # trajectory matching: every run shares the experts of its key
                 f"train.hard_augment={augment}", *extra]
    if len(protocols) > 1:
        overrides.append(f"eval.protocols=[{','.join(protocols)}]")
    t0 = time.time()
    print(f"{time.strftime('%H:%M:%S')} {run_dir.name}: recover, train ({', '.join(protocols)}), evaluate "
          f"(progress: {run_dir / 'logs'})", file=sys.stderr, flush=True)
    run_pipeline(load_config("demo", overrides=overrides), run_dir, progress=False)
    summary = json.loads((run_dir / "results" / "summary.json").read_text())
    recs = [json.loads(p.read_text()) for p in (run_dir / "manifests" / "recover").glob("c*.json")]
    top1 = {c["protocol"]: c["top1"] for c in summary.get("cells", []) if c.get("seed", 0) == 0}
    return [{"method": method, "ipc": ipc, "seed": seed, "top1": top1.get(p, summary["top1"]), "epochs": epochs,
             "recover_s": round(sum(r["metrics"].get("seconds", 0.0) for r in recs), 1),
             "wall_s": round(time.time() - t0, 1), "augmentation": summary["protocol"]["augmentation"],
             "hard_augment": augment, **({"set": sorted(extra)} if extra else {}),
             **({"protocol": p} if p != "hard" else {}),
             "device": next((r["metrics"].get("device") for r in recs), None)} for p in protocols]


def _aug(row: dict) -> str:
    """The row's variant: its hard augmentation (rows written before the option existed ran with auto), and its
    extra overrides (`--set`), if any."""
    aug = row.get("hard_augment", "auto") + (f", {row['protocol']}" if row.get("protocol", "hard") != "hard" else "")
    return aug if not row.get("set") else f"{aug}, set {' '.join(row['set'])}"


def table(rows: list[dict], methods: list[str], ipcs: list[int]) -> str:
    head = "| method | " + " | ".join(f"IPC {i} (here) | IPC {i} (DC paper)" for i in ipcs) + " | recover s (IPC " \
           + "/".join(map(str, ipcs)) + ") |"
    lines = [head, "|" + "---|" * (1 + 2 * len(ipcs) + 1)]
    variants = sorted({_aug(r) for r in rows}, key=lambda a: a != "auto")
    for m, aug in ((m, a) for m in methods for a in variants):
        mine = [r for r in rows if r["method"] == m and _aug(r) == aug and r["ipc"] in ipcs]
        if not mine and aug != "auto":
            continue
        cells, secs = [], []
        for i in ipcs:
            acc = [r["top1"] for r in mine if r["ipc"] == i]
            sec = [r["recover_s"] for r in mine if r["ipc"] == i]
            if len(acc) > 1:
                cells.append(f"{statistics.mean(acc):.1f} +- {statistics.stdev(acc):.1f} (n={len(acc)})")
            else:
                cells.append(f"{acc[0]:.1f} (n=1)" if acc else "-")
            ref = PAPER.get(m) if aug == "auto" else None
            cells.append(ref[(1, 10).index(i)] if ref and i in (1, 10) else "-")
            secs.append(f"{statistics.mean(sec):.0f}" if sec else "-")
        name = m if aug == "auto" else f"{m} ({aug})" if aug.startswith("auto,") else f"{m} (aug {aug})"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'/'.join(secs)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/sanity", help="folder of the teachers, runs and results.jsonl")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated recover methods")
    p.add_argument("--ipcs", default="1,10", help="comma-separated IPC values")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated run seeds")
    p.add_argument("--student-epochs", type=int, default=300, help="hard-protocol student epochs")
    p.add_argument("--hard-augment", default="auto", choices=("auto", "dsa", "none"),
                   help="train.hard_augment of the students (auto: DSA augmentation for DSA, DM, DataDAM sets only)")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="another config override for every run (repeatable), e.g. a method's published schedule "
                        "on a GPU: --set recover.dm.iterations=20000 --set recover.dm.batch_real=256; such runs get "
                        "their own run directories and table rows")
    p.add_argument("--protocol", default="hard",
                   help="student protocol(s), comma-separated: hard, own (the set's learned labels, DATM / PAD; "
                        "one-hot without), kd (the teacher's soft labels, as SRe2L, DWA and RDED evaluate); several "
                        "(e.g. kd,hard) = one recover, a student of each: a row each")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    p.add_argument("--report", action="store_true", help="only print the table of the results so far")
    args = p.parse_args(argv)
    if not args.protocol or any(x not in ("hard", "own", "kd") for x in args.protocol.split(",")):
        p.error(f"--protocol: hard, own, kd or a comma-separated list of them, got {args.protocol!r}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    methods, ipcs = args.methods.split(","), [int(i) for i in args.ipcs.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    results = work / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    done = {(r["method"], r["ipc"], r["seed"], r["epochs"], _aug(r)) for r in rows}
    variants = [_aug({"hard_augment": args.hard_augment, "set": sorted(args.extra), "protocol": p})
                for p in args.protocol.split(",")]
    for seed in [] if args.report else seeds:
        for ipc in ipcs:
            for m in methods:
                if all((m, ipc, seed, args.student_epochs, v) in done for v in variants):
                    continue
                for row in one_run(work, m, ipc, seed, args.student_epochs, args.hard_augment, args.extra,
                                   args.protocol):
                    print(json.dumps(row), flush=True)
                    with results.open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
                    rows.append(row)
    rows = [r for r in rows if r["epochs"] == args.student_epochs and r["seed"] in seeds]
    out = table(rows, methods, ipcs)
    print(out)
    if args.out:
        Path(args.out).write_text(out + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
