"""Compact teacher soft labels: top-k fp16 logits keyed by (epoch, image id), stored in parquet.

SRe2L's FKD format stores, per epoch and per relabel *batch*, the full fp16 logits of every crop plus the
crop/flip/mix metadata; that pins the student to the relabel batch size and sampler and costs
``full_logit_bytes``. Here each row is one (epoch, image id) view (see ``pipeline.augment``) with named
fields and only the teacher's top-k logits, so storage shrinks by about C / k and any student batch size,
sampler or rank count can look labels up.

Parquet layout (``SOFT_LABEL_SCHEMA``), one row per view:

==============  =========================  ==================================================
column          arrow type                 meaning
==============  =========================  ==================================================
image_id        int64                      synthetic image id
epoch           int32                      student epoch
box             fixed_size_list<float32>[4] image crop (top, left, height, width), fractions
flip            bool                       image flip
partner         int64                      mix partner id, -1 if none
partner_box     fixed_size_list<float32>[4] partner crop, fractions
partner_flip    bool                       partner flip
lam             float32                    share of the image in the view
cut             fixed_size_list<int32>[4]  CutMix rectangle (y0, x0, y1, x1), output pixels
topk_idx        list<int32>                class indices of the top-k teacher logits, descending
topk_val        list<halffloat>            those logits in fp16
==============  =========================  ==================================================

``topk_val`` uses arrow's ``halffloat``, written as parquet's FLOAT16 logical type (a 2-byte
FIXED_LEN_BYTE_ARRAY; pyarrow >= 15 writes and reads it), so values are stored as fp16 bytes and read back
bitwise. Files are zstd-compressed. Optional string metadata (e.g. num_classes, temperature, teacher) goes
into the parquet schema metadata.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.augment import ViewParams

SOFT_LABEL_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("epoch", pa.int32(), nullable=False),
        pa.field("box", pa.list_(pa.float32(), 4), nullable=False),
        pa.field("flip", pa.bool_(), nullable=False),
        pa.field("partner", pa.int64(), nullable=False),
        pa.field("partner_box", pa.list_(pa.float32(), 4), nullable=False),
        pa.field("partner_flip", pa.bool_(), nullable=False),
        pa.field("lam", pa.float32(), nullable=False),
        pa.field("cut", pa.list_(pa.int32(), 4), nullable=False),
        pa.field("topk_idx", pa.list_(pa.int32()), nullable=False),
        pa.field("topk_val", pa.list_(pa.float16()), nullable=False),
    ]
)

# Per crop and epoch, SRe2L's FKD files hold, besides 2*C bytes of fp16 logits: 4 float32 crop coordinates,
# a 1-byte flip flag, an 8-byte mix (partner) index and a 4-byte float32 lambda.
FKD_METADATA_BYTES = 4 * 4 + 1 + 8 + 4


# --------------------------------------------------------------------------------------------- top-k, loss


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


def teacher_probs(indices: Tensor, values: Tensor, num_classes: int, temperature: float) -> Tensor:
    """Teacher probabilities [B, C] float32 from top-k (indices, values).

    softmax(values / T) over the kept classes, scattered into C columns, zero elsewhere. Computed as a
    softmax over all C columns with -inf at the dropped classes, so with k == C it equals
    ``softmax(logits_fp16.float() / T)`` bit for bit.
    """
    if indices.shape != values.shape or indices.dim() != 2:
        raise ValueError(
            f"indices {tuple(indices.shape)} and values {tuple(values.shape)} must be equal [B, k]"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    full = torch.full(
        (indices.shape[0], num_classes), float("-inf"), dtype=torch.float32, device=values.device
    )
    full.scatter_(1, indices.to(device=values.device, dtype=torch.int64), values.float() / temperature)
    return F.softmax(full, dim=1)


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


# --------------------------------------------------------------------------------------------- parquet


def _fixed_list(values: np.ndarray, typ: pa.DataType, size: int) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=typ), size)


def _var_list(values: np.ndarray, typ: pa.DataType) -> pa.Array:
    n, k = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32), type=pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=typ))


def write_soft_labels(
    path: str,
    image_ids: Sequence[int],
    epoch_ids: Sequence[int],
    params: list[ViewParams],
    idx: Tensor,
    vals: Tensor,
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write one parquet file of soft labels to ``path`` (exactly; the caller picks temp names and renames).

    Row i is the view ``params[i]`` of image ``image_ids[i]`` at epoch ``epoch_ids[i]`` with top-k
    ``idx[i]`` (cast to int32) and ``vals[i]`` (cast to fp16). Returns the file size in bytes.
    """
    n = len(image_ids)
    if not (len(epoch_ids) == len(params) == n):
        raise ValueError(
            f"{n} image ids, {len(epoch_ids)} epoch ids and {len(params)} params differ in length"
        )
    if idx.dim() != 2 or idx.shape != vals.shape or idx.shape[0] != n:
        raise ValueError(f"idx {tuple(idx.shape)} and vals {tuple(vals.shape)} must both be [{n}, k]")
    idx_np = idx.detach().to("cpu", torch.int32).numpy()
    val_np = vals.detach().to("cpu", torch.float16).numpy()

    columns = {
        "image_id": pa.array(np.asarray(image_ids, dtype=np.int64)),
        "epoch": pa.array(np.asarray(epoch_ids, dtype=np.int32)),
        "box": _fixed_list(
            np.array([p.box for p in params], dtype=np.float32).reshape(n, 4), pa.float32(), 4
        ),
        "flip": pa.array([bool(p.flip) for p in params], type=pa.bool_()),
        "partner": pa.array(np.array([p.partner for p in params], dtype=np.int64)),
        "partner_box": _fixed_list(
            np.array([p.partner_box for p in params], dtype=np.float32).reshape(n, 4), pa.float32(), 4
        ),
        "partner_flip": pa.array([bool(p.partner_flip) for p in params], type=pa.bool_()),
        "lam": pa.array(np.array([p.lam for p in params], dtype=np.float32)),
        "cut": _fixed_list(np.array([p.cut for p in params], dtype=np.int32).reshape(n, 4), pa.int32(), 4),
        "topk_idx": _var_list(idx_np, pa.int32()),
        "topk_val": _var_list(val_np, pa.float16()),
    }
    schema = SOFT_LABEL_SCHEMA
    if metadata:
        schema = schema.with_metadata({str(k): str(v) for k, v in metadata.items()})
    table = pa.Table.from_arrays([columns[f.name] for f in SOFT_LABEL_SCHEMA], schema=schema)
    pq.write_table(table, path, compression="zstd")
    return os.path.getsize(path)


def _fixed_np(col: pa.ChunkedArray, width: int, dtype: type) -> np.ndarray:
    """A list column with exactly ``width`` values per row as a [N, width] numpy array."""
    arr = col.combine_chunks()
    n = len(arr)
    if n == 0:
        return np.zeros((0, width), dtype=dtype)
    if isinstance(arr, pa.ListArray):
        offsets = arr.offsets.to_numpy()
        if not np.all(np.diff(offsets) == width):
            raise ValueError(f"list column rows are not all of length {width}")
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=dtype).reshape(n, width)


class SoftLabelTable:
    """Soft labels read from parquet files, indexed by (epoch, image_id).

    Columns are held as numpy arrays; a dict maps (epoch, image_id) to the row. ``metadata`` is the first
    file's schema metadata (str -> str).
    """

    def __init__(self, table: pa.Table, metadata: dict[str, str] | None = None) -> None:
        n = table.num_rows
        self.metadata: dict[str, str] = dict(metadata or {})
        self.image_id = table.column("image_id").to_numpy().astype(np.int64, copy=False)
        self.epoch = table.column("epoch").to_numpy().astype(np.int32, copy=False)
        self.box = _fixed_np(table.column("box"), 4, np.float32)
        self.flip = table.column("flip").to_numpy().astype(bool, copy=False)
        self.partner = table.column("partner").to_numpy().astype(np.int64, copy=False)
        self.partner_box = _fixed_np(table.column("partner_box"), 4, np.float32)
        self.partner_flip = table.column("partner_flip").to_numpy().astype(bool, copy=False)
        self.lam = table.column("lam").to_numpy().astype(np.float32, copy=False)
        self.cut = _fixed_np(table.column("cut"), 4, np.int32)
        if n:
            idx_col = table.column("topk_idx").combine_chunks()
            k = int(idx_col.offsets[1].as_py() - idx_col.offsets[0].as_py())
        else:
            k = 0
        self.k = k
        self.topk_idx = _fixed_np(table.column("topk_idx"), k, np.int32)
        self.topk_val = _fixed_np(table.column("topk_val"), k, np.float16)

        self._row: dict[tuple[int, int], int] = {}
        for r, key in enumerate(zip(self.epoch.tolist(), self.image_id.tolist(), strict=True)):
            if key in self._row:
                raise ValueError(f"duplicate soft labels for (epoch, image_id) = {key}")
            self._row[key] = r

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, key: object) -> bool:
        return key in self._row

    def _rows(self, epoch: int, image_ids: Sequence[int]) -> np.ndarray:
        e = int(epoch)
        rows = np.empty(len(image_ids), dtype=np.int64)
        for j, i in enumerate(image_ids):
            key = (e, int(i))
            r = self._row.get(key)
            if r is None:
                raise KeyError(f"no soft labels for (epoch, image_id) = {key}")
            rows[j] = r
        return rows

    def lookup(self, epoch: int, image_ids: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Top-k (indices int64 [B, k], values float32 [B, k]) for these image ids at ``epoch``."""
        rows = self._rows(epoch, image_ids)
        idx = torch.from_numpy(self.topk_idx[rows].astype(np.int64))
        vals = torch.from_numpy(self.topk_val[rows].astype(np.float32))
        return idx, vals

    def params(self, epoch: int, image_id: int) -> ViewParams:
        """The stored view parameters of (epoch, image_id); KeyError naming the pair if absent."""
        r = int(self._rows(epoch, [image_id])[0])
        return ViewParams(
            box=tuple(float(v) for v in self.box[r]),  # type: ignore[arg-type]
            flip=bool(self.flip[r]),
            partner=int(self.partner[r]),
            partner_box=tuple(float(v) for v in self.partner_box[r]),  # type: ignore[arg-type]
            partner_flip=bool(self.partner_flip[r]),
            lam=float(self.lam[r]),
            cut=tuple(int(v) for v in self.cut[r]),  # type: ignore[arg-type]
        )


def read_soft_labels(paths: list[str]) -> SoftLabelTable:
    """Read and concatenate soft-label parquet files; every file must have the same k."""
    if not paths:
        return SoftLabelTable(SOFT_LABEL_SCHEMA.empty_table())
    tables = []
    metadata: dict[str, str] = {}
    for i, path in enumerate(paths):
        t = pq.read_table(path)
        missing = [f.name for f in SOFT_LABEL_SCHEMA if f.name not in t.column_names]
        if missing:
            raise ValueError(f"{path}: not a soft-label file, missing columns {missing}")
        if i == 0 and t.schema.metadata:
            metadata = {
                k.decode(): v.decode() for k, v in t.schema.metadata.items() if not k.startswith(b"ARROW:")
            }
        tables.append(t.select([f.name for f in SOFT_LABEL_SCHEMA]).cast(SOFT_LABEL_SCHEMA))
    table = pa.concat_tables(tables)
    return SoftLabelTable(table, metadata)
