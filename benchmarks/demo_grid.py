"""Method x IPC x seed grid on the digits demo under one protocol, then the results table.

All runs share one teacher (trained once, then imported with squeeze.weights), as the papers do
with a fixed pretrained teacher. Run directories go under --out; the table is printed and written
to --out/results.md (+ .png).

    python benchmarks/demo_grid.py --out runs/grid --ipcs 1,10,50 --methods sre2l,dwa,random-real --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path


def distill(*args: str) -> None:
    cmd = [sys.executable, "-m", "workers.cli", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/grid")
    p.add_argument("--ipcs", default="1,10,50")
    p.add_argument("--methods", default="sre2l,dwa,random-real")
    p.add_argument("--seeds", default="0")
    p.add_argument("--set", dest="extra", action="append", default=[], help="extra overrides for every run")
    a = p.parse_args()
    out = Path(a.out)
    teacher_run = out / "teacher"
    distill("run", "--recipe", "demo", "--run-dir", str(teacher_run), "--stages", "ingest,squeeze", "--no-progress")
    teacher = (teacher_run / "checkpoints" / "teacher.pt").resolve()
    for seed in a.seeds.split(","):
        for ipc in a.ipcs.split(","):
            for method in a.methods.split(","):
                t0 = time.time()
                extra = [f"--set={x}" for x in a.extra]
                distill("run", "--recipe", "demo", "--run-dir", str(out / f"{method}-ipc{ipc}-s{seed}"), "--no-progress",
                        f"--set=seed={seed}", f"--set=recover.ipc={ipc}", f"--set=recover.method={method}",
                        f"--set=squeeze.weights={teacher}", "--set=eval.protocols=[]", "--set=eval.baselines=[]",
                        *extra)  # the grid has its own random-real column; one kd student per run
                print(f"done {method} ipc {ipc} seed {seed} in {time.time() - t0:.0f}s", flush=True)
    subprocess.run([sys.executable, "-m", "workers.cli", "collect", str(out), "--out", str(out / "results.md")])


if __name__ == "__main__":
    main()
