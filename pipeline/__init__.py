"""Distributed, resumable dataset distillation: ingest, teacher, recover methods, soft labels, students, evaluation.

The packages are layers; each imports only the ones below it (`tests/test_layering.py` parses every import and
fails on a circle or an upward import), and none imports `ray` or `workers`:

    commands    the `distill` commands: cli, recipes, bench, report, export, torchrun
    run         the run machinery: runner, executors, stage graph, the stages, unit checkpoints, cost
    config      the typed configuration: one documented dataclass per section, checks at load
    methods     the recover plug-ins and the compute only they use (synthesis, matching, selection)
    train       training loops: teacher, kd and hard-label students, full-real reference, DDP, optimizers
    data        real data: ingest formats, shards and indexes, loaders, class map, holdout slice
    softlabels  the teacher's soft labels: targets, the stored format, the reader
    models      every network (own ConvNets, torchvision)
    augment     random transforms: crop geometry, the student's views, DSA
    core        errors, seeds, image normalization

`manifests` (records, atomic writes, verification, collect) sits below all of them.
"""

__version__ = "0.1.0"
