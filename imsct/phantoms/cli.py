"""Command-line options of generator v2 (issue 17), shared by ``python -m imsct.phantoms`` and,
once :mod:`imsct.commands.phantoms` calls them, ``imsct phantoms``:

    add_arguments(parser)   # the v1 options (imsct.commands.phantoms) plus the v2 ones
    run(args)               # validates and calls imsct.phantoms.generate_dataset with all of them
"""

from __future__ import annotations

import argparse

from .render import ACQUISITIONS, STORAGES


def add_v2_arguments(parser: argparse.ArgumentParser) -> None:
    from . import DEFAULT_HEALTHY_FRACTION, DEFAULT_RANDOM_INTENSITY_FRACTION, GENERATOR_VERSION

    parser.add_argument("--healthy-fraction", type=float, default=DEFAULT_HEALTHY_FRACTION, metavar="F",
                        help=f"share of subjects without lesion (empty lesion masks, tumor_type none; default "
                             f"{DEFAULT_HEALTHY_FRACTION}; 0 gives every subject a lesion; ignored with --followup)")
    parser.add_argument("--random-intensity-fraction", type=float, default=DEFAULT_RANDOM_INTENSITY_FRACTION, metavar="F",
                        help=f"share of subjects with fully random tissue intensities (default {DEFAULT_RANDOM_INTENSITY_FRACTION})")
    parser.add_argument("--acquisition", choices=("mixed",) + ACQUISITIONS, default="mixed",
                        help="T2w acquisition: 2D sagittal, 3D isotropic, small research crop, axial (slices along the "
                             "cord), whole spine, or a mix of them (default)")
    parser.add_argument("--storage", choices=("mixed",) + STORAGES, default="mixed",
                        help="image data type on disk (default mixed)")
    parser.add_argument("--gm-mask", action="store_true", help="also write the grey-matter label _seg-gm")
    parser.add_argument("--generator-version", choices=("1", GENERATOR_VERSION), default=GENERATOR_VERSION,
                        help=f"1: the frozen v1 generator (byte-identical v1 phantoms; v2 options ignored); default {GENERATOR_VERSION}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..commands import phantoms as command

    command.add_arguments(parser)
    if not any(a.dest == "healthy_fraction" for a in parser._actions):
        add_v2_arguments(parser)


def v2_kwargs(args: argparse.Namespace) -> dict:
    from . import DEFAULT_HEALTHY_FRACTION, DEFAULT_RANDOM_INTENSITY_FRACTION, GENERATOR_VERSION

    return {
        "healthy_fraction": getattr(args, "healthy_fraction", DEFAULT_HEALTHY_FRACTION),
        "random_intensity_fraction": getattr(args, "random_intensity_fraction", DEFAULT_RANDOM_INTENSITY_FRACTION),
        "acquisition": getattr(args, "acquisition", "mixed"), "storage": getattr(args, "storage", "mixed"),
        "gm_mask": bool(getattr(args, "gm_mask", False)),
        "generator_version": getattr(args, "generator_version", GENERATOR_VERSION),
    }


def run(args: argparse.Namespace) -> int:
    from ..io import InputError
    from . import generate_dataset

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
    kw = v2_kwargs(args)
    for name in ("healthy_fraction", "random_intensity_fraction"):
        if not 0.0 <= kw[name] <= 1.0:
            raise InputError(f"--{name.replace('_', '-')} {kw[name]}: must be between 0 and 1")
    generate_dataset(
        args.out, args.cases, args.seed, start=args.start, progress=not args.quiet, max_voxels=args.max_voxels,
        misalign_t1=tuple(args.misalign_t1) if args.misalign_t1 else None, followup_years=args.followup,
        growth=args.growth, motion=tuple(args.motion), **kw,
    )
    return 0
