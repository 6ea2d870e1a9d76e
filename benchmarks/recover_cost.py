"""Recover seconds per image of every method with a `distill bench` row, at 32 px and 224 px on this CPU, and
ImageNet-1K projections (CPU core-hours from these figures; GPU-hours from the measured H200 figures).

    python benchmarks/recover_cost.py --json-dir runs/recover-cost          # runs two benches (~12 min, 2 cores)
    python benchmarks/recover_cost.py --json-dir runs/recover-cost --only matching224   # DM, DataDAM, DC, DSA at 224 px
    python benchmarks/recover_cost.py --from runs/recover-cost              # only the table, from their JSON

The `distill bench` runs (one torch thread, what a recover unit uses; the rows' `optimized` side, i.e. the
pipeline's CPU defaults):

- 32 px: `distill bench --what recover` (ConvNet, 10 classes, batch 10, 20 iterations x 3 rounds; the SRe2L and
  DWA rows compiled; RDED 300 candidates x 5 crops for IPC 10: 150 teacher forwards per image, as its scripts);
- 224 px: `--methods sre2l,dwa,cda,rded --model resnet18 --resolution 224 --classes 1000 --iterations 5
  --merge 0 --no-compile --rded-candidates 30 --rded-ipc 1` (eager: compiling ResNet-18 on a CPU costs minutes;
  RDED 30 x 5 crops for IPC 1 is again 150 forwards per image, 4 patches of 112 px each);
- 224 px matching, only on request (`--only matching224`): `--methods dm,datadam,dc,dsa --resolution 224 --classes
  2 --iterations 10 --rounds 1` (ConvNet-3 at 224 px, one DM / DataDAM iteration or one DC / DSA outer step of both
  classes per call; 2 classes, as their cost is per class: with 10, DM's resident memory reached 17 GB and
  DataDAM's passed the 23 GB of the machine; with 2, the run peaks at about 7 GB, ~4 min).

Seconds per image = the method's official iterations per image / its image-iterations per second (SRe2L 1000 at
32 px as its CIFAR script, 4000 at 224 as its ImageNet one; CDA SRe2L's rate times the ratio of its own row, CDA's
schedule against the fixed crop in the same run, at SRe2L's iterations; DWA 1000 / 2000
plus its K ascent steps per batch, taken from its row: the call's time less its iterations at SRe2L's rate;
DM 20,000, DataDAM 8,000, DC / DSA 1000 outer steps at IPC 1); RDED's is 1 / its images per second at 150 teacher
forwards per image, and since it scores 300 x 5 crops per class whatever the IPC, its ImageNet-1K cost is 1000
classes x 10 such images at IPC 10 and at IPC 50 alike. All are projections from a few timed iterations: no method
was run to its full schedule.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BENCHES = {
    "recover32": ["--what", "recover"],
    "recover224": ["--what", "recover", "--methods", "sre2l,dwa,cda,rded", "--model", "resnet18", "--resolution",
                   "224", "--classes", "1000", "--iterations", "5", "--merge", "0", "--no-compile",
                   "--rded-candidates", "30", "--rded-ipc", "1"],
    "matching224": ["--what", "recover", "--methods", "dm,datadam,dc,dsa", "--resolution", "224", "--classes", "2",
                    "--iterations", "10", "--rounds", "1"],
}
ITERATIONS = {32: {"sre2l": 1000, "cda": 1000, "dwa": 1000, "dm": 20000, "datadam": 8000, "dc": 1000, "dsa": 1000},
              224: {"sre2l": 4000, "cda": 4000, "dwa": 2000, "dm": 20000, "datadam": 8000, "dc": 1000, "dsa": 1000}}
# A matching method's cost per image at IPC 1 does not carry to IPC 10 / 50 (its real batch per class and iteration
# is shared by the class's images; DC / DSA change their loops with the IPC), so it gets no ImageNet projection.
MATCHING = {"dm", "datadam", "dc", "dsa"}
# Measured on one NVIDIA H200 (docs/benchmarks.md, "GPU figures"; RDED: the rded worker over decoded JPEGs with one
# worker, issue 25): SRe2L 14,912 image-iterations/s at its GPU defaults; DWA 10,160 plus 0.185 s of ascent per
# batch of 100; RDED 1.10 s per class at IPC 10 and 1.16 s at IPC 50 (75 % of it JPEG decode on one thread).
GPU_HOURS = {
    "sre2l": lambda ipc: 1000 * ipc * 4000 / 14912 / 3600,
    "cda": lambda ipc: 1000 * ipc * 4000 / 14912 / 3600,
    "dwa": lambda ipc: (1000 * ipc * 2000 / 10160 + 10 * ipc * 0.185) / 3600,
    "rded": lambda ipc: 1000 * (1.10 if ipc <= 10 else 1.16) / 3600,
}
ORDER = ("sre2l", "cda", "dwa", "rded", "dm", "datadam", "dc", "dsa")


def seconds_per_image(rows: list[dict], resolution: int, batch: int, iterations: int) -> dict[str, float]:
    """Method -> recover seconds per image at its official schedule, from the rows of one `distill bench` run
    (`batch` and `iterations` are that run's --batch and --iterations: those of `BENCHES` for `--from`)."""
    by = {r["what"].removeprefix("recover/"): r for r in rows if r["what"].startswith("recover/")}
    out: dict[str, float] = {}
    for name, its in ITERATIONS[resolution].items():
        row = by.get("sre2l-cda" if name == "cda" else name)
        if row is None:
            continue
        if name == "cda" and "sre2l" in by:  # SRe2L's rate times the schedule's ratio in its own row
            out[name] = its / (by["sre2l"]["optimized"] * row["ratio"])
            continue
        if name == "dwa" and "sre2l" in by:  # its K ascent steps per batch, apart from its iterations
            per_it = batch / by["sre2l"]["optimized"]  # seconds per batch-iteration
            call = batch * iterations / row["optimized"]
            ascent = max(0.0, call - iterations * per_it)
            out[name] = (its * per_it + ascent) / batch
            continue
        out[name] = its / row["optimized"]
    if "rded" in by:
        out["rded"] = 1.0 / by["rded"]["optimized"]
    return out


def table(results: dict[str, list[dict]]) -> str:
    s32 = seconds_per_image(results.get("recover32", []), 32, 10, 20)
    s224 = {**seconds_per_image(results.get("recover224", []), 224, 10, 5),
            **seconds_per_image(results.get("matching224", []), 224, 10, 10)}
    lines = ["| method | s / image, 32 px | s / image, 224 px | IN-1K IPC 10, CPU core-h (proj.) | IPC 50 | "
             "IN-1K IPC 10, H200 GPU-h (proj.) | IPC 50 |", "|---|---:|---:|---:|---:|---:|---:|"]

    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for m in ORDER:
        a, b = s32.get(m), s224.get(m)
        # RDED's work is per class (300 x 5 crops scored for any IPC): 10 images' worth at 150 forwards each
        core = [None if b is None or m in MATCHING else b * 1000 * (10 if m == "rded" else ipc) / 3600
                for ipc in (10, 50)]
        gpu = [GPU_HOURS[m](ipc) if m in GPU_HOURS else None for ipc in (10, 50)]
        lines.append(f"| {m} | {fmt(a, ',.1f')} | {fmt(b, ',.1f')} | {fmt(core[0], ',.0f')} | {fmt(core[1], ',.0f')} "
                     f"| {fmt(gpu[0], '.2f')} | {fmt(gpu[1], '.2f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json-dir", type=Path, help="run the benches and keep their rows here")
    p.add_argument("--from", dest="src", type=Path, help="read <name>.json rows written by an earlier --json-dir")
    p.add_argument("--only", default="recover32,recover224", help=f"benches to run, of {','.join(BENCHES)}")
    a = p.parse_args(argv)
    results: dict[str, list[dict]] = {}
    if a.src:
        results = {n: json.loads((a.src / f"{n}.json").read_text()) for n in BENCHES if (a.src / f"{n}.json").exists()}
    else:
        from pipeline.commands.bench import parser, run_bench

        out = a.json_dir or Path(".")
        out.mkdir(parents=True, exist_ok=True)
        for name in [n for n in a.only.split(",") if n]:
            run_bench(parser().parse_args([*BENCHES[name], "--json", str(out / f"{name}.json")]))
            results[name] = json.loads((out / f"{name}.json").read_text())
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
