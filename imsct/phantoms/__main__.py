"""Command line: ``python -m imsct.phantoms --out DIR --cases N --seed S``."""

from __future__ import annotations

import argparse
import sys

from . import generate_dataset


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m imsct.phantoms",
        description="Generate two-contrast IMSCT phantoms (T2w + Gd-T1w, labels) in a BIDS layout.",
        epilog="example: python -m imsct.phantoms --out data/phantoms --cases 5 --seed 1",
    )
    ap.add_argument("--out", required=True, help="output BIDS folder")
    ap.add_argument("--cases", type=int, default=1, help="number of subjects (default 1)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("--start", type=int, default=0, help="index of the first subject (default 0)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.cases < 1:
        ap.error("--cases must be at least 1")
    generate_dataset(args.out, args.cases, args.seed, start=args.start, progress=not args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
