"""The run machinery: a run directory's stages, their units, hashes, resume and verification.

Owns: `base` (Stage, Unit, RunContext, the Executor protocol), `executors` (the in-process executor),
`graph` (the stage registry, run order from `depends_on`, config hashes), `stages/` (one module per stage,
registering itself), `runner` (plan, skip what is done, run, commit records), `unit_state` (checkpoints inside a
recover unit), `cost` (per-unit cost accounting), `runlog`
(the run's own log file). May import: everything of `pipeline` below it (`config`,
`methods`, `train`, `data`, `softlabels`, `models`, `augment`, `core`) and `manifests`; never `workers` or `ray`:
the Ray executor is handed in by the caller.
"""
