"""Ingest: real images -> WebDataset shards + DALI .idx + parquet sample index + class map."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from manifests.schema import FileRef
from manifests.store import atomic_write_text
from pipeline.core.errors import ConfigError
from pipeline.data import demo
from pipeline.data.classmap import REAL_DIR, class_map_path, write_class_map
from pipeline.data.images import to_rgb
from pipeline.data.shards import Sample, shard_name, write_shard
from pipeline.data.sources import Listing, Source, open_source
from pipeline.data.sources.base import permuted_chunks, split_seed
from pipeline.data.sources.folders import ImageFolderSource
from pipeline.run.base import RunContext, Stage, Unit, UnitResult
from pipeline.run.graph import register_stage

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
SOURCE_FILE = "source.json"  # RUN_DIR/real/source.json: the fingerprint of the data folder that was ingested


class BadImage(Exception):
    pass


def list_folder(root: Path) -> tuple[list[str], dict[str, list[tuple[str, int]]], int]:
    """Classes (sorted folder names, as torchvision's ImageFolder) and (path, class) per split of an ImageFolder."""
    listing = ImageFolderSource(root).scan()
    return listing.classes, listing.items, listing.skipped


_LISTINGS: dict[tuple[str, str, str], Listing] = {}


def source_listing(source: Source) -> Listing:
    """The source's listing. Shard sources (WebDataset, parquet) have a cheap fingerprint (their files' sizes and
    times) and a costly listing (every shard's headers or label column): it is computed once per process and
    fingerprint. Folder sources are listed afresh: their fingerprint is the listing."""
    if not source.cheap_fingerprint:
        return source.scan()
    key = (source.format, str(source.root), source.fingerprint()["sha256"])
    if key not in _LISTINGS:
        _LISTINGS.clear()
        _LISTINGS[key] = source.scan()
    return _LISTINGS[key]


def fingerprint_of(source: Source) -> dict[str, Any]:
    return source.fingerprint() if source.cheap_fingerprint else source.scan().fingerprint


def demo_fingerprint() -> dict[str, Any]:
    """The bundled digits' fingerprint: a sha256 of the arrays the demo images are rendered from."""
    images, labels = demo.load_digits_arrays()
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    return {"source": "demo", "classes": demo.CLASSES, "files": len(labels), "bytes": images.nbytes + labels.nbytes,
            "sha256": digest}


def fingerprint_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two source fingerprints, one phrase per change ("class 'x' added",
    "3 files added in class '2' (train)", "files changed in 'train-00000.parquet' (train)"); empty when the same."""
    if old.get("sha256") == new.get("sha256"):
        return []
    if old.get("format", "imagefolder") != new.get("format", "imagefolder"):
        return [f"its format changed from {old.get('format', 'imagefolder')} to {new.get('format', 'imagefolder')}"]
    before, after = old.get("classes", []), new.get("classes", [])
    out = [f"class '{c}' added" for c in after if c not in before]
    out += [f"class '{c}' removed" for c in before if c not in after]
    for split in SPLITS:
        groups_old, groups_new = old.get("splits", {}).get(split, {}), new.get("splits", {}).get(split, {})
        if after or before:  # folder sources: a class's group follows the classes above
            names = [c for c in after if c in before] + [g for g in groups_new if g not in after]
        else:
            names = list(groups_new)
            out += [f"'{g}' removed ({split})" for g in groups_old if g not in groups_new]
        for g in names:
            o, n = groups_old.get(g), groups_new.get(g)
            if o == n or n is None:
                continue
            where = f"in class '{g}' ({split})" if g in after else f"in '{g}' ({split})"
            if o is None and g not in after:
                out.append(f"'{g}' added ({split})")
                continue
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

    def source(self, ctx: RunContext) -> Source | None:
        """The data folder's source (`data.format`, detected with auto); None for the bundled digits."""
        cfg = ctx.config.data
        return None if cfg.source == "demo" else open_source(cfg.format, Path(cfg.source))

    def validate(self, ctx: RunContext) -> None:
        """Check the folder (ConfigError naming the path) and record its fingerprint in real/source.json."""
        source = self.source(ctx)
        fingerprint = demo_fingerprint() if source is None else fingerprint_of(source)
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
        new = fingerprint_of(self.source(ctx))
        changes = fingerprint_changes(old, new)
        return [f"data folder {new['source']}: {changes[0]}", *changes[1:]] if changes else []

    def stage_files(self, ctx: RunContext) -> list[Path]:
        return [class_map_path(ctx.path(REAL_DIR)), ctx.path(REAL_DIR, SOURCE_FILE)]

    def _listing(self, ctx: RunContext) -> Listing:
        cfg = ctx.config.data
        source = self.source(ctx)
        if source is not None:
            return source_listing(source)
        _, labels = demo.load_digits_arrays()
        split = demo.split_indices(labels, cfg.val_fraction, cfg.shuffle_seed)
        return Listing(classes=demo.CLASSES, names=None, fingerprint={},
                       items={s: [(i, int(labels[i])) for i in split[s]] for s in SPLITS})

    def plan(self, ctx: RunContext) -> list[Unit]:
        cfg = ctx.config.data
        source = self.source(ctx)
        listing = self._listing(ctx)
        items = listing.items
        units = []
        for split in SPLITS:
            seq, seed = items[split], split_seed(cfg.shuffle_seed, split)
            groups = source.plan(seq, cfg.shard_size, seed) if source else permuted_chunks(len(seq), cfg.shard_size,
                                                                                            seed)
            start = 0
            for index, group in enumerate(groups):
                chunk = [list(seq[j]) for j in group]
                units.append(Unit(key=shard_name(split, index), payload={"split": split, "index": index,
                                                                         "start": start, "items": chunk}))
                start += len(group)
            if source is not None and groups and len(seq) > len(groups[0]):
                mixed = sorted(len({seq[j][1] for j in g}) for g in groups)[len(groups) // 2]
                if mixed < min(len(listing.classes), 10) / 2:
                    log.warning("ingest: the %s shards mix a median of only %d class(es) each: %s stores this split "
                                "sorted by class; raise data.shard_size to mix more of it per shard", split, mixed,
                                cfg.source)
        return units

    def open_worker(self, ctx: RunContext) -> IngestWorker:
        return IngestWorker(ctx)

    def finalize(self, ctx: RunContext) -> dict[str, Any]:
        cfg = ctx.config.data
        listing = self._listing(ctx)
        records = ctx.store.records(self.name)
        unreadable = [b for r in records for b in r.metrics.get("bad", [])]
        bad = listing.bad + unreadable
        total = sum(len(v) for v in listing.items.values()) + len(listing.bad)
        if listing.skipped:
            log.warning("ingest: ignored %d non-image files", listing.skipped)
        for note in listing.notes:
            log.warning("ingest: %s", note)
        if listing.bad:
            log.warning("ingest: skipped %d unusable rows, e.g. %s", len(listing.bad), "; ".join(listing.bad[:3]))
        if unreadable:
            log.warning("ingest: skipped %d unreadable images, e.g. %s", len(unreadable), "; ".join(unreadable[:3]))
        if total and len(bad) / total > cfg.max_bad_fraction:
            raise ConfigError(
                f"ingest: {len(bad)} of {total} images are unreadable or unlabelled ({len(bad) / total:.2%} > "
                f"data.max_bad_fraction={cfg.max_bad_fraction}); e.g. {'; '.join(bad[:5])}. Replace or remove "
                "them and delete RUN_DIR/manifests/ingest, or raise data.max_bad_fraction"
            )
        counts = {s: sum(r.metrics.get("samples", 0) for r in records if r.unit.startswith(s + "-")) for s in SPLITS}
        classes = listing.classes
        meta: dict[str, Any] = {"classes": classes, "num_classes": len(classes), "counts": counts,
                                "source": cfg.source, "dataset": cfg.dataset,
                                "shards": {s: sorted(r.unit for r in records if r.unit.startswith(s + "-"))
                                           for s in SPLITS}}
        fmt = listing.fingerprint.get("format")
        if fmt:
            meta["format"] = fmt
        if listing.names is not None:
            meta["class_names"] = listing.names
        write_class_map(ctx.path(REAL_DIR), meta)
        return {"num_classes": len(classes), "train_images": counts["train"], "val_images": counts["val"],
                "bad_images": len(unreadable), "bad_rows": len(listing.bad), "non_image_files": listing.skipped,
                **({"format": fmt} if fmt else {})}


class IngestWorker:
    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.digits = None
        self.source = STAGE.source(ctx)
        if self.source is None:
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
        read = self.source.reader() if self.source is not None else None  # per unit: a parquet reader caches
        for j, (src, cls) in enumerate(unit.payload["items"]):
            key = f"{split}_{start + j:08d}"
            if self.digits is not None:
                yield Sample(key, cls, demo.render_png(self.digits[src], res), "png", {"source": f"digits[{src}]"})
                continue
            where = self.source.describe(src)
            try:
                data, ext = encode_checked(read(src), where)
            except (BadImage, OSError) as exc:
                log.warning("ingest: skipping %s", exc)
                bad.append(str(exc))
                continue
            yield Sample(key, cls, data, ext, {"source": where})

    def run(self, unit: Unit) -> UnitResult:
        bad: list[str] = []
        paths = write_shard(self.ctx.path(REAL_DIR), unit.key, self._samples(unit, bad))
        n = len(unit.payload["items"]) - len(bad)
        return UnitResult(outputs=[self.ctx.ref(p) for p in paths], metrics={"samples": n, "bad": bad},
                          inputs=list(self.inputs))

    def close(self) -> None:
        pass


STAGE = register_stage(IngestStage())
