"""`distill export RUN_DIR --out DIR`: a run's distilled set as files others can reuse.

DIR gets:

- `images/<class name>/<image key>.png`: the recover stage's images, the PNG bytes stored in its shards
  (nothing re-encoded), in image-id order; `recover.method=import` with `recover.import_set.path=DIR/images`
  reads them back to the same shard bytes;
- `soft_labels/*.parquet`: the relabel stage's files, when the run stored soft labels;
- `labels/`: what the method learned with the set, when it did (pad): `<unit>.labels.npy`, one float32 label
  vector (logits) per image in image-id order, and `set_values.json` (e.g. the learned step size `syn_lr`);
- `classes.txt`: `<class id>\t<name>` per class, where the data had human-readable names (a names file ingest
  reads back);
- `config.json`: the run's resolved configuration;
- `README.md`: a data-set card, YAML front matter (data set, method, IPC, classes, resolution, teacher,
  protocols, the cells' accuracies, the fairness metrics) and a short text;
- `SHA256SUMS`: the sha256 of every other file, in `sha256sum -c` format.

The run's recover (and relabel) files are verified against their records first. The export is built in a
temporary folder beside DIR and renamed at the end, so a crash leaves nothing that looks complete.

What is refused before anything is written or deleted: an `--out` that is the run directory, lies inside it or
holds it (`--out` = the run's parent folder once deleted the run and its siblings); and, even with `--force`, a
non-empty `--out` that is not a previous export (`is_export`: only the files an export writes, and its
`SHA256SUMS` naming `config.json` and `README.md`). `--force` replaces only a previous export.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from manifests.store import STAGE_RECORD, ManifestStore
from pipeline.core.errors import ConfigError


def _yaml_scalar(value: Any) -> str:
    return json.dumps(value)  # JSON scalars are valid YAML


def card(summary: dict[str, Any] | None, cfg: dict[str, Any], num_images: int) -> str:
    """The data-set card: YAML front matter and a few lines of text."""
    rec, data = cfg.get("recover", {}), cfg.get("data", {})
    s = summary or {}
    front = {
        "dataset": data.get("dataset"), "method": rec.get("method"), "ipc": rec.get("ipc"),
        "num_classes": s.get("num_classes"), "num_images": num_images, "resolution": data.get("resolution"),
        "teacher": cfg.get("squeeze", {}).get("arch"), "teacher_top1": s.get("teacher_top1"),
        "seed": cfg.get("seed"), "run_id": cfg.get("run_id"),
    }
    lines = ["---"] + [f"{k}: {_yaml_scalar(v)}" for k, v in front.items()]
    protocols = s.get("protocols") or ({s["protocol"]["name"]: s["protocol"]} if isinstance(s.get("protocol"), dict)
                                       else {})
    if protocols:
        lines.append("protocols:")
        for name, p in protocols.items():
            lines.append(f"  {name}:")
            lines += [f"    {k}: {_yaml_scalar(v)}" for k, v in p.items()]
    cells = s.get("cells") or ([{"protocol": (s.get("protocol") or {}).get("name", "kd"), "student": s.get("student"),
                                 "seed": 0, "top1": s.get("top1"), "top5": s.get("top5")}] if "top1" in s else [])
    if cells:
        lines.append("accuracies:  # val top-1 / top-5 (percent) of the final epoch, per matrix cell")
        for c in cells:
            lines.append(f"  - {{protocol: {c.get('protocol')}, student: {c.get('student')}, seed: {c.get('seed')}, "
                         f"top1: {_yaml_scalar(c.get('top1'))}, top5: {_yaml_scalar(c.get('top5'))}}}")
    if s.get("fairness"):
        lines.append("fairness:  # fractions: IOR vs random-real, HLR vs full real (hard), LRS")
        for f in s["fairness"]:
            lines.append("  - {" + ", ".join(f"{k}: {_yaml_scalar(f.get(k))}" for k in (
                "protocol", "student", "ior", "hlr", "lrs")) + "}")
    lines.append("---")
    name = f"{front['dataset']} distilled by {front['method']}, {front['ipc']} images per class"
    lines += ["", f"# {name}", "",
              f"{num_images} images in `images/<class>/`, made by `distill` (run {front['run_id']}).",
              "Soft labels, when stored, are in `soft_labels/` (fp16 top-k logits and log-partition per view)."
              if s.get("soft_label_bytes") else "No stored soft labels (hard labels, or online relabelling).",
              "Labels the method learned with the set (logits, one row per image in image-id order) and values "
              "such as its learned step size are in `labels/`." if s.get("learned_labels") else "",
              "" if cells else "No accuracies: the run has not been evaluated.",
              "Check the files with `sha256sum -c SHA256SUMS`; evaluate them elsewhere with "
              "`distill run --set recover.method=import --set recover.import_set.path=<this folder>/images`.", ""]
    return "\n".join(lines)


EXPORT_ENTRIES = frozenset({"images", "soft_labels", "labels", "classes.txt", "config.json", "README.md",
                            "SHA256SUMS"})


def is_export(folder: Path) -> bool:
    """Whether `folder` holds a previous export and nothing else: only the entries an export writes, its
    SHA256SUMS listing config.json and README.md."""
    try:
        entries = {p.name for p in folder.iterdir()}
        sums = (folder / "SHA256SUMS").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    listed = {line.split("  ", 1)[1] for line in sums.splitlines() if "  " in line}
    return entries <= EXPORT_ENTRIES and {"config.json", "README.md"} <= listed


def check_out(run_dir: Path, out: Path, force: bool) -> None:
    """Refuse (ConfigError, before anything is written) an `out` that overlaps the run directory, or a non-empty
    `out` that `--force` may not replace."""
    run, dst = run_dir.resolve(), out.resolve()
    if dst == run or run in dst.parents:
        raise ConfigError(f"--out {out} is {'the run directory' if dst == run else 'inside the run directory'} "
                          f"{run_dir}; export to a folder outside it")
    if dst in run.parents:
        raise ConfigError(f"--out {out} holds the run directory {run_dir}: replacing it would delete the run; "
                          "export to a new folder outside it")
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out} is a file; choose a folder")
    if not is_export(out):
        raise ConfigError(f"--out {out} is not empty and is not a previous export (which holds only images/, "
                          "soft_labels/, config.json, README.md and SHA256SUMS): choose a new folder; --force "
                          "replaces only a previous export")
    if not force:
        raise ConfigError(f"--out {out} holds a previous export; choose a new folder or pass --force to replace it")


def export_run(run_dir: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write the export of `run_dir` to `out` (see the module doc); ConfigError for what a user must fix."""
    from manifests.verify import verify_outputs
    from pipeline.data.classmap import read_class_map
    from pipeline.data.shards import IndexedImages, read_index
    from pipeline.data.synthetic import LABELS_SUFFIX, SYNTHETIC_DIR, set_values, synthetic_index_paths

    run_dir, out = Path(run_dir), Path(out)
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{run_dir} is not a run directory (config.json: {exc})") from None
    check_out(run_dir, out, force)
    store = ManifestStore(run_dir)
    stage = store.load("recover", STAGE_RECORD)
    if stage is None:
        raise ConfigError(f"{run_dir}: the recover stage has not completed; run `distill run --run-dir {run_dir}` "
                          "first")
    recover = [r for r in store.records("recover") if r.config_hash == stage.config_hash]
    relabel_stage = store.load("relabel", STAGE_RECORD)
    relabel = [r for r in store.records("relabel") if relabel_stage is not None
               and r.config_hash == relabel_stage.config_hash]
    problems = verify_outputs(run_dir, {"recover": recover, "relabel": relabel})
    if problems:
        raise ConfigError(f"{run_dir}: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1
                                                          else "") + "; rerun `distill run` to repair it")
    class_map = read_class_map(run_dir / "real")
    names = class_map["classes"]
    index = read_index(synthetic_index_paths(run_dir, recover))
    images = IndexedImages(run_dir / SYNTHETIC_DIR, index)
    keys = images.keys
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for i in range(len(images)):
            folder = tmp / "images" / names[int(images.cls[i])]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{keys[i]}.png").write_bytes(images.raw(i))
        for rec in relabel:
            for o in rec.outputs:
                dst = tmp / "soft_labels" / Path(o.uri).name
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(run_dir / o.uri, dst)
        for o in (o for r in recover for o in r.outputs if o.uri.endswith(LABELS_SUFFIX)):
            (tmp / "labels").mkdir(exist_ok=True)
            shutil.copyfile(run_dir / o.uri, tmp / "labels" / Path(o.uri).name)
        learned = set_values(recover)
        if learned:
            (tmp / "labels").mkdir(exist_ok=True)
            (tmp / "labels" / "set_values.json").write_text(json.dumps(learned, indent=1, sort_keys=True) + "\n")
        if class_map.get("class_names"):  # `<id>\t<name>` per class: the names file ingest reads
            (tmp / "classes.txt").write_text("".join(f"{i}\t{n}\n" for i, n in zip(names, class_map["class_names"],
                                                                                   strict=True)))
        shutil.copyfile(run_dir / "config.json", tmp / "config.json")
        summary_path = run_dir / "results" / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
        (tmp / "README.md").write_text(card(summary, cfg, len(images)))
        sums = []
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            sums.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.relative_to(tmp).as_posix()}")
        (tmp / "SHA256SUMS").write_text("\n".join(sums) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
