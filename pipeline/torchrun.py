"""`torchrun --nproc_per_node N -m pipeline.torchrun --run-dir RUN --job squeeze|train`: the entry point of
`pipeline.commands.torchrun` (see there), kept at this short name for the command line."""

import sys

from pipeline.commands.torchrun import main

if __name__ == "__main__":
    sys.exit(main())
