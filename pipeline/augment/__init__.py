"""Random image transforms, each a pure function of a generator's draws.

Owns: `crops` (random-resized-crop geometry shared by every loader and method, from any source of uniform draws),
`views` (the student's views: crop, flip, CutMix / Mixup, drawn from (seed, epoch, image id) and rendered one by
one or batched on the device), `dsa` (differentiable Siamese augmentation of the matching methods and the hard
protocol). May import: `pipeline.core`.
"""
