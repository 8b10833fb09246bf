"""Command line: ``python -m imsct.phantoms --out DIR --cases N --seed S`` (same as ``imsct phantoms``)."""

from __future__ import annotations

import argparse
import sys

from ..commands import phantoms as command
from ..io import InputError
from . import cli


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m imsct.phantoms", description=command.HELP,
        epilog=f"example: {command.EXAMPLE}",
    )
    cli.add_arguments(ap)  # v1 options and the v2 ones (issue 17)
    args = ap.parse_args(argv)
    try:
        return cli.run(args)
    except InputError as exc:
        print(f"python -m imsct.phantoms: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
