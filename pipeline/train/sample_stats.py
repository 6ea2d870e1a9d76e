"""Per-sample statistics of the teacher's training: forgetting events and loss buffers, for the selection methods
`forgetting` and `loss-score` (and `recover.init = real-forgetting | real-loss-score`).

After every squeeze epoch the teacher (eval mode, no grad) scores every real training image, in the order of the
ingest's parquet index (row r = the r-th image of the train shards: the rows `RealPool` reads by):

* correct: argmax == label. A forgetting event of a sample is a transition correct -> incorrect between two
  consecutive epochs (Toneva et al., "An Empirical Study of Example Forgetting during Deep Neural Network
  Learning", ICLR 2019). Samples never classified correctly are "never learned" and rank as most forgotten.
  Deviation: Toneva et al. record correctness on the augmented mini-batch in which a sample is trained; here it
  is recorded at the end of each epoch on the un-augmented image, for every sample at once (the training stream
  draws shards with replacement, so not every sample is seen in every epoch).
* loss_label = CE(f(x), y) and loss_pred = CE(f(x), argmax f(x)) = logsumexp(z) - max(z): the "label loss" and
  "predicted loss" buffers of the class-normalized loss score; the file keeps their mean over the last `window`
  epochs and the final epoch's values.

The pass costs a forward over the train split per epoch (about a third of a training epoch's compute);
`squeeze.sample_stats = false` turns it off (the two methods then refuse). The accumulator travels in the squeeze
checkpoint, so a resumed teacher gets the same file. It consumes no global RNG, so the teacher's weights are the
same bytes with and without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
import torch.nn.functional as F

FORMAT_VERSION = "1"


class SampleStats:
    """The running statistics of n samples over the squeeze epochs (CPU tensors)."""

    def __init__(self, n: int, window: int) -> None:
        self.n, self.window = n, max(1, window)
        self.epochs = 0
        self.prev = torch.zeros(n, dtype=torch.bool)
        self.forgetting = torch.zeros(n, dtype=torch.int32)
        self.learned = torch.zeros(n, dtype=torch.bool)
        self.label_hist = torch.zeros(self.window, n, dtype=torch.float32)
        self.pred_hist = torch.zeros(self.window, n, dtype=torch.float32)

    def add_epoch(self, correct: torch.Tensor, loss_label: torch.Tensor, loss_pred: torch.Tensor) -> None:
        """Fold in one epoch's scores of all n samples."""
        correct = correct.bool().cpu()
        if self.epochs > 0:
            self.forgetting += (self.prev & ~correct).int()
        self.learned |= correct
        self.prev = correct
        slot = self.epochs % self.window
        self.label_hist[slot] = loss_label.float().cpu()
        self.pred_hist[slot] = loss_pred.float().cpu()
        self.epochs += 1

    def _mean(self, hist: torch.Tensor) -> torch.Tensor:
        return hist[: min(self.epochs, self.window)].mean(dim=0) if self.epochs else torch.zeros(self.n)

    def final(self, hist: torch.Tensor) -> torch.Tensor:
        return hist[(self.epochs - 1) % self.window] if self.epochs else torch.zeros(self.n)

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "window": self.window, "epochs": self.epochs, "prev": self.prev,
                "forgetting": self.forgetting, "learned": self.learned, "label_hist": self.label_hist,
                "pred_hist": self.pred_hist}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SampleStats:
        out = cls(int(state["n"]), int(state["window"]))
        out.epochs = int(state["epochs"])
        for name in ("prev", "forgetting", "learned", "label_hist", "pred_hist"):
            setattr(out, name, state[name].clone())
        return out

    def table(self, keys: Sequence[str], labels: Sequence[int]) -> pa.Table:
        """The per-sample parquet table (row order = the ingest index's)."""
        if len(keys) != self.n or len(labels) != self.n:
            raise ValueError(f"{len(keys)} keys / {len(labels)} labels for {self.n} samples")
        columns = {
            "row": pa.array(range(self.n), pa.int64()), "key": pa.array(list(keys), pa.string()),
            "cls": pa.array(list(labels), pa.int32()),
            "forgetting": pa.array(self.forgetting.numpy()), "learned": pa.array(self.learned.numpy()),
            "correct_final": pa.array(self.prev.numpy()),
            "loss_label_mean": pa.array(self._mean(self.label_hist).numpy()),
            "loss_pred_mean": pa.array(self._mean(self.pred_hist).numpy()),
            "loss_label_final": pa.array(self.final(self.label_hist).numpy()),
            "loss_pred_final": pa.array(self.final(self.pred_hist).numpy()),
        }
        meta = {"format": FORMAT_VERSION, "epochs": str(self.epochs), "window": str(self.window)}
        return pa.table(columns).replace_schema_metadata(meta)


def losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(correct, loss_label, loss_pred) per row: argmax == label, CE against the label, CE against the argmax."""
    logits = logits.float()
    loss_label = F.cross_entropy(logits, labels, reduction="none")
    loss_pred = torch.logsumexp(logits, dim=1) - logits.max(dim=1).values
    return logits.argmax(dim=1) == labels, loss_label, loss_pred


class _Rows(torch.utils.data.Dataset):
    """Row r -> (uint8 image [3, R, R] in the teacher's evaluation view, label, r)."""

    def __init__(self, real_dir: Path, index_paths: Sequence[Path], rows: range, resolution: int) -> None:
        self.real_dir, self.index_paths, self.rows, self.resolution = Path(real_dir), list(index_paths), rows, resolution
        self._images: Any = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        from pipeline.data.images import decode_rgb_image, pil_transform
        from pipeline.data.shards import IndexedImages, read_index

        if self._images is None:  # opened in the worker process
            self._images = IndexedImages(self.real_dir, read_index(self.index_paths))
        r = self.rows[i]
        img = pil_transform(decode_rgb_image(self._images.raw(r)), self.resolution, train=False)
        return img, int(self._images.cls[r]), r


@torch.no_grad()
def score_rows(model: torch.nn.Module, real_dir: Path, index_paths: Sequence[Path], rows: range, n: int,
               resolution: int, mean: Sequence[float], std: Sequence[float], device: torch.device,
               batch_size: int = 256, num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score `rows` of the n training samples: (correct, loss_label, loss_pred), each [n] on `device`, zero
    outside `rows` (so that the ranks' parts add up with one all-reduce). The model is put in eval mode and
    restored; BatchNorm uses its running statistics, so a row's score does not depend on its batch."""
    from pipeline.core.imageops import normalize

    out = torch.zeros(3, n, dtype=torch.float32, device=device)
    if len(rows) == 0:
        return out[0], out[1], out[2]
    was_training = model.training
    model.eval()
    # An explicit generator: a DataLoader with workers would otherwise draw its base seed from the global RNG.
    loader = torch.utils.data.DataLoader(_Rows(real_dir, index_paths, rows, resolution), batch_size=batch_size,
                                         num_workers=num_workers, generator=torch.Generator().manual_seed(0))
    try:
        for images, labels, idx in loader:
            x = normalize(images.to(device).float().div_(255.0), mean, std)
            correct, ll, lp = losses(model(x), labels.to(device))
            idx = idx.to(device)
            out[0, idx], out[1, idx], out[2, idx] = correct.float(), ll, lp
    finally:
        model.train(was_training)
    return out[0], out[1], out[2]


def read_sample_stats(path: Path, keys: Sequence[str]) -> pa.Table:
    """The squeeze stage's per-sample table, checked against the ingest index's keys (same rows, same order)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(path)
    table = pq.read_table(path)
    meta = table.schema.metadata or {}
    if meta.get(b"format") != FORMAT_VERSION.encode():
        raise ValueError(f"{path}: per-sample statistics of another format version; rerun the squeeze stage "
                         "(distill run --fresh --stages squeeze)")
    if table.column("key").to_pylist() != list(keys):
        raise ValueError(f"{path}: its samples are not those of the ingest index (different keys or order); "
                         "rerun the squeeze stage")
    return table
