"""Evaluate the cascade on held-out phantoms (seeds never used in training).

    python scripts/evaluate_heldout.py --models bundle/models --cases 20 --seed 9000

Prints per-class Dice (tumour, edema, cavity, whole tumour) and the share of lesion voxels inside
the stage-1 box, and returns them as a dict.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imsct.bids import find_cases  # noqa: E402
from imsct.geometry import to_working  # noqa: E402
from imsct.io import load_volume  # noqa: E402
from imsct.labels import SEG_SUFFIXES  # noqa: E402
from imsct.metrics import box_coverage, case_metrics  # noqa: E402
from imsct.phantoms import generate_dataset  # noqa: E402
from imsct.runner import build_cascade  # noqa: E402


def evaluate(models, data_dir, cases: int, seed: int) -> dict:
    data_dir = Path(data_dir)
    if not (data_dir / "participants.tsv").exists():
        generate_dataset(data_dir, cases, seed)
    cascade = build_cascade(Path(models))
    per_case, times = [], []
    lesion_in, lesion_total = 0, 0
    for case in find_cases(data_dir)[:cases]:
        t2, t1 = load_volume(case.t2, "T2w"), load_volume(case.t1, "T1w")
        t0 = time.perf_counter()
        res = cascade(t2, t1)
        times.append(time.perf_counter() - t0)
        truth = np.zeros(t2.shape, np.uint8)
        for value, name in enumerate(("tumor", "edema", "cavity"), start=1):
            truth[load_volume(case.labels[SEG_SUFFIXES[name]], name).data > 0.5] = value
        row = {"case": case.name, **case_metrics(res.labelmap, truth, t2.voxel_volume_mm3)}
        for name in SEG_SUFFIXES:
            row[name] = row[f"{name}_dice"]
            row[f"{name}_present"] = row[f"{name}_n_true"] > 0
        wt = load_volume(case.labels[SEG_SUFFIXES["whole-tumor"]], "whole tumour").data > 0.5
        wt_w = to_working(wt.astype(np.uint8), t2.affine, res.working_shape, res.working_affine, label=True) > 0
        lo, hi = res.box_working
        lesion_in += int(np.count_nonzero(wt_w[tuple(slice(a, b) for a, b in zip(lo, hi))]))
        lesion_total += int(np.count_nonzero(wt_w))
        row["box_coverage"] = box_coverage(wt_w, lo, hi)
        per_case.append(row)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k == "case" or k.endswith("_dice") or k == "box_coverage"}), flush=True)
    summary = {"cases": len(per_case), "seed": seed, "mean_case_s": round(float(np.mean(times)), 2)}
    for name in SEG_SUFFIXES:
        vals = [r[name] for r in per_case if r[f"{name}_present"]]  # Dice over cases that have the class
        summary[f"dice_{name}"] = round(float(np.mean(vals)), 4) if vals else None
        summary[f"n_{name}"] = len(vals)
    for metric in ("precision", "recall", "rvd", "avd", "tpr_detection", "fpr_detection"):
        for name in SEG_SUFFIXES:
            vals = [r[f"{name}_{metric}"] for r in per_case if not np.isnan(r[f"{name}_{metric}"])]
            summary[f"{metric}_{name}"] = round(float(np.mean(vals)), 4) if vals else None
    summary["lesion_voxels_in_box"] = round(lesion_in / max(lesion_total, 1), 4)
    summary["subjects_fully_in_box"] = round(float(np.mean([r["box_coverage"] >= 1.0 for r in per_case])), 4)
    print(json.dumps(summary))
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=str(ROOT / "bundle" / "models"))
    ap.add_argument("--data", default="work/heldout")
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--seed", type=int, default=9000)
    args = ap.parse_args(argv)
    evaluate(args.models, args.data, args.cases, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
