"""The commands behind `distill` (composed with the Ray executor by `workers.cli`): `cli` (argument parsing and
the subcommands), `recipes` (the named configurations), `bench` (`distill bench`), `report` (the printed summary),
`export` (`distill export`), `torchrun` (a run's DDP job under torchrun). May import: all of `pipeline` and
`manifests`; never `workers` or `ray`.
"""
