"""``python -m remap`` runs the command line (also as ``torchrun --nproc-per-node N -m remap apply``)."""

import os
import sys

from . import cli

code = cli.main()
if cli.HARD_EXIT:  # left a gloo process group: its threads can abort interpreter teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
raise SystemExit(code)
