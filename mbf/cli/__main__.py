"""``python -m mbf.cli``: how the command restarts itself with OMP_WAIT_POLICY set."""

import sys

from mbf.cli import main

sys.exit(main())
