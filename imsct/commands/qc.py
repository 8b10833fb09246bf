"""``imsct qc``: an offline HTML quality-control report over many subjects."""

from __future__ import annotations

import argparse

HELP = "Write an offline HTML QC report (overlay mosaics, morphometrics, pass/fail marks) for many subjects."
EXAMPLE = "imsct qc --dataset bids/ --segs out/ -o qc/   (then open qc/index.html in a browser)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("inputs (either a BIDS folder with a folder of label maps, or explicit lists)")
    src.add_argument("--dataset", metavar="BIDS_DIR", help="BIDS folder: sub-*/[ses-*/]anat/*_T2w.nii.gz (T1w beside it)")
    src.add_argument("--segs", metavar="SEG_DIR", help="folder with <T2w name>_seg-imsct.nii.gz label maps (imsct segment output)")
    src.add_argument("--t2", nargs="+", metavar="T2W", help="T2w images")
    src.add_argument("--t1", nargs="+", metavar="T1W", help="T1w images, same order as --t2 (optional)")
    src.add_argument("--seg", nargs="+", metavar="LABELMAP", help="label maps (0 bg, 1 tumour, 2 edema, 3 cavity), same order as --t2")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="report folder (index.html and img/)")
    parser.add_argument("--force", action="store_true", help="replace a report of a different set of subjects in DIR")


def run(args: argparse.Namespace) -> int:
    from ..io import InputError

    raise InputError("qc: not implemented yet")
