"""``python -m intrain``: the ``intrain`` command line (``intrain.cli``), also what torchrun runs
for a data-parallel run: ``torchrun --nproc-per-node N -m intrain train ...``."""

import sys

from intrain.cli import main

sys.exit(main())
