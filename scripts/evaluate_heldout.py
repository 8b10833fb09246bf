"""Evaluate the cascade on held-out phantoms (seeds never used in training).

    python scripts/evaluate_heldout.py --models bundle/models --cases 20 --seed 9000 --out work/heldout_eval

Generates the phantoms if needed, then writes metrics.csv and summary.json (every Table-4 metric
per class, stage-1 Dice, lesions inside the stage-1 box) and prints the summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from imsct.evaluation import CohortEvaluator  # noqa: E402
from imsct.phantoms import generate_dataset  # noqa: E402
from imsct.cascade import Cascade  # noqa: E402
from imsct.labels import REPORT_ORDER  # noqa: E402


def evaluate(models, data_dir, cases: int, seed: int, out_dir=None, t2_only: bool = False, backend: str = "auto",
             precision: str = "auto", fit_field: bool = True, phantoms: dict | None = None) -> dict:
    data_dir = Path(data_dir)
    if not (data_dir / "participants.tsv").exists():
        generate_dataset(data_dir, cases, seed, **(phantoms or {}))
    cascade = Cascade.from_models(models, t2_only=t2_only, backend=backend, precision=precision, fit_field=fit_field)
    print(f"backend {cascade.backend}, fit_field {cascade.fit_field}", flush=True)
    ev = CohortEvaluator(cascade, str(data_dir), str(out_dir or data_dir.parent / (data_dir.name + "_eval")))
    summary = ev.run()
    keys = [f"{c}_dice_mean" for c in REPORT_ORDER] + ["stage1_dice_mean", "lesion_voxels_in_box", "subjects_lesions_fully_in_box",
                                                      "healthy_cases", "healthy_no_lesion_fraction", "healthy_fp_whole_cm3_mean",
                                                      "seconds_per_case_mean"]
    print(json.dumps({k: (round(summary[k], 4) if isinstance(summary[k], float) else summary[k]) for k in keys}))
    return summary


def main(argv=None) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=str(ROOT / "bundle" / "models"))
    ap.add_argument("--data", default="work/heldout")
    ap.add_argument("--out", default=None)
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--seed", type=int, default=9000)
    ap.add_argument("--t2-only", action="store_true", help="the T2w-only network, T1w ignored")
    ap.add_argument("--backend", default="auto", help="auto (default), eager, openvino, torchscript, onnx")
    ap.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16"))
    ap.add_argument("--full-field", action="store_true", help="the localiser on the full 512x256x32 field")
    ap.add_argument("--like-shipped-training", action="store_true",
                    help="generate phantoms in the appearance the shipped weights were trained on (lesions, paper contrasts, 2D sagittal)")
    args = ap.parse_args(argv)
    phantoms = ({"healthy_fraction": 0.0, "random_intensity_fraction": 0.0, "acquisition": "sagittal", "storage": "int16"}
                if args.like_shipped_training else None)
    evaluate(args.models, args.data, args.cases, args.seed, args.out, args.t2_only, args.backend, args.precision,
             not args.full_field, phantoms)
    return 0


if __name__ == "__main__":
    sys.exit(main())
