"""``python -m ifjax``: the ``ifjax`` command line (see :mod:`ifjax.cli`)."""

import sys

from ifjax.cli import main

if __name__ == "__main__":
  sys.exit(main())
