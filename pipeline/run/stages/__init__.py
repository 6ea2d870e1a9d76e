"""The pipeline's stages, one module each; importing this package registers them (`pipeline.run.graph`).

Adding a stage = one module here that ends with `STAGE = register_stage(MyStage())`, one import line below, and
its config section (if it has settings) in `pipeline.config.sections`. The run order comes from `depends_on`;
among stages whose dependencies are met, the one registered first runs first, so the imports below are in the
pipeline's order, not sorted. Stage modules may import `pipeline.run.base`, `graph`, `stages.common`, the stages
before them in run order, and everything below `pipeline.run`.
"""

# isort: off
from pipeline.run.stages import ingest  # noqa: F401 - importing a stage module registers it
from pipeline.run.stages import squeeze  # noqa: F401
from pipeline.run.stages import difficulty  # noqa: F401
from pipeline.run.stages import experts  # noqa: F401
from pipeline.run.stages import recover  # noqa: F401
from pipeline.run.stages import relabel  # noqa: F401
from pipeline.run.stages import train  # noqa: F401
from pipeline.run.stages import baseline  # noqa: F401
from pipeline.run.stages import evaluate  # noqa: F401
# isort: on
