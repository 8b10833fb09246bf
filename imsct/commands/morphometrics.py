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
    parser.add_argument("-o", "--output", metavar="PREFIX",
                        help="writes PREFIX.csv and PREFIX.json (default: <input name>_morphometrics beside the first input)")


def _class_of(path: Path) -> str | None:
    """The class of a binary mask from its SCT suffix, ``"whole-tumor"``, or None for a label map."""
    from ..io import strip_nifti_ext
    from ..labels import SEG_SUFFIXES

    stem = strip_nifti_ext(path.name)
    for name, suffix in sorted(SEG_SUFFIXES.items(), key=lambda kv: -len(kv[1])):
        if stem.endswith(suffix):
            return name
    return None


def read_labelmap(paths: list[str]):
    """One label map from a label map or class masks on one grid: ``(labelmap, affine, base name)``."""
    import numpy as np

    from ..io import InputError, load_volume, strip_nifti_ext
    from ..labels import LABELMAP_SUFFIX, LABELS, SEG_SUFFIXES

    labelmap = affine = first = None
    owner: dict[int, Path] = {}
    for raw in paths:
        p = Path(raw)
        cls = _class_of(p)
        if cls == "whole-tumor":
            raise InputError(f"mask {p}: the whole tumour is the union of the classes; give the label map or the "
                             "tumor / edema / cavity masks instead")
        role = "label map" if cls is None else f"{cls} mask"
        vol = load_volume(p, role)
        data = vol.data
        top = max(LABELS.values()) if cls is None else 1
        if not np.array_equal(data, np.round(data)) or data.min() < 0 or data.max() > top:
            raise InputError(f"{role} {p}: values must be integers from 0 to {top} "
                             f"(found {float(data.min()):g} to {float(data.max()):g})")
        if labelmap is None:
            labelmap, affine, first = np.zeros(vol.shape, np.uint8), vol.affine, p
        elif vol.shape != labelmap.shape or not np.allclose(vol.affine, affine, atol=1e-3):
            raise InputError(f"{p}: grid {vol.shape} differs from {first}'s {labelmap.shape} (shape or affine); "
                             "all inputs must be on one grid")
        values = data.astype(np.uint8) if cls is None else (data > 0).astype(np.uint8) * LABELS[cls]
        overlap = (labelmap > 0) & (values > 0)
        if overlap.any():
            other = owner.get(int(labelmap[overlap][0]), first)
            raise InputError(f"{p}: {int(overlap.sum())} voxels are also labelled in {other}; classes must not overlap")
        labelmap[values > 0] = values[values > 0]
        for v in np.unique(values[values > 0]):
            owner[int(v)] = p
    name = strip_nifti_ext(first.name)
    for suffix in (LABELMAP_SUFFIX, *SEG_SUFFIXES.values()):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return labelmap, affine, first.parent / name


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..io import InputError, load_volume
    from ..morphometrics import load_levels, measure, write_tables

    levels = load_levels(args.levels) if args.levels else None
    labelmap, affine, base = read_labelmap(args.input)
    cord = None
    if args.cord:
        vol = load_volume(args.cord, "cord mask")
        if vol.shape != labelmap.shape or not np.allclose(vol.affine, affine, atol=1e-3):
            raise InputError(f"cord mask {args.cord}: grid {vol.shape} differs from the label map's {labelmap.shape} (shape or affine)")
        cord = vol.data > 0
        if not cord.any():
            raise InputError(f"cord mask {args.cord}: it is empty (no voxel > 0)")
    try:
        result = measure(labelmap, affine, levels, cord)
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
