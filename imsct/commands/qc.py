"""``imsct qc``: an offline HTML quality-control report over many subjects.

Regenerating into the same folder keeps the report's id, so marks already set in the browser stay
with their subjects (a mark on a label map that changed since is flagged stale). See :mod:`imsct.qc`.
"""

from __future__ import annotations

import argparse

HELP = ("Write an offline HTML QC report (sagittal mosaics, axial panels through each lesion, morphometrics, provenance, "
        "pass/fail/artifact verdicts) for many subjects.")
EXAMPLE = ("imsct qc --dataset bids/ --segs out/ -o qc/   (then open qc/index.html in a browser)\n"
           "  imsct qc --t2 a_T2w.nii.gz b_T2w.nii.gz --t1 a_T1w.nii.gz b_T1w.nii.gz "
           "--seg a_T2w_seg-imsct.nii.gz b_T2w_seg-imsct.nii.gz -o qc/")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("inputs (either a BIDS folder with a folder of label maps, or explicit lists)")
    src.add_argument("--dataset", metavar="BIDS_DIR", help="BIDS folder: sub-*/[ses-*/]anat/*_T2w.nii.gz (T1w beside it)")
    src.add_argument("--segs", metavar="SEG_DIR", help="folder with the labels of each T2w: <T2w name>_seg-imsct.nii.gz (imsct segment) or, "
                     "without it, <T2w name>_seg-tumor/_seg-edema/_seg-cavity.nii.gz (sct_deepseg)")
    src.add_argument("--t2", nargs="+", metavar="T2W", help="T2w images")
    src.add_argument("--t1", nargs="+", metavar="T1W", help="T1w images, same order as --t2 (optional)")
    src.add_argument("--seg", nargs="+", metavar="LABELMAP", help="label maps (0 bg, 1 tumour, 2 edema, 3 cavity), same order as --t2")
    parser.add_argument("--levels", metavar="TEMPLATE",
                        help="vertebral levels JSON per subject for the morphometrics table ({\"vertebrae\": [{level, z_top_mm, "
                             "z_bottom_mm}]}, as imsct morphometrics --levels); {id} and {name} in the path stand for the subject "
                             "(sub-001) and its T2w name (sub-001_T2w), e.g. bids/derivatives/labels/{id}/anat/{id}_phantom.json")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="report folder (index.html and img/)")
    parser.add_argument("--title", default="IMSCT QC", help="page title (default: IMSCT QC)")
    parser.add_argument("--models", metavar="DIR",
                        help="models folder that made the masks: its model files and their SHA-256 go on the page for "
                             "subjects whose masks have no sidecar JSON (<label file>.json) saying so")
    parser.add_argument("--force", action="store_true",
                        help="write into DIR even though it is not empty and holds no imsct QC report (only the report's own files are written)")


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from ..io import InputError
    from ..qc import build_report, subjects_from_dataset, subjects_from_lists

    listed = args.t2 is not None or args.seg is not None or args.t1 is not None
    if args.dataset is not None or args.segs is not None:
        if listed:
            raise InputError("give either --dataset with --segs, or --t2 with --seg (and --t1), not both")
        if args.dataset is None or args.segs is None:
            raise InputError("--dataset and --segs go together: the BIDS folder and the folder of its label maps")
        subjects = subjects_from_dataset(args.dataset, args.segs)
    elif listed:
        if args.t2 is None or args.seg is None:
            raise InputError("--t2 and --seg go together: one label map per T2w image, in the same order")
        subjects = subjects_from_lists(args.t2, args.seg, args.t1)
    else:
        raise InputError("no inputs: give --dataset BIDS_DIR --segs SEG_DIR, or --t2 ... --seg ...")

    if args.levels:
        from ..io import strip_nifti_ext
        from ..morphometrics import load_levels

        for subject in subjects:
            path = args.levels.replace("{id}", subject.id).replace("{name}", strip_nifti_ext(subject.t2.name))
            subject.levels = load_levels(path)
    try:
        from tqdm import tqdm

        def progress(items):
            return tqdm(items, desc="imsct qc", unit="subject", file=sys.stderr)
    except ImportError:  # the report does not need a progress bar
        progress = None
    from ..qc import report_provenance

    provenance = report_provenance(command_line(args), args.models)
    manifest = build_report(subjects, args.output, title=args.title, force=args.force, progress=progress, provenance=provenance)
    index = (Path(args.output) / "index.html").resolve()
    errors = manifest["errors"]
    for sid, msg in errors.items():
        print(f"imsct qc: {sid}: {msg}", file=sys.stderr)
    print(f"{len(subjects) - len(errors)} of {len(subjects)} subject(s) rendered: {index}")
    return 1 if errors else 0


def command_line(args: argparse.Namespace) -> str:
    """The ``imsct qc`` command line these arguments stand for (options in a fixed order, quoted
    for a POSIX shell): what the page records as the command that made it."""
    import shlex

    parts = ["imsct", "qc"]
    for name in ("dataset", "segs", "t2", "t1", "seg", "levels", "models", "output", "title"):
        value = getattr(args, name, None)
        if value is None or (name == "title" and value == "IMSCT QC"):
            continue
        flag = "-o" if name == "output" else f"--{name}"
        parts += [flag, *(value if isinstance(value, list) else [value])]
    if args.force:
        parts.append("--force")
    return shlex.join(str(p) for p in parts)
