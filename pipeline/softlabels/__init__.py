"""Teacher soft labels: the target the student learns (`targets`) and the files relabel stores (`store`).

`targets`: the teacher's tempered softmax over all classes, kept as top-k fp16 logits plus the log-partition,
how far a stored target is from the full one, the KD loss. `store`: one parquet row per (epoch, image) view,
a checksum of the regenerated views, streamed writer and epoch-indexed reader. May import: `pipeline.core`,
`pipeline.augment` (the views a row is keyed by).
"""

from pipeline.softlabels.reader import SoftLabelTable, read_soft_labels
from pipeline.softlabels.store import (
    FORMAT_VERSION,
    SOFT_LABEL_COLUMNS,
    VIEW_RECORD,
    SoftLabelWriter,
    ViewSource,
    index_type,
    view_checksum,
    write_soft_labels,
)
from pipeline.softlabels.targets import (
    FKD_METADATA_BYTES,
    SoftLabels,
    check_temperature,
    encode_soft_labels,
    full_logit_bytes,
    full_target,
    kd_loss,
    target_error,
    teacher_probs,
    topk_fp16,
)

__all__ = [
    "FKD_METADATA_BYTES", "FORMAT_VERSION", "SOFT_LABEL_COLUMNS", "VIEW_RECORD", "SoftLabelTable", "SoftLabelWriter",
    "SoftLabels", "ViewSource", "check_temperature", "encode_soft_labels", "full_logit_bytes", "full_target",
    "index_type", "kd_loss", "read_soft_labels", "target_error", "teacher_probs", "topk_fp16", "view_checksum",
    "write_soft_labels",
]
