"""Ingest: real images -> WebDataset shards + DALI .idx + parquet sample index + class map."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from manifests.schema import FileRef
from manifests.store import atomic_write_text
from pipeline.core.errors import ConfigError
from pipeline.core.seeding import derive_seed
from pipeline.data import demo
from pipeline.data.classmap import REAL_DIR, class_map_path, write_class_map
from pipeline.data.images import SOURCE_IMAGE_SUFFIXES, check_name, class_folders, to_rgb
from pipeline.data.shards import Sample, shard_name, write_shard
from pipeline.run.base import RunContext, Stage, Unit, UnitResult
from pipeline.run.graph import register_stage

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
SOURCE_FILE = "source.json"  # RUN_DIR/real/source.json: the fingerprint of the data folder that was ingested


class BadImage(Exception):
    pass


def list_folder(root: Path) -> tuple[list[str], dict[str, list[tuple[str, int]]], int]:
    """Classes (sorted folder names, as torchvision's ImageFolder) and (path, class) per split."""
    classes, items, skipped, _ = scan_folder(root)
    return classes, items, skipped


def scan_folder(root: Path) -> tuple[list[str], dict[str, list[tuple[str, int]]], int, dict[str, Any]]:
    """`list_folder` plus the folder's fingerprint: per split and class the number of images, their bytes and
    a sha256 of their (name, size, mtime) list, and a sha256 over all of it (see `fingerprint_changes`)."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"data folder not found: {root}")
    split_classes: dict[str, list[str]] = {}
    for split in SPLITS:
        d = root / split
        if not d.is_dir():
            raise ConfigError(f"{d} is missing: the data folder needs train/<class>/* and val/<class>/*")
        split_classes[split] = class_folders(d)  # torchvision's rule; dot-named folders get a warning
        if not split_classes[split]:
            raise ConfigError(f"{d} holds no class folders")
    if split_classes["train"] != split_classes["val"]:
        only_t = sorted(set(split_classes["train"]) - set(split_classes["val"]))
        only_v = sorted(set(split_classes["val"]) - set(split_classes["train"]))
        raise ConfigError(
            f"train and val class folders differ under {root}: only in train: {only_t[:5]}, only in val: "
            f"{only_v[:5]}; both splits need the same class folders"
        )
    classes = split_classes["train"]
    items: dict[str, list[tuple[str, int]]] = {}
    per_class: dict[str, dict[str, dict[str, Any]]] = {}
    skipped = 0
    nested: list[str] = []  # sub-folders of class folders: torchvision's ImageFolder reads images in them, we do not
    for split in SPLITS:
        items[split], per_class[split] = [], {}
        for ci, name in enumerate(classes):
            folder = root / split / name
            with os.scandir(folder) as it:
                entries = list(it)
            nested += [f"{split}/{name}/{e.name}" for e in entries if e.is_dir() and not e.name.startswith(".")]
            files = sorted((e for e in entries if e.is_file() and not e.name.startswith(".")), key=lambda e: e.name)
            for e in files:
                check_name(folder, e.name)
            images = [e for e in files if Path(e.name).suffix.lower() in SOURCE_IMAGE_SUFFIXES]
            skipped += len(files) - len(images)
            if not images:
                raise ConfigError(f"class folder {folder} holds no images; remove it from both splits or add images")
            items[split].extend((str(folder / e.name), ci) for e in images)
            stats = [(e.name, e.stat()) for e in images]
            listing = "".join(f"{n}\t{st.st_size}\t{st.st_mtime_ns}\n" for n, st in stats)
            per_class[split][name] = {"files": len(images), "bytes": sum(st.st_size for _, st in stats),
                                      "sha256": hashlib.sha256(listing.encode()).hexdigest()}
    if nested:
        log.warning("%s: %d sub-folder(s) of class folders are not read (%s%s): only the files directly in a class "
                    "folder are its images (torchvision's ImageFolder would also read the sub-folders' images); "
                    "move their images up into the class folder to use them", root, len(nested),
                    ", ".join(nested[:3]), ", ..." if len(nested) > 3 else "")
    fingerprint = {"source": str(root.resolve()), "classes": classes, "splits": per_class,
                   "files": sum(c["files"] for sp in per_class.values() for c in sp.values()),
                   "bytes": sum(c["bytes"] for sp in per_class.values() for c in sp.values())}
    fingerprint["sha256"] = hashlib.sha256(json.dumps([classes, per_class], sort_keys=True).encode()).hexdigest()
    return classes, items, skipped, fingerprint


def demo_fingerprint() -> dict[str, Any]:
    """The bundled digits' fingerprint: a sha256 of the arrays the demo images are rendered from."""
    images, labels = demo.load_digits_arrays()
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    return {"source": "demo", "classes": demo.CLASSES, "files": len(labels), "bytes": images.nbytes + labels.nbytes,
            "sha256": digest}


def fingerprint_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two folder fingerprints, one phrase per change ("class 'x' added",
    "3 files added in class '2' (train)"); empty when they are the same."""
    if old.get("sha256") == new.get("sha256"):
        return []
    before, after = old.get("classes", []), new.get("classes", [])
    out = [f"class '{c}' added" for c in after if c not in before]
    out += [f"class '{c}' removed" for c in before if c not in after]
    for split in SPLITS:
        for c in (c for c in after if c in before):
            o, n = old.get("splits", {}).get(split, {}).get(c), new["splits"][split][c]
            if o == n:
                continue
            where = f"in class '{c}' ({split})"
            d = n["files"] - (o or {}).get("files", 0)
            if d:
                out.append(f"{abs(d)} file{'s' if abs(d) != 1 else ''} {'added' if d > 0 else 'removed'} {where}")
            else:
                out.append(f"files changed {where} (names, sizes or modification times)")
    return out or ["its listing changed"]


def encode_checked(data: bytes, source: str) -> tuple[bytes, str]:
    """Verify an image decodes; keep RGB/grey JPEG bytes as they are, re-encode anything else as PNG."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            if fmt == "JPEG":
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))  # fast full-stream check
            img.load()
            if fmt == "JPEG" and img.mode in ("RGB", "L"):
                return data, "jpg"
            img = Image.open(io.BytesIO(data))
            img.load()
            rgb = to_rgb(img)  # 16-bit images scaled to 8 bits, not clipped
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise BadImage(f"{source}: {type(exc).__name__}: {exc}") from None
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return buf.getvalue(), "png"


class IngestStage(Stage):
    name = "ingest"
    sections = ("data",)
    distributed = True
    output_dirs = (REAL_DIR,)

    def validate(self, ctx: RunContext) -> None:
        """Check the folder (ConfigError naming the path) and record its fingerprint in real/source.json."""
        src = ctx.config.data.source
        fingerprint = demo_fingerprint() if src == "demo" else scan_folder(Path(src))[3]
        path = ctx.path(REAL_DIR, SOURCE_FILE)
        text = json.dumps(fingerprint, indent=1, sort_keys=True)
        if not path.is_file() or path.read_text() != text:
            atomic_write_text(path, text)

    def input_changes(self, ctx: RunContext) -> list[str]:
        """How the data folder differs from the one ingested (real/source.json); nothing for the demo data
        or before the first ingest."""
        path = ctx.path(REAL_DIR, SOURCE_FILE)
        if ctx.config.data.source == "demo" or not path.is_file():
            return []
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            return [f"its recorded fingerprint {path} cannot be read ({exc})"]
        new = scan_folder(Path(ctx.config.data.source))[3]
        changes = fingerprint_changes(old, new)
        return [f"data folder {new['source']}: {changes[0]}", *changes[1:]] if changes else []

    def stage_files(self, ctx: RunContext) -> list[Path]:
        return [class_map_path(ctx.path(REAL_DIR)), ctx.path(REAL_DIR, SOURCE_FILE)]

    def _listing(self, ctx: RunContext) -> tuple[list[str], dict[str, list[tuple[Any, int]]], int]:
        cfg = ctx.config.data
        if cfg.source == "demo":
            _, labels = demo.load_digits_arrays()
            split = demo.split_indices(labels, cfg.val_fraction, cfg.shuffle_seed)
            return demo.CLASSES, {s: [(i, int(labels[i])) for i in split[s]] for s in SPLITS}, 0
        return list_folder(Path(cfg.source))

    def plan(self, ctx: RunContext) -> list[Unit]:
        cfg = ctx.config.data
        import numpy as np

        _, items, _ = self._listing(ctx)
        units = []
        for split in SPLITS:
            seq = items[split]
            order = np.random.default_rng(derive_seed(cfg.shuffle_seed, "ingest", split)).permutation(len(seq))
            for start in range(0, len(seq), cfg.shard_size):
                chunk = [list(seq[j]) for j in order[start:start + cfg.shard_size].tolist()]
                index = start // cfg.shard_size
                units.append(Unit(key=shard_name(split, index), payload={"split": split, "index": index,
                                                                         "start": start, "items": chunk}))
        return units

    def open_worker(self, ctx: RunContext) -> IngestWorker:
        return IngestWorker(ctx)

    def finalize(self, ctx: RunContext) -> dict[str, Any]:
        cfg = ctx.config.data
        classes, items, skipped = self._listing(ctx)
        records = ctx.store.records(self.name)
        bad = [b for r in records for b in r.metrics.get("bad", [])]
        total = sum(len(v) for v in items.values())
        if skipped:
            log.warning("ingest: ignored %d non-image files", skipped)
        if bad:
            log.warning("ingest: skipped %d unreadable images, e.g. %s", len(bad), "; ".join(bad[:3]))
        if total and len(bad) / total > cfg.max_bad_fraction:
            raise ConfigError(
                f"ingest: {len(bad)} of {total} images are unreadable ({len(bad) / total:.2%} > "
                f"data.max_bad_fraction={cfg.max_bad_fraction}); e.g. {'; '.join(bad[:5])}. Replace or remove "
                "them and delete RUN_DIR/manifests/ingest, or raise data.max_bad_fraction"
            )
        counts = {s: sum(r.metrics.get("samples", 0) for r in records if r.unit.startswith(s + "-")) for s in SPLITS}
        meta = {"classes": classes, "num_classes": len(classes), "counts": counts, "source": cfg.source,
                "dataset": cfg.dataset, "shards": {s: sorted(r.unit for r in records if r.unit.startswith(s + "-"))
                                                   for s in SPLITS}}
        write_class_map(ctx.path(REAL_DIR), meta)
        return {"num_classes": len(classes), "train_images": counts["train"], "val_images": counts["val"],
                "bad_images": len(bad), "non_image_files": skipped}


class IngestWorker:
    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.digits = None
        if ctx.config.data.source == "demo":
            self.digits, _ = demo.load_digits_arrays()
        # the units' input: the whole source folder, by the fingerprint the stage's validate wrote
        self.inputs: list[FileRef] = []
        path = ctx.path(REAL_DIR, SOURCE_FILE)
        if path.is_file():
            fp = json.loads(path.read_text())
            uri = "bundled:sklearn-digits" if fp["source"] == "demo" else fp["source"]
            self.inputs = [FileRef(uri=uri, sha256=fp["sha256"], bytes=fp["bytes"])]

    def _samples(self, unit: Unit, bad: list[str]):  # noqa: ANN202 - generator of Sample
        split, start = unit.payload["split"], unit.payload["start"]
        res = self.ctx.config.data.resolution
        for j, (src, cls) in enumerate(unit.payload["items"]):
            key = f"{split}_{start + j:08d}"
            if self.digits is not None:
                yield Sample(key, cls, demo.render_png(self.digits[src], res), "png", {"source": f"digits[{src}]"})
                continue
            try:
                data, ext = encode_checked(Path(src).read_bytes(), src)
            except (BadImage, OSError) as exc:
                log.warning("ingest: skipping %s", exc)
                bad.append(str(exc))
                continue
            yield Sample(key, cls, data, ext, {"source": src})

    def run(self, unit: Unit) -> UnitResult:
        bad: list[str] = []
        paths = write_shard(self.ctx.path(REAL_DIR), unit.key, self._samples(unit, bad))
        n = len(unit.payload["items"]) - len(bad)
        return UnitResult(outputs=[self.ctx.ref(p) for p in paths], metrics={"samples": n, "bad": bad},
                          inputs=list(self.inputs))

    def close(self) -> None:
        pass


STAGE = register_stage(IngestStage())
