"""``python -m pyneuralode repro NAME ...`` (same as the ``pyneuralode`` console script)."""

import sys

from .repro.cli import main

if __name__ == "__main__":
    sys.exit(main())
