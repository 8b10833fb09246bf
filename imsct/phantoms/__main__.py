"""``python -m imsct.phantoms``: the same as ``imsct phantoms``."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["phantoms", *sys.argv[1:]]))
