"""Image decoding: every PIL mode an ingested file can open in becomes the right 8-bit RGB, and class folders
follow torchvision's `find_classes` rule.

Each case encodes a small random image in a format that keeps its mode, runs it through ingest's
`encode_checked` (what is stored) and the loaders' `decode_rgb` (what is read), and compares both with a
reference conversion written here in numpy from the mode's definition.
"""

from __future__ import annotations

import colorsys
import io
import logging
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ConfigError
from pipeline.data.images import decode_rgb, to_rgb
from pipeline.run.stages.ingest import encode_checked, list_folder

H, W = 6, 5


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _grey(v: np.ndarray) -> np.ndarray:
    return np.repeat(v[..., None], 3, axis=2).astype(np.uint8)


def _png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG (grey, grey+alpha, RGB or RGBA by channel count), written by hand: PIL cannot write these."""
    h, w = arr.shape[:2]
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _cmyk_ref(c: np.ndarray) -> np.ndarray:
    k = 255.0 - c[..., 3:].astype(np.float64)
    return np.round((255.0 - c[..., :3]) * k / 255.0).astype(np.uint8)


# ---------------------------------------------------------------------------------- the cases

def _bilevel() -> tuple[bytes, np.ndarray]:
    bits = _rng(1).integers(0, 2, (H, W)).astype(bool)
    return _encode(Image.fromarray(bits), "PNG"), _grey(bits * 255)


def _l() -> tuple[bytes, np.ndarray]:
    v = _rng(2).integers(0, 256, (H, W), dtype=np.uint8)
    return _encode(Image.fromarray(v), "PNG"), _grey(v)


def _palette(fmt: str, mode: str) -> Callable[[], tuple[bytes, np.ndarray]]:
    def make() -> tuple[bytes, np.ndarray]:
        rng = _rng(3)
        pal = rng.integers(0, 256, (256, 3), dtype=np.uint8)
        idx = rng.integers(0, 256, (H, W), dtype=np.uint8)
        img = Image.fromarray(idx, mode="P")
        img.putpalette(pal.tobytes())
        if mode == "PA":
            img = img.convert("PA")
            assert img.mode == "PA"
        return _encode(img, fmt), pal[idx]
    return make


def _rgb(mode: str) -> Callable[[], tuple[bytes, np.ndarray]]:
    def make() -> tuple[bytes, np.ndarray]:
        arr = _rng(4).integers(0, 256, (H, W, len(mode)), dtype=np.uint8)
        return _encode(Image.fromarray(arr, mode=mode), "PNG"), arr[..., :3]
    return make


def _la() -> tuple[bytes, np.ndarray]:
    arr = _rng(5).integers(0, 256, (H, W, 2), dtype=np.uint8)
    return _encode(Image.fromarray(arr, mode="LA"), "PNG"), _grey(arr[..., 0])


def _wide16() -> np.ndarray:
    v = _rng(6).integers(0, 65536, (H, W)).astype(np.uint16)
    v[0, :4] = [0, 255, 256, 65535]  # below, at and above one 8-bit step, and full scale
    return v


def _i16_png() -> tuple[bytes, np.ndarray]:
    v = _wide16()
    img = Image.fromarray(v)
    assert img.mode == "I;16"
    return _encode(img, "PNG"), _grey(v >> 8)


def _i16b_tiff() -> tuple[bytes, np.ndarray]:
    v = _wide16()
    return _encode(Image.frombytes("I;16B", (W, H), v.astype(">u2").tobytes()), "TIFF"), _grey(v >> 8)


def _i16_pgm() -> tuple[bytes, np.ndarray]:
    v = _wide16()
    return _encode(Image.fromarray(v), "PPM"), _grey(v >> 8)  # a 16-bit PGM opens as mode I


def _i32_tiff() -> tuple[bytes, np.ndarray]:
    v = _rng(7).integers(-1000, 70000, (H, W)).astype(np.int32)
    return _encode(Image.fromarray(v, mode="I"), "TIFF"), _grey(np.clip(v, 0, 65535) >> 8)


def _float_tiff() -> tuple[bytes, np.ndarray]:
    v = _rng(8).uniform(-10.0, 300.0, (H, W)).astype(np.float32)
    return _encode(Image.fromarray(v, mode="F"), "TIFF"), _grey(np.trunc(np.clip(v, 0, 255)))


def _png16_of(channels: int) -> Callable[[], tuple[bytes, np.ndarray]]:
    def make() -> tuple[bytes, np.ndarray]:
        v = _rng(9).integers(0, 65536, (H, W, channels)).astype(np.uint16)
        top = (v >> 8).astype(np.uint8)
        ref = _grey(top[..., 0]) if channels <= 2 else top[..., :3]
        return _png16(v[..., 0] if channels == 1 else v), ref
    return make


def _cmyk_tiff() -> tuple[bytes, np.ndarray]:
    c = _rng(10).integers(0, 256, (H, W, 4), dtype=np.uint8)
    return _encode(Image.fromarray(c, mode="CMYK"), "TIFF"), _cmyk_ref(c)


def _cmyk_jpeg() -> tuple[bytes, np.ndarray]:
    c = _rng(11).integers(0, 256, (H, W, 4), dtype=np.uint8)
    data = _encode(Image.fromarray(c, mode="CMYK"), "JPEG", quality=95)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.mode == "CMYK"
    return data, _cmyk_ref(np.asarray(decoded))  # lossy: the reference starts from the decoded CMYK values


def _ycbcr_tiff() -> tuple[bytes, np.ndarray]:
    y = _rng(12).integers(0, 256, (H, W, 3), dtype=np.uint8)
    img = Image.merge("YCbCr", [Image.fromarray(y[..., i]) for i in range(3)])
    lum, cb, cr = (y[..., i].astype(np.float64) for i in range(3))
    rgb = np.stack([lum + 1.402 * (cr - 128), lum - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                    lum + 1.772 * (cb - 128)], axis=-1)  # JFIF / ITU-R BT.601 full range
    return _encode(img, "TIFF"), np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def _lab_tiff() -> tuple[bytes, np.ndarray]:
    # neutral colours (a* = b* = 0): sRGB grey of lightness L* = L * 100 / 255
    lum = _rng(13).integers(0, 256, (H, W)).astype(np.uint8)
    lab = np.stack([lum, np.full_like(lum, 128), np.full_like(lum, 128)], axis=-1)
    img = Image.merge("LAB", [Image.fromarray(lab[..., i]) for i in range(3)])
    fy = (lum * 100.0 / 255.0 + 16) / 116
    y = np.where(fy > 6 / 29, fy ** 3, 3 * (6 / 29) ** 2 * (fy - 4 / 29))
    srgb = np.where(y <= 0.0031308, 12.92 * y, 1.055 * y ** (1 / 2.4) - 0.055)
    return _encode(img, "TIFF"), _grey(np.round(np.clip(srgb, 0, 1) * 255))


CASES: dict[str, tuple[Callable[[], tuple[bytes, np.ndarray]], int]] = {
    # name: (make -> (file bytes, reference RGB), tolerance)
    "1 png": (_bilevel, 0),
    "L png": (_l, 0),
    "P png": (_palette("PNG", "P"), 0),
    "P gif": (_palette("GIF", "P"), 0),
    "PA tiff": (_palette("TIFF", "PA"), 0),
    "RGB png": (_rgb("RGB"), 0),
    "RGBA png": (_rgb("RGBA"), 0),
    "LA png": (_la, 0),
    "I;16 png": (_i16_png, 0),
    "I;16B tiff": (_i16b_tiff, 0),
    "I pgm16": (_i16_pgm, 0),
    "I tiff": (_i32_tiff, 0),
    "F tiff": (_float_tiff, 0),
    "16-bit grey png": (_png16_of(1), 0),
    "16-bit grey+alpha png": (_png16_of(2), 0),
    "16-bit RGB png": (_png16_of(3), 0),
    "16-bit RGBA png": (_png16_of(4), 0),
    "CMYK tiff": (_cmyk_tiff, 1),
    "CMYK jpeg": (_cmyk_jpeg, 1),
    "YCbCr tiff": (_ycbcr_tiff, 1),
    "LAB tiff": (_lab_tiff, 2),  # PIL's LAB conversion is a little off neutral in the darks
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_mode_is_stored_and_read_as_its_reference_rgb(name: str) -> None:
    make, tol = CASES[name]
    data, ref = make()
    assert ref.shape == (H, W, 3) and ref.dtype == np.uint8
    stored, ext = encode_checked(data, name)
    assert ext == "png"  # none of these is an RGB or grey JPEG: all are converted and stored as PNG
    kept = Image.open(io.BytesIO(stored))
    assert kept.mode == "RGB"
    for got in (np.asarray(kept), decode_rgb(data)):  # what ingest stores, and what a loader reads directly
        diff = np.abs(got.astype(int) - ref.astype(int))
        assert diff.max() <= tol, f"{name}: off by up to {diff.max()} (first row {got[0].tolist()} vs {ref[0].tolist()})"


def test_hsv_images_convert_by_the_hsv_definition() -> None:
    hsv = _rng(14).integers(0, 256, (H, W, 3), dtype=np.uint8)
    img = Image.merge("HSV", [Image.fromarray(hsv[..., i]) for i in range(3)])
    ref = np.array([[np.round(np.array(colorsys.hsv_to_rgb(*(px / 255.0))) * 255) for px in row] for row in hsv])
    assert np.abs(np.asarray(to_rgb(img)).astype(int) - ref).max() <= 1


def test_a_16_bit_image_is_not_clipped_to_white() -> None:
    ramp = np.linspace(0, 65535, H * W).astype(np.uint16).reshape(H, W)
    got = decode_rgb(_encode(Image.fromarray(ramp), "PNG"))[..., 0]
    assert got.min() == 0 and got.max() == 255 and (got == 255).mean() < 0.1  # a ramp stays a ramp
    assert np.all(np.diff(got.ravel().astype(int)) >= 0)


# ------------------------------------------------------------------------------------ class folders

def _folder(root: Path, classes: list[str], empty: tuple[str, ...] = ()) -> Path:
    for split in ("train", "val"):
        for i, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            if name not in empty:
                Image.fromarray(np.full((4, 4, 3), 40 * i, np.uint8)).save(d / "img.png")
    return root


def test_class_folders_follow_torchvision_and_dot_names_are_warned_about(tmp_path, caplog) -> None:
    from torchvision.datasets.folder import find_classes

    root = _folder(tmp_path / "data", ["n01", ".extra", "n02"])
    with caplog.at_level(logging.WARNING):
        classes, items, _ = list_folder(root)
    assert classes == find_classes(root / "train")[0] == [".extra", "n01", "n02"]  # same class indices
    assert sorted({c for _, c in items["train"]}) == [0, 1, 2]
    assert any(".extra" in r.getMessage() and "torchvision" in r.getMessage() for r in caplog.records)
    # an empty dot folder (a notebook's checkpoints, say) is a class with no images: refused, by name
    bad = _folder(tmp_path / "bad", ["n01", ".ipynb_checkpoints"], empty=(".ipynb_checkpoints",))
    with pytest.raises(ConfigError, match=r"\.ipynb_checkpoints"):
        list_folder(bad)
