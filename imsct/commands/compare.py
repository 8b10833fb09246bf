"""``imsct compare``: follow-up of one patient across two visits (volume change and growth rate)."""

from __future__ import annotations

import argparse

HELP = ("Compare two visits of one patient: per-class volume on each visit, change, percent change and growth "
        "rate per year (linear and compound), overlap and new / vanished lesions after rigid alignment.")
EXAMPLE = ("imsct compare --t2 ses-01/anat/sub-001_ses-01_T2w.nii.gz ses-02/anat/sub-001_ses-02_T2w.nii.gz "
           "--seg1 v1/sub-001_ses-01_T2w_seg-imsct.nii.gz --seg2 v2/sub-001_ses-02_T2w_seg-imsct.nii.gz -o compare_out\n"
           "  (dates come from the T2w sidecar JSON or sub-001_sessions.tsv, or give --dates 2023-01-10 2024-03-02)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--t2", nargs=2, required=True, metavar=("VISIT1", "VISIT2"), help="T2w image of each visit")
    parser.add_argument("--seg1", nargs="+", required=True, metavar="NIFTI",
                        help="visit 1: label map (0 background, 1 tumour, 2 edema, 3 cavity; *_seg-imsct) or the "
                             "*_seg-tumor / *_seg-edema / *_seg-cavity masks, on visit 1's T2w grid")
    parser.add_argument("--seg2", nargs="+", required=True, metavar="NIFTI", help="visit 2: the same, on visit 2's T2w grid")
    parser.add_argument("--dates", nargs=2, metavar=("DATE1", "DATE2"),
                        help="acquisition date of each visit (YYYY-MM-DD); default: AcquisitionDateTime of the T2w "
                             "sidecar JSON, else acq_time in sub-XXX_sessions.tsv")
    parser.add_argument("--no-register", action="store_true",
                        help="trust the scanner coordinates (no rigid registration) for overlap and components")
    parser.add_argument("-o", "--out", metavar="DIR", help="write DIR/compare.json and DIR/compare.csv")


def run(args: argparse.Namespace) -> int:
    from ..followup import compare_visits, load_visit, table, write_report

    d1, d2 = args.dates if args.dates else (None, None)
    v1 = load_visit(args.t2[0], args.seg1, d1)
    v2 = load_visit(args.t2[1], args.seg2, d2)
    result = compare_visits(v1, v2, register=not args.no_register)
    print(table(result))
    if args.out:
        paths = write_report(result, args.out)
        print("wrote " + ", ".join(str(p.resolve()) for p in paths))
    return 0
