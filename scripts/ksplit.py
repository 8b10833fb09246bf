"""k random splits (train, evaluate) reported as mean +- std per class, like Table 4 of the paper.

    python scripts/ksplit.py --data work/ksplit/data --cases 40 --seed 2000 --k 3 \
        --epochs1 10 --epochs2 20 --out work/ksplit

For each split, the labelled cases are shuffled with seed ``seed + split``, ``--test-fraction`` of
them held out, both stages trained on the rest through the bundle's train.json (datalist mode), and
the cascade evaluated on the held-out part. Writes ``results.json`` and prints a table of
mean +- std over splits for every metric and class.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bundle_train import start_bundle_training  # noqa: E402

CLASSES = ("tumor", "edema", "cavity", "whole-tumor")
METRICS = ("dice", "tpr_detection", "fpr_detection", "precision", "recall", "avd", "rvd")


def datalist_entry(case) -> dict:
    return {"t2": str(case.t2.resolve()), "t1": str(case.t1.resolve()), "labels": {k: str(v.resolve()) for k, v in case.labels.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="work/ksplit/data")
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--seed", type=int, default=2000)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--test-fraction", type=float, default=0.2)
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--epochs1", type=int, default=10)
    ap.add_argument("--epochs2", type=int, default=20)
    ap.add_argument("--samples1", type=int, default=20)
    ap.add_argument("--samples2", type=int, default=40)
    ap.add_argument("--patch1", default="[256, 128, 32]")
    ap.add_argument("--patch2", default="[96, 96, 32]")
    ap.add_argument("--batch1", type=int, default=2)
    ap.add_argument("--batch2", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per training process (both stages run at once)")
    ap.add_argument("--out", default="work/ksplit")
    args = ap.parse_args(argv)

    from imsct.bids import find_cases
    from imsct.cascade import Cascade
    from imsct.evaluation import evaluate_case, summarise, write_report
    from imsct.networks import localiser, tumour_network
    from imsct.phantoms import generate_dataset
    from imsct.training import load_weights

    data, out = Path(args.data), Path(args.out)
    if not (data / "participants.tsv").exists():
        generate_dataset(data, args.cases, args.seed, progress=True)
    cases = [c for c in find_cases(data) if c.labels]
    splits = []
    for split in range(args.k):
        order = np.random.default_rng(args.seed + split).permutation(len(cases))
        n_test = max(1, int(round(args.test_fraction * len(cases))))
        n_val = max(1, int(round(args.val_fraction * len(cases))))
        test = [cases[i] for i in order[:n_test]]
        val = [cases[i] for i in order[n_test:n_test + n_val]]
        train = [cases[i] for i in order[n_test + n_val:]]
        sdir = out / f"split{split}"
        sdir.mkdir(parents=True, exist_ok=True)
        datalist = sdir / "datalist.json"
        datalist.write_text(json.dumps({"training": [datalist_entry(c) for c in train], "validation": [datalist_entry(c) for c in val]}, indent=1))
        procs = []
        for stage, epochs, samples, patch, batch in ((1, args.epochs1, args.samples1, args.patch1, args.batch1),
                                                     (2, args.epochs2, args.samples2, args.patch2, args.batch2)):
            proc, _ = start_bundle_training(
                sdir / f"stage{stage}.log", args.threads, datalist=datalist, output_dir=sdir / f"stage{stage}",
                cache_dir=out / "cache", stage=stage, epochs=epochs, samples_per_epoch=samples, patch_size=patch,
                batch_size=batch, val_interval=max(1, epochs // 4), seed=args.seed + split)
            procs.append(proc)
        if any(p.wait() != 0 for p in procs):
            print(f"split {split}: training failed, see {sdir}/stage*.log", file=sys.stderr)
            return 1
        cascade = Cascade(load_weights(localiser(), sdir / "stage1" / "best.pt"), load_weights(tumour_network(), sdir / "stage2" / "best.pt"))
        rows = [evaluate_case(cascade, c)[0] for c in test]
        summary = summarise(rows)
        write_report(rows, summary, sdir / "eval")
        splits.append(summary)
        print(f"split {split}: whole tumour Dice {summary['whole-tumor_dice_mean']}", flush=True)

    table: dict = {}
    for metric in METRICS:
        for c in CLASSES:
            vals = [s[f"{c}_{metric}_mean"] for s in splits if s[f"{c}_{metric}_mean"] is not None]
            table[f"{c}_{metric}"] = {"mean": float(np.mean(vals)) if vals else None, "std": float(np.std(vals)) if vals else None, "splits": len(vals)}
    for key in ("stage1_dice_mean", "lesion_voxels_in_box", "subjects_lesions_fully_in_box"):
        vals = [s[key] for s in splits if s[key] is not None]
        table[key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "splits": len(vals)}
    (out / "results.json").write_text(json.dumps({"settings": vars(args), "table": table, "splits": splits}, indent=1))
    print("metric            " + "  ".join(f"{c:>16}" for c in CLASSES))
    for metric in METRICS:
        cells = []
        for c in CLASSES:
            t = table[f"{c}_{metric}"]
            cells.append("n/a".rjust(16) if t["mean"] is None else f"{100 * t['mean']:6.1f} +- {100 * t['std']:4.1f}".rjust(16))
        print(f"{metric:<18}" + "  ".join(cells))
    print(f"stage-1 Dice {100 * table['stage1_dice_mean']['mean']:.1f} +- {100 * table['stage1_dice_mean']['std']:.1f}; "
          f"subjects with all lesions in the box {100 * table['subjects_lesions_fully_in_box']['mean']:.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
