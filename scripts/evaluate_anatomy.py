"""Cord mask and vertebral levels of the cascade on held-out phantoms, against the generator's truth.

    python scripts/evaluate_anatomy.py --models bundle/models --data work/anatomy/heldout --cases 24 --seed 9200

Per case (two-contrast cascade with the anatomy network, as ``imsct segment`` runs it):

- **cord Dice** of ``_seg-cord`` against the phantom's tight cord;
- **discs**: each true disc whose centreline point lies on the true cord and in the field is
  *detected* when a found disc lies within 10 mm of it, and *correctly numbered* when that disc
  carries its number; accuracy is reported overall and per numbering method (top of column,
  conus, spacing), since they differ in what they can know;
- **length along the cord**: the whole tumour's true mask measured along the found cord and along
  the true cord (:func:`imsct.morphometrics.measure`); the difference is the axis error.

Writes ``OUT/cases.json`` and ``OUT/summary.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MATCH_MM = 10.0


def evaluate_case(cascade, case) -> dict:
    from imsct.io import load_image, load_volume
    from imsct.labels import CORD_SUFFIX, SEG_SUFFIXES
    from imsct.metrics import dice
    from imsct.morphometrics import measure

    t2, t1 = load_image(case.t2, "T2w"), load_image(case.t1, "T1w")
    res = cascade(t2, t1)
    a = res.anatomy
    info = json.loads(Path(str(case.labels[CORD_SUFFIX]).replace("_T2w_seg-cord.nii.gz", "_phantom.json")).read_text())
    cord_true = load_volume(case.labels[CORD_SUFFIX], "cord").data > 0.5
    row = {"case": case.name, "coverage": info["coverage"], "acquisition": info["acquisition"],
           "cord_dice": dice(a.cord > 0, cord_true), "method": a.summary["method"], "certain": a.summary["certain"]}
    found = [(np.asarray(d["world_mm"]), d["label"]) for d in a.summary["discs"]]
    inv = np.linalg.inv(t2.affine)
    truth = []
    for d in info["discs"]:
        if not d["in_field"]:
            continue
        ijk = np.rint(inv[:3, :3] @ np.asarray(d["world_mm"]) + inv[:3, 3]).astype(int)
        lo, hi = np.maximum(ijk - 2, 0), ijk + 3  # on the cord: within 2 voxels of the true cord mask
        if cord_true[tuple(slice(x, y) for x, y in zip(lo, hi))].any():
            truth.append((np.asarray(d["world_mm"]), d["label"]))
    detected = correct = 0
    for w, label in truth:
        if not found:
            break
        dist = [np.linalg.norm(w - f) for f, _ in found]
        k = int(np.argmin(dist))
        if dist[k] <= MATCH_MM:
            detected += 1
            correct += int(found[k][1] == label)
    row.update(discs_true=len(truth), discs_found=len(found), discs_detected=detected, discs_correct=correct)
    whole = load_volume(case.labels[SEG_SUFFIXES["whole-tumor"]], "whole tumour").data > 0.5
    if whole.any() and (a.cord > 0).sum() > 50:
        lab = whole.astype(np.uint8)
        m_found = measure(lab, t2.affine, cord=a.cord > 0)["classes"]["whole-tumor"]["length_si_mm"]
        m_true = measure(lab, t2.affine, cord=cord_true)["classes"]["whole-tumor"]["length_si_mm"]
        row.update(length_found_cord_mm=m_found, length_true_cord_mm=m_true, length_error_mm=m_found - m_true)
    return row


def evaluate(models: Path, data: Path, cases: int, seed: int, out: Path) -> dict:
    from imsct.bids import find_cases
    from imsct.cascade import Cascade
    from imsct.phantoms import generate_dataset

    if not (data / "participants.tsv").exists():
        generate_dataset(data, cases, seed, progress=True, disc_labels=True)
    cascade = Cascade.from_models(models)
    if cascade.anatomy is None:
        raise SystemExit(f"{models}: no anatomy model (anatomy.pt) to evaluate")
    rows = []
    for case in find_cases(data)[:cases]:
        rows.append(evaluate_case(cascade, case))
        r = rows[-1]
        print(f"{r['case']} {r['coverage']:>8} cord Dice {r['cord_dice']:.3f}  discs {r['discs_correct']}/{r['discs_true']} "
              f"correct ({r['discs_detected']} detected, {r['method']})", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cases.json").write_text(json.dumps(rows, indent=1))
    dice = np.array([r["cord_dice"] for r in rows])
    n_true = sum(r["discs_true"] for r in rows)
    summary = {"cases": len(rows), "seed": seed, "cord_dice_mean": float(dice.mean()), "cord_dice_std": float(dice.std()),
               "disc_detection_rate": sum(r["discs_detected"] for r in rows) / max(n_true, 1),
               "disc_level_accuracy": sum(r["discs_correct"] for r in rows) / max(n_true, 1), "discs_true": n_true,
               "by_method": {}}
    for m in sorted({r["method"] for r in rows}):
        sel = [r for r in rows if r["method"] == m]
        n = sum(r["discs_true"] for r in sel)
        summary["by_method"][m] = {"cases": len(sel), "discs_true": n,
                                   "disc_level_accuracy": sum(r["discs_correct"] for r in sel) / max(n, 1)}
    errs = np.array([r["length_error_mm"] for r in rows if "length_error_mm" in r])
    if errs.size:
        summary.update(length_error_mm_mean=float(errs.mean()), length_abs_error_mm_mean=float(np.abs(errs).mean()),
                       length_cases=int(errs.size))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=str(ROOT / "bundle" / "models"))
    ap.add_argument("--data", default="work/anatomy/heldout")
    ap.add_argument("--cases", type=int, default=24)
    ap.add_argument("--seed", type=int, default=9200)
    ap.add_argument("--out", default="work/anatomy/heldout_eval")
    args = ap.parse_args(argv)
    evaluate(Path(args.models), Path(args.data), args.cases, args.seed, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
