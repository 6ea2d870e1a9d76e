"""Soft-label files: the parquet layout of the relabel stage's output, its writer and its reader.

Parquet layout
--------------
One row per (epoch, image id) view of the student (see ``pipeline.augment.views``). Only what cannot be recomputed
is stored: the view itself (crop, flip, mix partner, lambda, CutMix box) is a pure function of
(run seed, epoch, image id), so the student regenerates it and checks it against a checksum instead.

==========  ========================================  ===========================================================
column      arrow type                                meaning
==========  ========================================  ===========================================================
image_id    int64                                     synthetic image id
epoch       int32                                     student epoch
topk_idx    list<int16> (list<int32> if C > 32768)    the k kept classes (those of the k largest fp16 logits),
                                                      ascending class index; the smallest type that holds C - 1
topk_val    list<halffloat>                           the fp16 logits of those classes, in the same order
log_z       float32                                   logsumexp over all C classes of fp16 logit / T (float32)
==========  ========================================  ===========================================================

Why ascending class order: at k = C the index column is then 0..C-1 in every row and costs almost nothing,
and for k < C the delta between neighbouring indices is small. Encodings (chosen by measurement, see
``benchmarks/bench_softlabels.py``): DELTA_BINARY_PACKED for image_id, epoch and topk_idx; BYTE_STREAM_SPLIT
(pyarrow >= 17; PLAIN before) for topk_val and log_z, so zstd sees the compressible high bytes of the floats
together; no dictionaries, no column statistics; zstd. ``halffloat`` is parquet's FLOAT16 logical type
(pyarrow >= 15): values are read back bitwise. An int8 index type would save nothing: parquet stores small
integers as INT32 either way.

The rows of each epoch form one row group (``SoftLabelWriter`` streams a relabel unit epoch by epoch), and
``SoftLabelTable`` reads one epoch at a time: neither side holds more than one epoch of a file's labels.

Key-value metadata of the parquet footer (all strings; ``pq.read_metadata(path).metadata``):

==================  ===================================================================================
key                 value
==================  ===================================================================================
soft_label_format   ``FORMAT_VERSION``; files of other versions are refused with "rerun relabel"
num_classes         C
top_k               k (1 <= k <= C)
temperature         T, ``repr(float(T))``: logZ depends on it, so a student with another T is refused
view_checksum       sha256 hex of the view parameters of all rows, in row order (below); written at close
views               JSON of the view settings (seed, num_images, resolution, crop_scale, mix, mix_alpha,
                    mix_prob), for error messages only: the checksum is what is checked
==================  ===================================================================================

plus any extra keys the writer's caller passes (the relabel stage adds ``teacher_arch``).

View checksum: for each row, in file row order, the ``ViewParams`` of ``draw_view(seed, epoch, image_id,
num_images, cfg)`` packed little-endian without padding as ``VIEW_RECORD`` (62 bytes: box 4 x float32, flip
uint8 0/1, partner int64, partner_box 4 x float32, partner_flip uint8, lam float32, cut 4 x int32); the
sha256 of the concatenated records, as lowercase hex. ``draw_view`` rounds fractions and lam to float32 when
it draws them, so the float32 packing is exact. The student draws the views of every row again and compares
(``SoftLabelTable.check_views``), so labels made for another seed, resolution, crop scale, mix setting or
number of images are refused instead of silently trained on.

Size per view (``full_logit_bytes`` is SRe2L's 2 * C + 29 bytes): at C = 10, k = 10 about 25-28 B (49);
at C = 1000, k = 100 about 230-265 B and k = 1000 about 1.7 kB (2029); the exact figures depend on the
logits, see the benchmark.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.augment.views import ViewConfig, ViewParams
from pipeline.softlabels.targets import SoftLabels, check_temperature

FORMAT_VERSION = "2"

# Columns of a soft-label file, in order (the index type depends on C: see ``index_type``).
SOFT_LABEL_COLUMNS = ("image_id", "epoch", "topk_idx", "topk_val", "log_z")

# The canonical packing of one view for the checksum (numpy's default is packed: no alignment padding).
VIEW_RECORD = np.dtype(
    [
        ("box", "<f4", (4,)),
        ("flip", "u1"),
        ("partner", "<i8"),
        ("partner_box", "<f4", (4,)),
        ("partner_flip", "u1"),
        ("lam", "<f4"),
        ("cut", "<i4", (4,)),
    ]
)

# BYTE_STREAM_SPLIT for FIXED_LEN_BYTE_ARRAY (the fp16 column) arrived in pyarrow 17; older versions
# write those columns PLAIN, which is a little larger but reads the same.
_PA_MAJOR = int(pa.__version__.split(".")[0])
_FLOAT_ENCODING = "BYTE_STREAM_SPLIT" if _PA_MAJOR >= 17 else "PLAIN"
_COLUMN_ENCODING = {
    "image_id": "DELTA_BINARY_PACKED",
    "epoch": "DELTA_BINARY_PACKED",
    "topk_idx.list.element": "DELTA_BINARY_PACKED",
    "topk_val.list.element": _FLOAT_ENCODING,
    "log_z": _FLOAT_ENCODING,
}


@dataclass(frozen=True)
class ViewSource:
    """What the views of a soft-label file are drawn from: ``draw_view(seed, epoch, id, num_images, cfg)``."""

    seed: int
    num_images: int
    cfg: ViewConfig

    def describe(self) -> dict[str, object]:
        cfg = asdict(self.cfg)
        cfg["crop_scale"] = list(cfg["crop_scale"])
        return {"seed": int(self.seed), "num_images": int(self.num_images), **cfg}


# --------------------------------------------------------------------------------------------- views


def _view_records(params: Iterable[ViewParams]) -> np.ndarray:
    """Views packed as ``VIEW_RECORD`` (the canonical encoding of the module docstring)."""
    ps = list(params)
    rec = np.zeros(len(ps), dtype=VIEW_RECORD)
    if ps:
        rec["box"] = [p.box for p in ps]
        rec["flip"] = [p.flip for p in ps]
        rec["partner"] = [p.partner for p in ps]
        rec["partner_box"] = [p.partner_box for p in ps]
        rec["partner_flip"] = [p.partner_flip for p in ps]
        rec["lam"] = [p.lam for p in ps]
        rec["cut"] = [p.cut for p in ps]
    return rec


def view_checksum(params: Iterable[ViewParams]) -> str:
    """sha256 hex of the views packed as ``VIEW_RECORD``, in order."""
    return hashlib.sha256(_view_records(params).tobytes()).hexdigest()


def index_type(num_classes: int) -> pa.DataType:
    """The smallest arrow integer type holding class indices 0..C-1 that parquet stores compactly."""
    return pa.int16() if num_classes - 1 <= np.iinfo(np.int16).max else pa.int32()


# --------------------------------------------------------------------------------------------- parquet


def _var_list(values: np.ndarray, typ: pa.DataType) -> pa.Array:
    n, k = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32), type=pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=typ))


class SoftLabelWriter:
    """Writes one soft-label file batch by batch; the rows of each epoch become one row group.

    Only the pending epoch is held in memory, however many epochs and classes a file covers. The view
    checksum is hashed as rows arrive and written into the footer on ``close``. As a context manager it
    closes on success and deletes the partial file on an error. The caller picks temp names and renames.
    """

    def __init__(self, path: str, num_classes: int, k: int, temperature: float, views: ViewSource,
                 metadata: Mapping[str, str] | None = None) -> None:
        if not 1 <= k <= num_classes:
            raise ValueError(f"k = {k} must be in [1, {num_classes}]")
        self.path, self.num_classes, self.k = str(path), int(num_classes), int(k)
        self.rows = 0
        self._itype = index_type(num_classes)
        meta = {str(a): str(b) for a, b in (metadata or {}).items()}
        meta.update(
            soft_label_format=FORMAT_VERSION,
            num_classes=str(self.num_classes),
            top_k=str(self.k),
            temperature=repr(check_temperature(temperature)),
            views=json.dumps(views.describe(), sort_keys=True),
        )
        self._schema = pa.schema(
            [
                pa.field("image_id", pa.int64(), nullable=False),
                pa.field("epoch", pa.int32(), nullable=False),
                pa.field("topk_idx", pa.list_(self._itype), nullable=False),
                pa.field("topk_val", pa.list_(pa.float16()), nullable=False),
                pa.field("log_z", pa.float32(), nullable=False),
            ],
            metadata=meta,
        )
        # No column statistics: the reader finds epochs from the epoch column itself, and with a row group
        # per epoch the statistics would be a third of the footer.
        self._out = pq.ParquetWriter(self.path, self._schema, compression="zstd", use_dictionary=False,
                                     column_encoding=_COLUMN_ENCODING, write_statistics=False)
        self._hash = hashlib.sha256()
        self._pending: list[tuple[np.ndarray, ...]] = []  # (ids, epochs, idx, vals, log_z) slices
        self._pending_epoch: int | None = None

    def write(self, image_ids: Sequence[int], epoch_ids: Sequence[int], params: Sequence[ViewParams],
              labels: SoftLabels) -> None:
        """Append rows: view ``params[i]`` of image ``image_ids[i]`` at epoch ``epoch_ids[i]``, ``labels`` row i."""
        n = len(image_ids)
        if not (len(epoch_ids) == len(params) == n):
            raise ValueError(f"{n} image ids, {len(epoch_ids)} epoch ids and {len(params)} params differ in length")
        idx, vals, log_z = (t.detach().cpu() for t in labels)
        if idx.shape != (n, self.k) or vals.shape != (n, self.k) or tuple(log_z.shape) != (n,):
            raise ValueError(f"indices {tuple(idx.shape)}, values {tuple(vals.shape)} and log_z "
                             f"{tuple(log_z.shape)} must be [{n}, {self.k}], [{n}, {self.k}] and [{n}]")
        if n and self.k > 1 and not bool((idx[:, 1:] > idx[:, :-1]).all()):
            raise ValueError("indices must be strictly ascending in every row (use encode_soft_labels)")
        if n and (int(idx.min()) < 0 or int(idx.max()) >= self.num_classes):
            raise ValueError(f"class indices outside [0, {self.num_classes})")
        self._hash.update(_view_records(params).tobytes())
        ids = np.asarray(image_ids, dtype=np.int64)
        epochs = np.asarray(epoch_ids, dtype=np.int32)
        cols = (ids, epochs, idx.numpy().astype(self._itype.to_pandas_dtype()), vals.to(torch.float16).numpy(),
                log_z.to(torch.float32).numpy())
        # Split at epoch changes so that each epoch's rows end up in a row group of their own.
        for a, b in itertools.pairwise([0, *(np.flatnonzero(np.diff(epochs)) + 1).tolist(), n]):
            if self._pending_epoch != int(epochs[a]):
                self._flush()
                self._pending_epoch = int(epochs[a])
            self._pending.append(tuple(c[a:b] for c in cols))
        self.rows += n

    def _flush(self) -> None:
        if not self._pending:
            return
        ids, epochs, idx, vals, log_z = (np.concatenate(parts) for parts in zip(*self._pending, strict=True))
        columns = [pa.array(ids), pa.array(epochs), _var_list(idx, self._itype), _var_list(vals, pa.float16()),
                   pa.array(log_z)]
        table = pa.Table.from_arrays(columns, schema=self._schema)
        self._out.write_table(table, row_group_size=max(1, table.num_rows))
        self._pending = []

    def close(self) -> int:
        """Write the pending rows and the footer (with the view checksum); returns the file size in bytes."""
        self._flush()
        self._out.add_key_value_metadata({"view_checksum": self._hash.hexdigest()})
        self._out.close()
        return os.path.getsize(self.path)

    def __enter__(self) -> SoftLabelWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        self._out.close()
        Path(self.path).unlink(missing_ok=True)


def write_soft_labels(
    path: str,
    image_ids: Sequence[int],
    epoch_ids: Sequence[int],
    params: Sequence[ViewParams],
    labels: SoftLabels,
    num_classes: int,
    temperature: float,
    views: ViewSource,
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write one file of soft labels in one go (``SoftLabelWriter``); returns its size in bytes.

    Row i is the view ``params[i]`` (as drawn from ``views``) of image ``image_ids[i]`` at epoch
    ``epoch_ids[i]``, with ``labels`` row i from ``encode_soft_labels`` at ``temperature``. Only the
    checksum of ``params`` is stored.
    """
    with SoftLabelWriter(path, num_classes, labels.indices.shape[1], temperature, views, metadata) as out:
        out.write(image_ids, epoch_ids, params, labels)
    return os.path.getsize(path)
