"""``imsct phantoms``: write two-contrast IMSCT phantoms (T2w + Gd-T1w, truth labels) in a BIDS layout."""

from __future__ import annotations

import argparse

HELP = "Generate two-contrast IMSCT phantoms (T2w + Gd-T1w, truth labels) in a BIDS layout."
EXAMPLE = ("imsct phantoms --out data/phantoms --cases 5 --seed 1\n"
           "  imsct phantoms --out data/followup --cases 2 --followup 1.5 --growth 1.8   (two sessions per subject)\n"
           "  imsct phantoms --out data/moved --cases 2 --misalign-t1 4 3   (T1w moved 4 mm, 3 deg; header not)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output BIDS folder")
    parser.add_argument("--cases", type=int, default=1, help="number of subjects (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--start", type=int, default=0, help="index of the first subject (default 0)")
    parser.add_argument("--max-voxels", type=int, default=6_000_000,
                        help="largest T2w matrix; smaller values shrink the in-plane field of view (default 6000000)")
    parser.add_argument("--followup", type=float, metavar="YEARS",
                        help="write two sessions per subject (ses-01, ses-02) YEARS apart: lesions grown, patient "
                             "moved, new acquisition grid; dates in the sidecar JSON and sub-XXX_sessions.tsv")
    parser.add_argument("--growth", type=float, default=1.5, metavar="G",
                        help="with --followup: each lesion's tumour volume x G at visit 2 (edema and cavity scaled "
                             "alike; default 1.5)")
    parser.add_argument("--motion", type=float, nargs=2, default=(5.0, 4.0), metavar=("MM", "DEG"),
                        help="with --followup: rigid patient motion between visits (default 5 mm, 4 deg)")
    parser.add_argument("--misalign-t1", type=float, nargs=2, metavar=("MM", "DEG"),
                        help="the T1w shows the patient moved by MM and DEG (rigid) while its header does not; "
                             "the truth is in the phantom JSON (t1_motion)")
    parser.add_argument("--quiet", action="store_true", help="print nothing per subject")
    from ..phantoms import ACQUISITIONS, DEFAULT_HEALTHY_FRACTION, DEFAULT_RANDOM_INTENSITY_FRACTION, STORAGES

    parser.add_argument("--healthy-fraction", type=float, default=DEFAULT_HEALTHY_FRACTION, metavar="F",
                        help=f"share of subjects without lesion (empty lesion masks, tumor_type none; default "
                             f"{DEFAULT_HEALTHY_FRACTION}; 0 gives every subject a lesion; ignored with --followup)")
    parser.add_argument("--random-intensity-fraction", type=float, default=DEFAULT_RANDOM_INTENSITY_FRACTION, metavar="F",
                        help=f"share of subjects with fully random tissue intensities (default {DEFAULT_RANDOM_INTENSITY_FRACTION})")
    parser.add_argument("--acquisition", choices=("mixed",) + tuple(ACQUISITIONS), default="mixed",
                        help="T2w acquisition: 2D sagittal, 3D isotropic, small research crop, axial (slices along the "
                             "cord), whole spine, or a mix of them (default)")
    parser.add_argument("--storage", choices=("mixed",) + tuple(STORAGES), default="mixed",
                        help="image data type on disk (default mixed)")
    parser.add_argument("--gm-mask", action="store_true", help="also write the grey-matter label _seg-gm")
    parser.add_argument("--disc-labels", action="store_true",
                        help="also write the disc tissue _seg-discs and the disc labels _label-discs (one voxel per disc on "
                             "the cord, valued by its number, 3 = C2/C3): the truth of the cord-and-levels network")


def run(args: argparse.Namespace) -> int:
    from ..io import InputError
    from ..phantoms import generate_dataset

    if args.cases < 1:
        raise InputError(f"--cases {args.cases}: must be at least 1")
    if args.max_voxels < 10_000:
        raise InputError(f"--max-voxels {args.max_voxels}: too small for a phantom (at least 10000)")
    if args.followup is not None and args.followup <= 0:
        raise InputError(f"--followup {args.followup}: years between visits must be positive")
    if args.growth <= 0:
        raise InputError(f"--growth {args.growth}: must be positive (1 = no change, 2 = volume doubled)")
    if args.followup is not None and args.misalign_t1 is not None:
        raise InputError("--followup and --misalign-t1: choose one (follow-up visits keep their T1w aligned)")
    for name in ("healthy_fraction", "random_intensity_fraction"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise InputError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be between 0 and 1")
    generate_dataset(
        args.out, args.cases, args.seed, start=args.start, progress=not args.quiet, max_voxels=args.max_voxels,
        misalign_t1=tuple(args.misalign_t1) if args.misalign_t1 else None, followup_years=args.followup,
        growth=args.growth, motion=tuple(args.motion), healthy_fraction=args.healthy_fraction,
        random_intensity_fraction=args.random_intensity_fraction, acquisition=args.acquisition, storage=args.storage,
        gm_mask=args.gm_mask, disc_labels=args.disc_labels,
    )
    return 0
