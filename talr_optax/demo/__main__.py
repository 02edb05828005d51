"""``python -m talr_optax.demo``: see :mod:`talr_optax.demo`."""

import sys

from talr_optax.demo.cli import main

if __name__ == "__main__":
  sys.exit(main())
