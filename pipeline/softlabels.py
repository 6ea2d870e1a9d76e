"""Teacher soft labels: top-k fp16 logits plus the log-partition, keyed by (epoch, image id), in parquet.

The target
----------
The student learns the teacher's tempered softmax over all C classes, ``q = softmax(z / T)`` (what the SRe2L
and DWA training codes use), where ``z`` is the teacher's logits for the view *rounded to fp16*: the stored
values, the log-partition, the online target and the relabel metrics all start from the same fp16 logits, so
they agree with each other exactly.

Keeping only the k largest logits and renormalising over them is wrong at the usual T = 20: the softmax is
nearly flat, and with C = 1000 the top 100 classes hold only ~13 % of q. So a stored view also keeps
``logZ = logsumexp(z / T)`` over all C classes, and its target (``teacher_probs``) is

- ``p_i = exp(v_i / T - logZ)`` for the k kept classes: exactly ``q_i``;
- ``p_j = max(0, 1 - sum_kept p) / (C - k)`` for each of the other C - k classes: their true total mass,
  spread uniformly. What is lost is only how that mass varies across them; ``target_error`` measures it
  (TV, KL, residual mass) and the relabel stage reports it. The residual is clamped at 0 against float error.

Kept probabilities are exact up to the float32 rounding of ``v / T - logZ`` (a relative error of about
ulp(logZ): below 1e-6 at T = 20). With k = C the target is computed as ``softmax(z / T)`` itself, so it
equals the online target bit for bit (and logZ is not used).

Parquet layout
--------------
One row per (epoch, image id) view of the student (see ``pipeline.augment``). Only what cannot be recomputed
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
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.augment import ViewConfig, ViewParams, draw_view

FORMAT_VERSION = "2"

# Columns of a soft-label file, in order (the index type depends on C: see ``index_type``).
SOFT_LABEL_COLUMNS = ("image_id", "epoch", "topk_idx", "topk_val", "log_z")

# Per crop and epoch, SRe2L's FKD files hold, besides 2*C bytes of fp16 logits: 4 float32 crop coordinates,
# a 1-byte flip flag, an 8-byte mix (partner) index and a 4-byte float32 lambda.
FKD_METADATA_BYTES = 4 * 4 + 1 + 8 + 4

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


class SoftLabels(NamedTuple):
    """Stored soft labels of B views: indices [B, k] (ascending class), fp16 logits [B, k], logZ [B] float32."""

    indices: Tensor
    values: Tensor
    log_z: Tensor


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


# --------------------------------------------------------------------------------------------- targets


def _fp16_logits(logits: Tensor) -> Tensor:
    """The logits rounded to fp16, as float32 [B, C]."""
    if logits.dim() != 2:
        raise ValueError(f"expected logits [B, C], got shape {tuple(logits.shape)}")
    return logits.detach().to(torch.float16).float()


def topk_fp16(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The top-k logits per row: (indices int32 [B, k], values float16 [B, k]), values descending.

    ``k`` is clipped to the number of classes C. Selection is done on the fp16-rounded logits, so the kept
    values are exactly the fp16 logits that a full fp16 store would hold.
    """
    if logits.dim() != 2:
        raise ValueError(f"topk_fp16 expects logits [B, C], got shape {tuple(logits.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(int(k), logits.shape[1])
    half = logits.detach().to(torch.float16)
    vals, idx = half.float().topk(k, dim=1, largest=True, sorted=True)
    return idx.to(torch.int32), vals.to(torch.float16)


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return t


def full_target(logits: Tensor, temperature: float) -> Tensor:
    """The exact target ``softmax(z_fp16 / T)`` over all C classes, float32 [B, C] (online mode, reference)."""
    return F.softmax(_fp16_logits(logits) / _check_temperature(temperature), dim=1)


def encode_soft_labels(logits: Tensor, k: int, temperature: float) -> SoftLabels:
    """What a stored view keeps: the top-k fp16 logits in ascending class order and logZ over all C.

    logZ = logsumexp(z_fp16 / T) in float32, from the same fp16 logits the top-k are taken from. k is
    clipped to C.
    """
    t = _check_temperature(temperature)
    z = _fp16_logits(logits)
    # Checked here and not in full_target: a stored label outlives the run, while online training would
    # show a non-finite target at once as a nan loss (and the check costs a device sync per batch).
    if not bool(torch.isfinite(z).all()):
        raise ValueError("teacher logits are not finite in fp16 (|logit| > 65504, inf or nan)")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(int(k), z.shape[1])
    log_z = torch.logsumexp(z / t, dim=1)
    idx = z.topk(k, dim=1, largest=True, sorted=False).indices.sort(dim=1).values
    return SoftLabels(idx.to(torch.int32), z.gather(1, idx).to(torch.float16), log_z)


def teacher_probs(
    indices: Tensor, values: Tensor, num_classes: int, temperature: float, log_z: Tensor | None = None
) -> Tensor:
    """The student's target [B, C] float32 from stored (indices, fp16 values, logZ); see the module docstring.

    Kept classes get ``exp(v / T - logZ)``; the residual ``max(0, 1 - their sum)`` is spread evenly over
    the other ``num_classes - k`` classes. With k == C the result is ``softmax(values / T)`` scattered to
    class order, i.e. ``softmax(logits_fp16.float() / T)`` bit for bit, and ``log_z`` is not needed; with
    k < C it is required, since the kept values alone do not say how much mass the other classes hold.
    """
    if indices.shape != values.shape or indices.dim() != 2:
        raise ValueError(
            f"indices {tuple(indices.shape)} and values {tuple(values.shape)} must be equal [B, k]"
        )
    t = _check_temperature(temperature)
    b, k = indices.shape
    if k > num_classes:
        raise ValueError(f"{k} kept classes but only {num_classes} classes")
    device = values.device
    idx = indices.to(device=device, dtype=torch.int64)
    scaled = values.float() / t
    if k == num_classes:
        # The same tensor softmax(z / T) is computed from, so the result is bitwise the full target.
        full = torch.full((b, num_classes), float("-inf"), dtype=torch.float32, device=device)
        return F.softmax(full.scatter_(1, idx, scaled), dim=1)
    if log_z is None:
        raise ValueError(f"log_z is needed for a target from k = {k} < C = {num_classes} logits")
    if log_z.shape != (b,):
        raise ValueError(f"log_z must be [{b}], got {tuple(log_z.shape)}")
    kept = torch.exp(scaled - log_z.to(device=device, dtype=torch.float32)[:, None])
    # Float error can push the kept sum a hair over 1; the residual is a mass, so never negative.
    residual = (1.0 - kept.sum(dim=1)).clamp_(min=0.0)
    out = (residual / (num_classes - k))[:, None].expand(b, num_classes).contiguous()
    return out.scatter_(1, idx, kept)


def target_error(full: Tensor, stored: Tensor, kept: Tensor) -> dict[str, Tensor]:
    """Per-row loss of information of a stored target against the full one (all float32 [B]).

    ``tv``: total variation 0.5 * sum |p - q|; ``kl``: KL(full || stored) in nats; ``residual``: the full
    target's mass outside the kept classes (the TV that renormalising over the kept classes would cost).
    ``kept`` is the [B, k] index tensor. A stored probability of 0 (possible only when the residual rounds
    to 0) is floored at the smallest normal float32 so the KL stays finite (its term is then ~q * 87).
    """
    q, p = full.float(), stored.float()
    tv = 0.5 * (p - q).abs().sum(dim=1)
    kl = (torch.xlogy(q, q) - torch.xlogy(q, p.clamp(min=torch.finfo(torch.float32).tiny))).sum(dim=1)
    mask = torch.ones_like(q, dtype=torch.bool).scatter_(1, kept.to(device=q.device, dtype=torch.int64), False)
    residual = torch.where(mask, q, torch.zeros_like(q)).sum(dim=1)
    return {"tv": tv, "kl": kl, "residual": residual}


def kd_loss(student_logits: Tensor, target_probs: Tensor, temperature: float) -> Tensor:
    """KL(target || softmax(student / T)), batch mean, no T^2 factor (as the SRe2L / DWA training code)."""
    log_p = F.log_softmax(student_logits.float() / temperature, dim=1)
    return F.kl_div(log_p, target_probs.to(log_p.dtype), reduction="batchmean")


def full_logit_bytes(num_images: int, epochs: int, num_classes: int) -> int:
    """Bytes SRe2L's FKD format takes: ``num_images * epochs * (2 * num_classes + 29)``.

    Per image per epoch: full fp16 logits (2 * C bytes) plus the crop metadata, 4 float32 coordinates +
    1 flip byte + 8-byte mix index + 4-byte float32 lambda = 29 bytes (``FKD_METADATA_BYTES``). For ImageNet
    IPC 10 (10,000 images, 300 epochs, C = 1000) this gives 6.09e9 B = 5.67 GiB, the figure SRe2L reports.
    """
    return int(num_images) * int(epochs) * (2 * int(num_classes) + FKD_METADATA_BYTES)


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
            temperature=repr(_check_temperature(temperature)),
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


def _list_np(col: pa.ChunkedArray | pa.Array, width: int, dtype: type) -> np.ndarray:
    """A list column with exactly ``width`` values per row as a [N, width] numpy array."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    if n == 0:
        return np.zeros((0, width), dtype=dtype)
    offsets = arr.offsets.to_numpy()
    if not np.all(np.diff(offsets) == width):
        raise ValueError(f"list column rows are not all of length {width}")
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=dtype).reshape(n, width)


def _file_metadata(path: str, pf: pq.ParquetFile) -> dict[str, str]:
    """The footer's key-value metadata (str -> str), checked to be of a soft-label file of this format.

    Read from the parquet footer rather than the arrow schema: the view checksum is added at close.
    """
    raw = pf.metadata.metadata or {}
    schema = pf.schema_arrow
    meta = {a.decode(): b.decode() for a, b in raw.items() if not a.startswith(b"ARROW:")}
    version = meta.get("soft_label_format")
    if version != FORMAT_VERSION:
        what = "an older soft-label format (top-k only, no log_z)" if version is None else f"format {version}"
        raise ValueError(f"{path}: soft labels in {what}, this code reads format {FORMAT_VERSION}; rerun relabel")
    missing = [c for c in SOFT_LABEL_COLUMNS if c not in schema.names]
    missing += [key for key in ("num_classes", "top_k", "temperature", "view_checksum") if key not in meta]
    if missing:
        raise ValueError(f"{path}: not a soft-label file, missing {missing}")
    return meta


def _read_keys(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(epoch int32 [N], image_id int64 [N]) of a file's rows, in row order."""
    t = pq.read_table(path, columns=["epoch", "image_id"])
    return (t.column("epoch").to_numpy().astype(np.int32, copy=False),
            t.column("image_id").to_numpy().astype(np.int64, copy=False))


@dataclass
class _Epoch:
    """The rows of one epoch: ``row[image_id]`` is the row of that image in the arrays, -1 if absent."""

    epoch: int
    row: np.ndarray
    idx: np.ndarray
    val: np.ndarray
    log_z: np.ndarray


class SoftLabelTable:
    """Soft labels in parquet files, looked up by (epoch, image_id); one epoch is held in memory at a time.

    Opening reads the metadata and the (epoch, image_id) columns only: it checks that every file has the
    same C, k and T (and the expected ones, if given) and that no view appears twice. ``lookup`` loads the
    rows of an epoch from the row groups that hold it (the writer puts each epoch in its own row group), so
    memory stays at one epoch's labels however many epochs or classes are stored.
    """

    def __init__(self, paths: Sequence[str], num_classes: int | None = None,
                 temperature: float | None = None) -> None:
        self.paths = [str(p) for p in paths]
        self.metadata: dict[str, str] = {}
        self._groups: list[list[tuple[int, int]]] = []  # per file, per row group: (min epoch, max epoch)
        self._rows = 0
        keys = []
        for path in self.paths:
            pf = pq.ParquetFile(path)
            meta = _file_metadata(path, pf)
            c, t = int(meta["num_classes"]), float(meta["temperature"])
            if temperature is not None and t != float(temperature):
                raise ValueError(
                    f"{path}: soft labels were made at temperature T = {t}, the student trains at T = "
                    f"{float(temperature)}; rerun relabel with the student's temperature"
                )
            if num_classes is not None and c != int(num_classes):
                raise ValueError(f"{path}: soft labels for {c} classes, the student has {num_classes}; rerun relabel")
            if self.metadata:
                ref = tuple(self.metadata[key] for key in ("num_classes", "top_k", "temperature"))
                if (meta["num_classes"], meta["top_k"], meta["temperature"]) != ref:
                    raise ValueError(f"{path}: (num_classes, top_k, temperature) = ({c}, {meta['top_k']}, {t}) "
                                     f"differ from {self.paths[0]}'s {ref}")
            else:
                self.metadata = meta
            epoch, image_id = _read_keys(path)
            bounds = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
            self._groups.append([(int(epoch[a:b].min()), int(epoch[a:b].max()))
                                 for a, b in itertools.pairwise(bounds.tolist()) if b > a])
            keys.append((epoch, image_id))
            self._rows += len(epoch)
        if not self.metadata:
            if num_classes is None or temperature is None:
                raise ValueError("no soft-label files, and no num_classes and temperature to make an empty table")
            self.metadata = {"num_classes": str(num_classes), "top_k": "0", "temperature": repr(float(temperature))}
        self.num_classes = int(self.metadata["num_classes"])
        self.k = int(self.metadata["top_k"])
        self.temperature = float(self.metadata["temperature"])
        self._check_duplicates(keys)
        self._epoch: _Epoch | None = None

    @staticmethod
    def _check_duplicates(keys: list[tuple[np.ndarray, np.ndarray]]) -> None:
        if not keys:
            return
        epoch = np.concatenate([e for e, _ in keys]).astype(np.int64)
        image_id = np.concatenate([i for _, i in keys])
        key = epoch * (int(image_id.max(initial=0)) + 1) + image_id
        uniq, first, counts = np.unique(key, return_index=True, return_counts=True)
        if len(uniq) != len(key):
            r = int(first[np.argmax(counts > 1)])
            raise ValueError(f"duplicate soft labels for (epoch, image_id) = ({int(epoch[r])}, {int(image_id[r])})")

    def __len__(self) -> int:
        return self._rows

    def _load(self, epoch: int) -> _Epoch:
        if self._epoch is not None and self._epoch.epoch == epoch:
            return self._epoch
        self._epoch = None  # drop the previous epoch before reading the next
        ids, idx, val, log_z = [], [], [], []
        itype = index_type(self.num_classes).to_pandas_dtype()
        for path, groups in zip(self.paths, self._groups, strict=True):
            wanted = [g for g, (lo, hi) in enumerate(groups) if lo <= epoch <= hi]
            if not wanted:
                continue
            t = pq.ParquetFile(path).read_row_groups(wanted, columns=list(SOFT_LABEL_COLUMNS))
            mask = pc.equal(t.column("epoch"), pa.scalar(epoch, pa.int32()))
            t = t.filter(mask)
            ids.append(t.column("image_id").to_numpy().astype(np.int64, copy=False))
            i = _list_np(t.column("topk_idx"), self.k, itype)
            if i.size and (i.min() < 0 or i.max() >= self.num_classes):
                raise ValueError(f"{path}: class indices outside [0, {self.num_classes})")
            idx.append(i)
            val.append(_list_np(t.column("topk_val"), self.k, np.float16))
            log_z.append(t.column("log_z").to_numpy().astype(np.float32, copy=False))
        all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        row = np.full(int(all_ids.max(initial=-1)) + 1, -1, dtype=np.int64)
        row[all_ids] = np.arange(len(all_ids))
        k = max(self.k, 1)
        self._epoch = _Epoch(
            epoch, row,
            np.concatenate(idx) if idx else np.zeros((0, k), np.int64),
            np.concatenate(val) if val else np.zeros((0, k), np.float16),
            np.concatenate(log_z) if log_z else np.zeros(0, np.float32),
        )
        return self._epoch

    def lookup(self, epoch: int, image_ids: Sequence[int]) -> SoftLabels:
        """Stored labels of these image ids at ``epoch``: indices int64, values float16, log_z float32."""
        e = self._load(int(epoch))
        ids = np.asarray([int(i) for i in image_ids], dtype=np.int64)
        inside = (ids >= 0) & (ids < len(e.row))
        rows = np.full(len(ids), -1, dtype=np.int64)
        rows[inside] = e.row[ids[inside]]
        if (rows < 0).any():
            raise KeyError(f"no soft labels for (epoch, image_id) = ({int(epoch)}, {int(ids[np.argmax(rows < 0)])})")
        return SoftLabels(
            torch.from_numpy(e.idx[rows].astype(np.int64)),
            torch.from_numpy(e.val[rows]),
            torch.from_numpy(e.log_z[rows]),
        )

    def targets(self, epoch: int, image_ids: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
        """The student's targets [B, C] for these image ids at ``epoch``, at the files' temperature."""
        idx, vals, log_z = self.lookup(epoch, image_ids)
        return teacher_probs(idx.to(device), vals.to(device), self.num_classes, self.temperature, log_z.to(device))

    def check_views(self, views: ViewSource, rank: int = 0, world: int = 1) -> list[int]:
        """Indices of the files (of this rank's share, ``i % world == rank``) whose view checksum differs.

        The views of every row are drawn again from ``views`` (``draw_view`` costs ~60 us a view on one
        CPU core), so ranks can split the files and combine their answers.
        """
        bad = []
        for i in range(rank, len(self.paths), world):
            epoch, image_id = _read_keys(self.paths[i])
            params = (draw_view(views.seed, e, j, views.num_images, views.cfg)
                      for e, j in zip(epoch.tolist(), image_id.tolist(), strict=True))
            try:
                ok = view_checksum(params) == pq.read_metadata(self.paths[i]).metadata[b"view_checksum"].decode()
            except ValueError:  # e.g. an image id beyond this student's synthetic set: not its views either
                ok = False
            if not ok:
                bad.append(i)
        return bad

    def view_error(self, i: int, views: ViewSource) -> ValueError:
        """The error for file ``i`` whose views are not the student's."""
        meta = pq.read_metadata(self.paths[i]).metadata or {}
        made = meta.get(b"views", b"settings not recorded").decode()
        return ValueError(
            f"{self.paths[i]}: soft labels were made for other views: seed/resolution/mix settings differ; "
            f"rerun relabel (file: {made}; student: {json.dumps(views.describe(), sort_keys=True)})"
        )


def read_soft_labels(
    paths: list[str],
    num_classes: int | None = None,
    temperature: float | None = None,
    views: ViewSource | None = None,
) -> SoftLabelTable:
    """Open soft-label parquet files, checking them against what the student expects.

    Every file must have the same C, k and T. If given, ``num_classes`` and ``temperature`` must match the
    files' (logZ depends on T, so another T would give wrong targets), and ``views`` must reproduce each
    file's view checksum; a mismatch is a ValueError naming the file.
    """
    table = SoftLabelTable(paths, num_classes, temperature)
    if views is not None:
        bad = table.check_views(views)
        if bad:
            raise table.view_error(bad[0], views)
    return table
