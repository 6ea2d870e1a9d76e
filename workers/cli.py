"""The `distill` executable: the composition root that gives the pipeline's commands the Ray executor.

`pipeline` never imports `workers`; this module joins them: `distill run` gets `workers.make_executor`
(Ray actors inside a Ray job, with `executor.kind=ray` or an `executor.address`; in-process otherwise).
Run as `distill ...` or `python -m workers.cli ...` (what `ray job submit` runs on a cluster).
"""

from __future__ import annotations

import sys

from pipeline.commands.cli import main as _main
from workers import make_executor


def main(argv: list[str] | None = None) -> int:
    return _main(argv, make_executor=make_executor)


if __name__ == "__main__":
    sys.exit(main())
