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
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# Per crop and epoch, SRe2L's FKD files hold, besides 2*C bytes of fp16 logits: 4 float32 crop coordinates,
# a 1-byte flip flag, an 8-byte mix (partner) index and a 4-byte float32 lambda.
FKD_METADATA_BYTES = 4 * 4 + 1 + 8 + 4

class SoftLabels(NamedTuple):
    """Stored soft labels of B views: indices [B, k] (ascending class), fp16 logits [B, k], logZ [B] float32."""

    indices: Tensor
    values: Tensor
    log_z: Tensor


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


def check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return t


def full_target(logits: Tensor, temperature: float) -> Tensor:
    """The exact target ``softmax(z_fp16 / T)`` over all C classes, float32 [B, C] (online mode, reference)."""
    return F.softmax(_fp16_logits(logits) / check_temperature(temperature), dim=1)


def encode_soft_labels(logits: Tensor, k: int, temperature: float) -> SoftLabels:
    """What a stored view keeps: the top-k fp16 logits in ascending class order and logZ over all C.

    logZ = logsumexp(z_fp16 / T) in float32, from the same fp16 logits the top-k are taken from. k is
    clipped to C.
    """
    t = check_temperature(temperature)
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
    t = check_temperature(temperature)
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


