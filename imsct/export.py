"""``python -m imsct.export``: the same as ``imsct export`` (export lives in :mod:`imsct.weights`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
