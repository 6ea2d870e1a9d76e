"""Leaf helpers every layer may use: errors, seeds and thread counts, image normalization and resizing.

Owns: `errors` (ConfigError: bad input, exit code 2), `seeding` (seeds derived from (run seed, stage, unit key),
a fixed torch thread count), `imageops` (normalize / denormalize, the ImageNet statistics, center crop).
May import: nothing of `pipeline` or `manifests` (torch, numpy and PIL only).
"""
