"""`import`: a distilled set made elsewhere (a published SRe2L, RDED or DWA release, or `distill export`),
evaluated under this pipeline's protocols like any method.

`recover.import_set.path` is a folder of class folders, `<class name>/*.png|jpg|jpeg` (any case), whose names are
the data set's class names (the ingest class map). Class c's IPC images are the first `recover.ipc` files of
its folder in sorted file-name order. An image of another size is resized like the real images (shorter side
to `data.resolution`, bilinear, then a center crop); one of the right size is taken pixel for pixel, so a
folder written by `distill export` comes back byte for byte. Missing, unknown or short class folders and
unreadable files are refused before any unit runs, naming the folder or file.

The recover stage fingerprints the files each unit read (name, size, sha256; `import_sha256` in its record) and
refuses a rerun after they changed (`input_changes`), unless --fresh.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.methods.base import MethodOutput, Needs, doc_field, register

SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class ImportConfig:
    path: str = doc_field("", "folder of class folders (<class name>/*.png|jpg|jpeg, names as the data set's "
                          "classes); the first recover.ipc files of each, in sorted name order")


def class_files(root: Path, name: str) -> list[Path]:
    """The image files of one class folder, sorted by name."""
    folder = root / name
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)


def check_folder(root: str, class_names: list[str], ipc: int) -> None:
    """ConfigError unless `root` holds a folder of at least `ipc` images for every class and nothing else."""
    from pipeline.core.errors import ConfigError

    if not root:
        raise ConfigError("recover.method=import needs recover.import_set.path: a folder of class folders "
                          "(<class name>/*.png|jpg)")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise ConfigError(f"recover.import_set.path: {base} is not a folder; give the folder that holds one folder "
                          "per class")
    present = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = sorted(set(present) - set(class_names))
    if unknown:
        raise ConfigError(f"recover.import_set.path: {base} has folders that are not classes of the data set: "
                          f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''} (classes are named as in "
                          "real/classes.json, e.g. " + ", ".join(class_names[:3]) + ")")
    missing = [n for n in class_names if n not in present]
    if missing:
        raise ConfigError(f"recover.import_set.path: {base} has no folder for class(es) {', '.join(missing[:5])}"
                          f"{' ...' if len(missing) > 5 else ''}; every class needs {ipc} images")
    for name in class_names:
        files = class_files(base, name)
        if len(files) < ipc:
            raise ConfigError(f"recover.import_set.path: {base / name} has {len(files)} image(s) (.png/.jpg), fewer "
                              f"than recover.ipc = {ipc}; add images or lower recover.ipc")


def files_digest(files: list[Path]) -> str:
    """sha256 over (name, size, sha256 of the bytes) of `files`, in order."""
    h = hashlib.sha256()
    for f in files:
        data = f.read_bytes()
        h.update(f"{f.parent.name}/{f.name}\0{len(data)}\0{hashlib.sha256(data).hexdigest()}\n".encode())
    return h.hexdigest()


class ImportWorker:
    def __init__(self, env: Any, cfg: ImportConfig) -> None:
        self.env, self.root = env, Path(cfg.path).expanduser()
        self.names: list[str] = env.extra["class_names"]

    def load(self, path: Path) -> Any:
        import numpy as np
        import torch
        from PIL import Image, UnidentifiedImageError

        from pipeline.core.errors import ConfigError
        from pipeline.core.imageops import center_crop

        res = self.env.resolution
        try:
            with Image.open(path) as im:
                arr = np.array(im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as exc:
            raise ConfigError(f"recover.import_set.path: cannot read {path} ({exc}); replace or remove it") from None
        if arr.shape[:2] != (res, res):
            arr = center_crop(arr, res)
        return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)

    def run(self, classes: range, ipc: range, gen: Any, unit_key: str) -> MethodOutput:
        out = MethodOutput(metrics={"image_iterations": 0})
        used: list[Path] = []
        for j in ipc:
            for c in classes:
                path = class_files(self.root, self.names[c])[j]
                used.append(path)
                out.add([self.load(path)], [c], [j])
        out.metrics["import_sha256"] = files_digest(used)
        out.metrics["import_files"] = [f"{p.parent.name}/{p.name}" for p in used]
        return out


@register("import", description="a distilled set from a folder of class folders (recover.import_set.path), evaluated "
          "like any method", needs=Needs(), config=ImportConfig, default_init="noise", synthesizes=False,
          key="import_set")
def open_import(env: Any, cfg: ImportConfig) -> ImportWorker:
    return ImportWorker(env, cfg)
