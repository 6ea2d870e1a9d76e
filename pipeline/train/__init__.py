"""Training loops on tensors and shards: the teacher, the students of both protocols, the full-real reference.

Owns: `trainloop` (DataSpec, the teacher job, checkpoints, evaluation on val shards), `student` (the kd student:
views, soft labels stored or online), `hardlabel` (the hard-label protocol of DC / DSA / DM), `full_real` (the
hard-protocol student on every real image), `sample_stats` (per-sample statistics of the teacher's training),
`ddp` (process groups, local launch), `optim` (optimizers, cosine schedule). Jobs take typed job specs, never the
run configuration. May import: `pipeline.core`, `augment`, `models`, `data`, `softlabels`, `manifests`.
"""
