"""Run a run directory's DDP job (teacher or student training) under torchrun.

    torchrun --nproc_per_node 8 -m pipeline.torchrun --run-dir RUN --job squeeze
    torchrun --nproc_per_node 8 -m pipeline.torchrun --run-dir RUN --job train

The job function and its spec (`TeacherJob` / `StudentJob`, built by the stage from the run directory's
resolved config) are the ones the pipeline itself hands to its executor's `launch_ddp` (Ray Train or local
processes). The run directory must have the job's upstream stages done; the job trains with a checkpoint
per epoch and writes the final weights. A following `distill run` on the same run directory
finds the last epoch's checkpoint, skips the training, evaluates and commits the stage's record.

Each rank dies with the torchrun agent that started it (`pipeline.train.ddp.die_with_parent`, Linux): a SIGKILLed
agent leaves no rank training and writing checkpoints behind.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pipeline.config import config_from_json
from pipeline.run.runner import open_context
from pipeline.train import ddp

_LAUNCHER = os.getppid()  # read as early as possible: the agent that started this rank


def main(argv: list[str] | None = None) -> int:
    if "LOCAL_RANK" in os.environ:  # started by torchrun (or another launcher that sets it)
        ddp.die_with_parent(_LAUNCHER)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--job", choices=("squeeze", "train"), required=True)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if ddp.dist_info()[0] == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_dir = Path(a.run_dir)
    ctx = open_context(config_from_json(run_dir / "config.json"), run_dir)
    if a.job == "squeeze":
        from pipeline.run.stages.squeeze import teacher_job
        from pipeline.train.trainloop import train_teacher

        result = train_teacher(teacher_job(ctx))
    else:
        from pipeline.run.stages.train import student_job
        from pipeline.train.student import train_student

        result = train_student(student_job(ctx))
    if ddp.is_rank0():
        print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
