"""What the partial-T1w rule does (not a test): lesions called where the T1w does not reach, with
and without the rule, on phantoms whose T1w was cut to the superior 60 % of the cord.

    python scripts/t1_coverage_effect.py [--cases 12] [--seed 9400] [--work work/t1_coverage]

For each phantom (default generator: mixed acquisitions, healthy subjects included) the T1w is
cut at 40 % of the true cord's superior-inferior extent from its lower end, keeping the superior 60 %:

- **rule** (what IMSCT does): the cut T1w as given; stage-2 probabilities are zeroed where it does
  not reach, and the output says so (``t1_missing``);
- **no rule**: the same T1w voxels on the T1w's whole grid, zero below the cut, so that the T1w
  covers the field and the network reads zeros there, as it would without the rule.

Reported per case and in total: whole-tumour volume called in the uncovered part (false where the
truth has no lesion there), the true lesion volume there, and whole-tumour Dice in the covered
part (the rule must not change it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=12)
    ap.add_argument("--seed", type=int, default=9400)
    ap.add_argument("--work", default="work/t1_coverage")
    args = ap.parse_args(argv)

    from imsct.bids import find_cases
    from imsct.cascade import Cascade
    from imsct.evaluation import truth_labelmap
    from imsct.geometry import field_overlap
    from imsct.io import InputError, Volume, load_image, load_volume, voxel_volume_mm3
    from imsct.labels import CORD_SUFFIX
    from imsct.phantoms import generate_dataset

    data = Path(args.work) / "data"
    if not (data / "participants.tsv").exists():
        generate_dataset(data, args.cases, args.seed, disc_labels=True)
    cascade = Cascade.from_models(with_anatomy=False)
    rows = []
    for case in find_cases(data)[: args.cases]:
        t2, t1 = load_image(case.t2, "T2w"), load_image(case.t1, "T1w")
        cord = load_volume(case.labels[CORD_SUFFIX]).data > 0.5
        z = (np.argwhere(cord) @ t2.affine[:3, :3].T + t2.affine[:3, 3])[:, 2]
        cut = float(z.min() + 0.4 * (z.max() - z.min()))  # the superior 60 %: above the refusal threshold of MIN_T1_COVERAGE
        t1_z = (np.argwhere(np.ones(t1.shape, bool)) @ t1.affine[:3, :3].T + t1.affine[:3, 3])[:, 2].reshape(t1.shape)
        keep = t1_z >= cut
        axis = int(np.argmax(np.abs(t1.affine[2, :3])))  # the T1w axis closest to superior-inferior
        idx = np.nonzero(keep.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        sl = [slice(None)] * 3
        sl[axis] = slice(int(idx.min()), int(idx.max()) + 1)
        lo = np.zeros(3)
        lo[axis] = idx.min()
        aff = t1.affine.copy()
        aff[:3, 3] = t1.affine[:3, :3] @ lo + t1.affine[:3, 3]
        cut_t1 = Volume(np.ascontiguousarray(t1.data[tuple(sl)]), aff, f"{t1.path} (superior part)")
        zero_t1 = Volume(np.where(keep, t1.data, 0).astype(np.float32), t1.affine, f"{t1.path} (zero below)")
        covered = field_overlap(cut_t1.shape, cut_t1.affine, t2.shape, t2.affine).numpy() > 0.5
        truth = truth_labelmap(case, t2.shape) > 0
        vox = voxel_volume_mm3(t2.affine) / 1000.0
        row = {"case": case.name, "healthy": not truth.any(), "uncovered_share": float(1 - covered.mean()),
               "truth_uncovered_cm3": float((truth & ~covered).sum() * vox)}
        try:
            cascade(t2, cut_t1)
        except InputError as exc:  # the cut T1w covers less of the box than IMSCT accepts: refused, as a user would see
            print(f"{case.name}: refused: {exc}", flush=True)
            continue
        for name, vol in (("rule", cut_t1), ("no_rule", zero_t1)):
            res = cascade(t2, vol)
            pred = res.labelmap > 0
            row[f"{name}_uncovered_cm3"] = float((pred & ~covered).sum() * vox)
            a, b = pred & covered, truth & covered
            row[f"{name}_covered_dice"] = float(2 * (a & b).sum() / (a.sum() + b.sum())) if (a.sum() + b.sum()) else None
            if name == "rule":
                row["t1_missing_reported"] = res.t1_missing is not None
        rows.append(row)
        print(f"{row['case']}: {'healthy' if row['healthy'] else 'lesion '} uncovered {row['uncovered_share']:.0%}  "
              f"called there: rule {row['rule_uncovered_cm3']:.2f} cm3, no rule {row['no_rule_uncovered_cm3']:.2f} cm3 "
              f"(truth {row['truth_uncovered_cm3']:.2f});  covered Dice rule {row['rule_covered_dice']}, "
              f"no rule {row['no_rule_covered_dice']}", flush=True)
    total = {k: float(sum(r[k] for r in rows)) for k in ("rule_uncovered_cm3", "no_rule_uncovered_cm3", "truth_uncovered_cm3")}
    total["cases"] = len(rows)
    total["t1_missing_reported"] = sum(r["t1_missing_reported"] for r in rows)
    healthy = [r for r in rows if r["healthy"]]
    total["healthy_cases"] = len(healthy)
    total["healthy_no_rule_uncovered_cm3"] = float(sum(r["no_rule_uncovered_cm3"] for r in healthy))
    total["healthy_rule_uncovered_cm3"] = float(sum(r["rule_uncovered_cm3"] for r in healthy))
    out = Path(args.work) / "effect.json"
    out.write_text(json.dumps({"cases": rows, "total": total}, indent=1))
    print(json.dumps(total, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
