"""`python -m fmnist.cli`, the same as the `fmnist` command."""

import sys

from fmnist.cli import app

sys.exit(app())
