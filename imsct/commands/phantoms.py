"""``imsct phantoms``: write two-contrast IMSCT phantoms (T2w + Gd-T1w, truth labels) in a BIDS layout."""

from __future__ import annotations

import argparse

HELP = "Generate two-contrast IMSCT phantoms (T2w + Gd-T1w, truth labels) in a BIDS layout."
EXAMPLE = "imsct phantoms --out data/phantoms --cases 5 --seed 1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output BIDS folder")
    parser.add_argument("--cases", type=int, default=1, help="number of subjects (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--start", type=int, default=0, help="index of the first subject (default 0)")
    parser.add_argument("--quiet", action="store_true", help="print nothing per subject")


def run(args: argparse.Namespace) -> int:
    from ..io import InputError
    from ..phantoms import generate_dataset

    if args.cases < 1:
        raise InputError(f"--cases {args.cases}: must be at least 1")
    generate_dataset(args.out, args.cases, args.seed, start=args.start, progress=not args.quiet)
    return 0
