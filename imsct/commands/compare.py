"""``imsct compare``: follow-up of one patient across two visits (volume change and growth rate)."""

from __future__ import annotations

import argparse

HELP = "Compare two visits of one patient: align them, report per-class volume change and growth rate per year."
EXAMPLE = ("imsct compare --t2 v1/sub-001_T2w.nii.gz v2/sub-001_T2w.nii.gz "
           "--seg v1/sub-001_T2w_seg-imsct.nii.gz v2/sub-001_T2w_seg-imsct.nii.gz "
           "--dates 2023-01-10 2024-03-02 -o compare_out")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--t2", nargs=2, required=True, metavar=("VISIT1", "VISIT2"), help="T2w image of each visit")
    parser.add_argument("--seg", nargs=2, required=True, metavar=("VISIT1", "VISIT2"),
                        help="label map (0 background, 1 tumour, 2 edema, 3 cavity) of each visit, on its T2w grid")
    parser.add_argument("--dates", nargs=2, metavar=("DATE1", "DATE2"),
                        help="acquisition date of each visit (YYYY-MM-DD); default: read from the T2w sidecar JSON")
    parser.add_argument("-o", "--out", help="output folder for compare.json and compare.csv")


def run(args: argparse.Namespace) -> int:
    from ..io import InputError

    raise InputError("imsct compare: not implemented yet")
