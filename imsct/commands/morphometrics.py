"""``imsct morphometrics``: lesion count, volume, length, diameter, centroid and levels (CSV + JSON)."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = ("Lesion morphometrics per class and per connected component: count, volume, superior-inferior length, "
        "maximal equivalent diameter, centroid, vertebral levels (CSV + JSON).")
EXAMPLE = ("imsct morphometrics -i sub-001_T2w_seg-imsct.nii.gz --levels sub-001_phantom.json\n"
           "  imsct morphometrics -i sub-001_T2w_seg-tumor.nii.gz sub-001_T2w_seg-edema.nii.gz sub-001_T2w_seg-cavity.nii.gz "
           "--cord sub-001_T2w_seg-cord.nii.gz -o out/sub-001")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", "--input", nargs="+", required=True, metavar="NIFTI",
                        help="a label map (0 background, 1 tumour, 2 edema, 3 cavity; e.g. *_seg-imsct), or binary class "
                             "masks named *_seg-tumor / *_seg-edema / *_seg-cavity, all on one grid")
    parser.add_argument("--levels", metavar="JSON",
                        help="vertebral levels {\"vertebrae\": [{level, z_top_mm, z_bottom_mm}]} in world mm "
                             "(a phantom's *_phantom.json works); without it levels are not reported")
    parser.add_argument("--cord", metavar="NIFTI",
                        help="cord mask on the same grid: lengths and diameters along its centreline "
                             "(default: along the world superior axis)")
    parser.add_argument("--level-map", metavar="NIFTI",
                        help="vertebral level map on the same grid (imsct segment's *_seg-levels, or SCT's "
                             "*_seg_labeled: each cord voxel valued by its level, 2 = C2, 8 = T1); instead of --levels")
    parser.add_argument("-o", "--output", metavar="PREFIX",
                        help="writes PREFIX.csv and PREFIX.json (default: <input name>_morphometrics beside the first input)")


def __getattr__(name: str):
    """``read_labelmap`` moved to :mod:`imsct.morphometrics`; still importable from here, lazily
    (``imsct --help`` imports every command module and must stay light)."""
    if name == "read_labelmap":
        from ..morphometrics import read_labelmap

        return read_labelmap
    raise AttributeError(name)


def run(args: argparse.Namespace) -> int:

    import numpy as np

    from ..io import InputError, load_volume, same_grid
    from ..morphometrics import load_levels, measure, read_labelmap, write_tables

    levels = load_levels(args.levels) if args.levels else None
    labelmap, affine, base = read_labelmap(args.input)
    cord = None
    if args.cord:
        vol = load_volume(args.cord, "cord mask")
        if not same_grid(vol, (labelmap.shape, affine)):
            raise InputError(f"cord mask {args.cord}: grid {vol.shape} differs from the label map's {labelmap.shape} (shape or affine)")
        cord = vol.data > 0
        if not cord.any():
            raise InputError(f"cord mask {args.cord}: it is empty (no voxel > 0)")
    level_map = None
    if args.level_map:
        if levels is not None:
            raise InputError("--levels and --level-map: give one of them")
        vol = load_volume(args.level_map, "level map")
        if not same_grid(vol, (labelmap.shape, affine)):
            raise InputError(f"level map {args.level_map}: grid {vol.shape} differs from the label map's {labelmap.shape} (shape or affine)")
        level_map = np.rint(vol.data).astype(np.int16)
        if level_map.min() < 0 or level_map.max() > 29:
            raise InputError(f"level map {args.level_map}: values must be level numbers 0 to 29 (found {level_map.min()} to {level_map.max()})")
    try:
        result = measure(labelmap, affine, levels, cord, level_map=level_map)
    except InputError as exc:  # name the cord file in the library's message
        raise InputError(str(exc).replace("cord mask:", f"cord mask {args.cord}:", 1)) from None
    result["inputs"] = [str(Path(p).resolve()) for p in args.input]
    prefix = Path(args.output) if args.output else Path(f"{base}_morphometrics")
    csv_path, json_path = write_tables(result, prefix)

    print(f"axis: {result['axis']}; components: 26-connected")
    print(f"{'class':<12} {'count':>5} {'volume cm3':>10} {'length mm':>9} {'max diam mm':>11}  levels")
    for name, c in result["classes"].items():
        lv = "-" if c["levels"] is None else ",".join(c["levels"])
        print(f"{name:<12} {c['count']:>5} {c['volume_cm3']:>10.3f} {c['length_si_mm']:>9.1f} {c['max_equivalent_diameter_mm']:>11.1f}  {lv}")
    print(f"written: {csv_path.resolve()}\n         {json_path.resolve()}")
    return 0
