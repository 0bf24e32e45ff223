"""``python -m k25jax ...``: the same command line as the ``k25jax`` script."""

import sys

from k25jax.cli import main

sys.exit(main())
