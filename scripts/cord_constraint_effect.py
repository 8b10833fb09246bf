"""What the intramedullary constraint (issue 12, fix 2) changes, and on which cord region.

On held-out phantoms (seed never used for training) and, where present, on the real healthy scans of
``../shared/realdata``, each case is run once through stage 1, stage 2 (the padding-safe windows of
:mod:`imsct.windows`) and, where the models folder has it, the anatomy network; the one stage-2 result
is then post-processed several ways (the networks are not run again for that):

* ``fitted``: no constraint;
* ``fitted+constraint``: lesions must overlap the stage-1 region (a 30 mm cylinder) dilated by the
  cascade's ``cord_margin_mm``;
* ``fitted+tightM``: lesions must overlap the anatomy network's tight cord dilated by M mm.

Printed per group (healthy subjects by acquisition, lesion subjects, real scans): the whole-tumour
volume (cm3, mean and max), the share of subjects with any lesion, and for lesion subjects the Dice
of each class per variant and the true lesion voxels each constraint removed (it must stay 0).

    python scripts/cord_constraint_effect.py --healthy 20 --lesion 30
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imsct.cascade import Cascade  # noqa: E402
from imsct.io import Volume, load_volume  # noqa: E402
from imsct.labels import LABELS, SEG_SUFFIXES  # noqa: E402
from imsct.metrics import dice  # noqa: E402

# phantoms in the appearance the shipped (generator-1) weights were trained on; see tests/support/cases.py
LIKE_SHIPPED_TRAINING = {"healthy_fraction": 0.0, "random_intensity_fraction": 0.0, "acquisition": "sagittal", "storage": "int16"}
REALDATA = ROOT.parent / "shared" / "realdata"


def volume(img, what: str) -> Volume:
    return Volume(np.asarray(img.get_fdata(), np.float32), np.asarray(img.affine, float), what)


def run_case(cascade: Cascade, t2: Volume, t1: Volume | None) -> dict:
    """Label maps on the T2w grid, one per variant (see the module's docstring)."""
    w, cord_w, box = cascade.locate(t2)
    crop, _ = cascade.stage2_input(w.data, w.affine, box, t1)
    out = {"cord_found": bool(cord_w.any())}
    probs = cascade.segment_crop(crop)
    out["fitted"], _ = cascade.to_native(probs, box, w.affine, t2)
    out["fitted+constraint"], _ = cascade.to_native(probs, box, w.affine, t2, cord=cord_w)
    if cascade.anatomy is not None:
        tight, _ = cascade.tight_cord(crop[0], box, w)
        for m in TIGHT_MARGINS:
            out[f"fitted+tight{m:g}"], _ = cascade.to_native(probs, box, w.affine, t2, cord=tight, margin_mm=m)
    return out


def cm3(lab: np.ndarray, t2: Volume) -> float:
    return float((lab > 0).sum()) * t2.voxel_volume_mm3 / 1000.0


def truth_of(case) -> np.ndarray:
    lab = np.zeros(case.t2.shape[:3], np.uint8)
    for name, value in LABELS.items():
        lab[np.asarray(case.labels[SEG_SUFFIXES[name]].dataobj) > 0.5] = value
    return lab


TIGHT_MARGINS = (0.0, 2.0, 5.0)
VARIANTS = ("fitted", "fitted+constraint", *(f"fitted+tight{m:g}" for m in TIGHT_MARGINS))





def summarise_healthy(title: str, rows: list[dict]) -> None:
    print(f"\n{title} (n={len(rows)}): whole tumour (cm3) mean / max, and subjects with any lesion")
    print(f"  {'variant':<22}{'mean':>8}{'max':>8}{'any lesion':>12}")
    for v in VARIANTS:
        vals = np.array([r[v] for r in rows])
        print(f"  {v:<22}{vals.mean():>8.3f}{vals.max():>8.3f}{int((vals > 0).sum()):>8d}/{len(rows)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--healthy", type=int, default=20, help="healthy phantoms, spread over the acquisitions")
    ap.add_argument("--lesion", type=int, default=20, help="lesion phantoms (see --appearance)")
    ap.add_argument("--seed", type=int, default=9500, help="phantom seed (never used for training)")
    ap.add_argument("--max-voxels", type=int, default=400_000)
    ap.add_argument("--acquisitions", default="sagittal,iso3d,crop,axial,wholespine")
    ap.add_argument("--no-real", action="store_true", help="skip the real scans of ../shared/realdata")
    ap.add_argument("--appearance", choices=("like-shipped", "default"), default="default",
                    help="lesion phantoms: the generator's defaults, or the generator-1 appearance of the first shipped weights")
    args = ap.parse_args(argv)
    from imsct.phantoms import generate_case

    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    cascades = {False: Cascade.from_models(), True: Cascade.from_models(t2_only=True)}
    t_start = time.perf_counter()

    # healthy phantoms, two-contrast model, spread over the acquisitions
    acqs = [a for a in args.acquisitions.split(",") if a]
    healthy: dict[str, list[dict]] = {a: [] for a in acqs}
    for i in range(args.healthy):
        acq = acqs[i % len(acqs)]
        case = generate_case(args.seed, i, max_voxels=args.max_voxels, healthy_fraction=1.0, acquisition=acq)
        t2, t1 = volume(case.t2, f"{case.subject} T2w"), volume(case.t1, f"{case.subject} T1w")
        labs = run_case(cascades[False], t2, t1)
        healthy[acq].append({v: cm3(labs[v], t2) for v in VARIANTS})
    for acq, rows in healthy.items():
        if rows:
            summarise_healthy(f"healthy phantoms, {acq}", rows)
    if args.healthy:
        summarise_healthy("healthy phantoms, all", [r for rows in healthy.values() for r in rows])

    # lesion phantoms: what the constraint costs
    if args.lesion:
        classes = ["tumor", "edema", "cavity", "whole-tumor"]
        dices = {v: {c: [] for c in classes} for v in VARIANTS}
        constrained = [v for v in VARIANTS if v != "fitted"]
        lost = {v: [] for v in constrained}
        removed = {v: 0.0 for v in constrained}
        pred_wt = 0.0
        appearance = LIKE_SHIPPED_TRAINING if args.appearance == "like-shipped" else {"healthy_fraction": 0.0}
        for i in range(args.lesion):
            case = generate_case(args.seed + 1, i, max_voxels=args.max_voxels, **appearance)
            t2, t1 = volume(case.t2, f"{case.subject} T2w"), volume(case.t1, f"{case.subject} T1w")
            truth = truth_of(case)
            labs = run_case(cascades[False], t2, t1)
            variants = [v for v in VARIANTS if v in labs]
            for v in variants:
                for c in classes:
                    want = truth > 0 if c == "whole-tumor" else truth == LABELS[c]
                    got = labs[v] > 0 if c == "whole-tumor" else labs[v] == LABELS[c]
                    if want.any() or got.any():
                        dices[v][c].append(dice(got, want))
            pred_wt += cm3(labs["fitted"], t2)
            for v in constrained:
                if v in labs:
                    gone = (labs["fitted"] > 0) & (labs[v] == 0)
                    lost[v].append(int((gone & (truth > 0)).sum()))
                    removed[v] += float(gone.sum()) * t2.voxel_volume_mm3 / 1000.0
        print(f"\nlesion phantoms (n={args.lesion}, {appearance}): Dice mean +- std")
        shown = [v for v in VARIANTS if dices[v]["whole-tumor"]]
        print(f"  {'class':<14}" + "".join(f"{v:>22}" for v in shown))
        for c in classes:
            print(f"  {c:<14}" + "".join(f"{np.mean(dices[v][c]):>13.3f} +- {np.std(dices[v][c]):.3f}" for v in shown))
        for v in constrained:
            if lost[v]:
                print(f"  {v}: true lesion voxels removed {sum(lost[v])}, subjects affected {sum(n > 0 for n in lost[v])}/{args.lesion}; "
                      f"predicted whole tumour removed {removed[v]:.3f} of {pred_wt:.3f} cm3")

    if not args.no_real and REALDATA.is_dir():
        print("\nreal healthy scans (../shared/realdata): whole tumour (cm3); the T2w also given as the T1w for the two-contrast model")
        print(f"  {'scan':<22}{'model':<14}" + "".join(f"{v:>22}" for v in VARIANTS))
        for name in ("sct-t2_T2w", "pam50-small_T2w"):
            path = REALDATA / f"{name}.nii.gz"
            if not path.exists():
                continue
            t2 = load_volume(path, "T2w")
            for t2_only, label in ((False, "two-contrast"), (True, "T2w-only")):
                labs = run_case(cascades[t2_only], t2, None if t2_only else t2)
                print(f"  {name:<22}{label:<14}" + "".join(f"{cm3(labs[v], t2):>22.3f}" for v in VARIANTS))
    print(f"\n({time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
