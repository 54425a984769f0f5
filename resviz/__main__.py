"""``python -m resviz``: see :mod:`resviz.cli`."""

import sys

from resviz.cli import main

if __name__ == "__main__":
    sys.exit(main())
