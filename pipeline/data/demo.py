"""The bundled demo data: scikit-learn's real handwritten digits (1797 images, 10 classes).

No download: the set ships inside scikit-learn. Each 8x8 grey image becomes an RGB
image of the recipe's resolution; the train/val split is deterministic and stratified.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipeline.core.seeding import derive_seed

CLASSES = [str(i) for i in range(10)]


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def split_indices(labels: np.ndarray, val_fraction: float, seed: int) -> dict[str, list[int]]:
    """Stratified deterministic split: the same `seed` gives the same split everywhere."""
    rng = np.random.default_rng(derive_seed(seed, "demo-split"))
    out: dict[str, list[int]] = {"train": [], "val": []}
    for c in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = max(1, int(round(len(idx) * val_fraction)))
        out["val"].extend(sorted(idx[:n_val].tolist()))
        out["train"].extend(sorted(idx[n_val:].tolist()))
    return out


def render_png(image8x8: np.ndarray, resolution: int) -> bytes:
    """An 8x8 digit (values 0..16) as an RGB PNG of `resolution` px, white ink on black."""
    arr = np.clip(image8x8 * (255.0 / 16.0), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, mode="L").resize((resolution, resolution), Image.BICUBIC).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
