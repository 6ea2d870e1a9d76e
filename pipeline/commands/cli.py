"""The `distill` commands: run the pipeline, show a run's status, list recipes and methods, collect results,
export a distilled set.

The executable entry is `workers.cli` (console script `distill`): it composes these commands with the Ray
executor, so nothing under `pipeline` imports `workers`. Exit codes: 0 done, 2 usage or configuration error,
1 a stage failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pipeline.run.stages  # noqa: F401 - registers the built-in stages
from pipeline.commands.recipes import load_config
from pipeline.config import ConfigError, config_from_json, describe
from pipeline.run.graph import stage_order

# (config) -> an executor with run_units / launch_ddp / close (see pipeline.run.executors.Executor)
ExecutorFactory = Callable[[Any], Any]

EPILOG_RUN = """examples:
  distill run                                   # the demo recipe on the bundled digits, ./runs/demo
  distill run --recipe demo --set recover.method=sre2l --run-dir runs/sre2l
  distill run --recipe imagenet1k-rn18-ipc10-dwa --data-dir /data/imagenet --run-dir /shared/runs/in1k-dwa
  distill run --config my.yaml --stages ingest,squeeze

A rerun of the same --run-dir skips finished units and resumes checkpointed jobs.
Configuration keys (--set section.key=value, values parsed as YAML scalars):
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distill", description="Distill an image-classification data set into a few "
                                "synthetic or selected images per class (SRe2L, DWA and other methods: `distill methods`), resumably, on one "
                                "machine or a Ray cluster.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run (or resume) the pipeline", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=EPILOG_RUN + describe())
    src = r.add_mutually_exclusive_group()
    src.add_argument("--recipe", help="named recipe (default: demo); see `distill recipes`")
    src.add_argument("--config", help="YAML file with sections seed/data/squeeze/recover/relabel/train/eval/executor "
                     "(an optional top-level `recipe:` names the base)")
    r.add_argument("--run-dir", default=None, help="run directory (default: runs/<recipe>)")
    r.add_argument("--data-dir", default=None, help="the real data: a folder of train/<class>/* and "
                   "val/<class>/*, an ILSVRC / Kaggle ImageNet download, WebDataset *.tar shards or Hugging Face "
                   "*.parquet files (data.format=auto detects which); default: the recipe's data.source (demo = "
                   "bundled digits)")
    r.add_argument("--stages", default=None, help=f"comma-separated subset of {','.join(stage_order())} "
                   "(default: all; they run in this order)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable")
    r.add_argument("--fresh", action="store_true", help="discard the results of stages whose configuration changed "
                   "and recompute them (otherwise such a rerun is refused)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")

    s = sub.add_parser("status", help="per stage: units done / failed / pending and config hash state")
    s.add_argument("--run-dir", required=True)

    rp = sub.add_parser("recipes", help="list the named recipes, or show one with its differences from the "
                        "official code")
    rp.add_argument("name", nargs="?", help="a recipe name: print its description and every setting that differs "
                    "from the official code")

    m = sub.add_parser("methods", help="list the recover methods: what each does and needs, and its config keys")
    m.add_argument("name", nargs="?", help="show only this method")

    c = sub.add_parser("collect", help="results table from the manifests of one or many runs")
    c.add_argument("runs", nargs="+", help="run directories or glob patterns")
    c.add_argument("--out", default=None, help="write the table to .md, .csv or .parquet (plus PNG plots beside it)")

    e = sub.add_parser("export", help="write a run's distilled set as class folders of PNGs, its soft labels, its "
                       "config, a data-set card and SHA256SUMS (read back with recover.method=import)")
    e.add_argument("run_dir", help="the run directory (its recover stage must be complete)")
    e.add_argument("--out", required=True, help="the folder to write (must not exist or be empty)")
    e.add_argument("--force", action="store_true",
                   help="replace --out when it holds a previous export (nothing else is ever replaced)")

    b = sub.add_parser("bench", help="throughput of recover (every method), relabel, student training and the "
                       "loaders against a plain fp32 eager baseline, with ratios and peak memory",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    from pipeline.commands.bench import parser as bench_parser

    bench_parser(b)
    return p


def _cmd_run(args: argparse.Namespace, make_executor: ExecutorFactory | None = None) -> int:
    from pipeline.run.runner import run_pipeline

    overrides = list(args.overrides)
    if args.data_dir:
        overrides.insert(0, f"data.source={args.data_dir}")
    cfg = load_config(args.recipe, args.config, overrides)
    run_dir = Path(args.run_dir or f"runs/{args.recipe or (Path(args.config).stem if args.config else 'demo')}")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    executor = make_executor(cfg) if make_executor is not None else None
    try:
        ctx = run_pipeline(cfg, run_dir, stages=stages, fresh=args.fresh, executor=executor,
                           progress=not args.no_progress)
    finally:
        if executor is not None:
            executor.close()
    print(f"run directory: {ctx.run_dir.resolve()}")
    summary = ctx.path("results", "summary.json")
    if summary.exists():
        from pipeline.commands.report import format_summary

        print(format_summary(json.loads(summary.read_text())))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from pipeline.run.runner import status

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.json").exists():
        raise ConfigError(f"{run_dir} is not a run directory (no config.json)")
    try:
        cfg = config_from_json(run_dir / "config.json")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{run_dir / 'config.json'} is corrupt ({exc}); restore it, or delete it and run "
                          "`distill run` on the directory again to write it") from None
    rows = status(cfg, run_dir)
    print(f"{'stage':<10}{'done':>6}{'failed':>8}{'pending':>9}  {'config':<9} state")
    for st in rows:
        pending = "?" if st.pending is None else str(st.pending)
        state = "complete" if st.complete else ("running/partial" if st.done else "not started")
        state = f"damaged ({st.damaged} record(s))" if st.damaged else state
        note = f"  ({'; '.join(st.notes)})" if st.notes else ""
        print(f"{st.name:<10}{st.done:>6}{st.failed:>8}{pending:>9}  {st.hash_state:<9} {state}{note}")
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    import inspect
    import textwrap

    from pipeline.commands.recipes import RECIPES, describe_recipes, recipe_differences

    if args.name:
        diffs = recipe_differences(args.name)
        print(inspect.cleandoc(RECIPES[args.name].__doc__ or "").split("\n\nDifferences")[0])
        if diffs:
            print("\nDifferences from the official code:")
            for item in diffs:
                print(textwrap.fill(item, 100, initial_indent="  - ", subsequent_indent="    "))
        return 0
    for name, doc in describe_recipes():
        print(f"{name:<34} {doc}")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    import textwrap

    from pipeline.methods import get_method, registry

    try:
        methods = [get_method(args.name)] if args.name else sorted(registry().values(), key=lambda m: m.name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for m in methods:
        kind = ("makes every class in one unit" if m.all_classes else
                "makes all IPC images of a class together" if m.whole_class else "units split classes and IPC")
        print(f"{m.name}: {m.description}")
        print(f"  needs: {m.needs.describe()}; default init: {m.default_init}; {kind}")
        if m.selection:
            print(f"  its picks can start other methods: recover.init=real-{m.name}")
        fields = m.config_fields()
        if fields:
            print(f"  keys (recover.{m.config_key}.*):")
            for key, default, doc in fields:
                print(f"    {key} = {default!r}  # {doc}")
        else:
            print("  keys: none of its own")
        if m.differences:
            print("  differences from the official code:")
            for item in m.differences:
                print(textwrap.fill(item, 100, initial_indent="    - ", subsequent_indent="      "))
        print()
    print("Shared keys: recover.method, recover.ipc, recover.init, recover.classes_per_shard, recover.ipc_per_unit, "
          "recover.amp, recover.channels_last (see `distill run --help`).")
    return 0


def _cmd_collect(args: argparse.Namespace) -> int:
    from manifests.collect import collect_main

    return collect_main(args.runs, args.out)


def _cmd_bench(args: argparse.Namespace) -> int:
    from pipeline.commands.bench import run_bench

    run_bench(args)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from pipeline.commands.export import export_run

    out = export_run(args.run_dir, args.out, force=args.force)
    print(f"exported {args.run_dir} to {out} (check: cd {out} && sha256sum -c SHA256SUMS)")
    return 0


def main(argv: list[str] | None = None, make_executor: ExecutorFactory | None = None) -> int:
    """The `distill` commands. `make_executor(cfg)` builds the executor of `run` (the composition root,
    `workers.cli`, passes the one that picks Ray or in-process); without it, units run in this process."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from manifests.store import ManifestError
    from pipeline.run.runner import StageFailed

    handlers = {"run": _cmd_run, "status": _cmd_status, "recipes": _cmd_recipes, "methods": _cmd_methods,
                "collect": _cmd_collect, "export": _cmd_export, "bench": _cmd_bench}
    try:
        if args.command == "run":
            return _cmd_run(args, make_executor)
        return handlers[args.command](args)
    except (ConfigError, ManifestError) as exc:
        print(f"distill: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system refused (read-only, not a directory, disk full): path and cause
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"distill: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except StageFailed as exc:
        print(f"distill: stage failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("distill: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # The runnable entry is `distill` / `python -m workers.cli`, which adds the Ray executor; running this
    # module directly could silently run a Ray configuration in one process.
    print("distill: run `distill ...` or `python -m workers.cli ...` (this module is the command library)",
          file=sys.stderr)
    sys.exit(2)
