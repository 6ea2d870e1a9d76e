"""Reading soft-label files (layout: `pipeline.softlabels.store`): checked against the student's classes, T and
views, indexed by (epoch, image id), one epoch in memory at a time."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import Tensor

from pipeline.augment.views import draw_view
from pipeline.softlabels.store import FORMAT_VERSION, SOFT_LABEL_COLUMNS, ViewSource, index_type, view_checksum
from pipeline.softlabels.targets import SoftLabels, teacher_probs


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
