"""Train the T2w-only stage-2 network that ``--t2-only`` runs when a case has no Gd-T1w.

    python scripts/train_t2only.py --work work/shipped --epochs 15 --samples 40 --batch 4

Fine-tunes the shipped two-contrast network (model 'tumor' of imsct.weights) through the bundle's
train.json with ``--t1_dropout 1.0`` (the T1w channel is always zero, as inference without T1w
feeds it) on the same training phantoms and split as the shipped weights, copies the best
checkpoint as model 'tumor_t2only' in bundle/models/, then evaluates both the two-contrast and the T2w-only
cascade on the same held-out phantoms and records everything in
bundle/models/provenance_t2only.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from bundle_train import parse_log, start_bundle_training  # noqa: E402

from imsct import weights  # noqa: E402
from imsct.labels import REPORT_ORDER as KEYS  # noqa: E402

WEIGHTS = {"two_contrast": weights.spec("tumor").filename, "t2_only": weights.spec("tumor_t2only").filename}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="work/shipped", help="folder of train_shipped.py (train/, cache/, heldout/)")
    ap.add_argument("--models", default=str(ROOT / "bundle" / "models"))
    ap.add_argument("--seed", type=int, default=1000, help="split seed (the shipped weights' seed)")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--samples", type=int, default=40, help="patches per epoch")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--patch", default="[96, 96, 32]")
    ap.add_argument("--val-interval", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-cases", type=int, default=20)
    ap.add_argument("--eval-seed", type=int, default=9000)
    ap.add_argument("--skip-train", action="store_true", help="only (re-)evaluate the existing T2w-only weights")
    args = ap.parse_args(argv)

    work, models = Path(args.work), Path(args.models)
    record_path = models / "provenance_t2only.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    if not args.skip_train:
        out, log = work / "stage2_t2only", work / "stage2_t2only.log"
        t0 = time.time()
        proc, cmd = start_bundle_training(
            log, args.threads, dataset_dir=work / "train", output_dir=out, cache_dir=work / "cache", stage=2,
            finetune=True, finetune_ckpt=weights.path("tumor", models), t1_dropout=1.0, seed=args.seed, val_fraction=args.val_fraction,
            val_interval=args.val_interval, epochs=args.epochs, samples_per_epoch=args.samples, batch_size=args.batch,
            patch_size=args.patch)
        print(f"training, log in {log}", flush=True)
        if proc.wait() != 0:
            print(f"training failed; see {log}", file=sys.stderr)
            return 1
        weights.save_weights(weights.load("tumor_t2only", file=out / "best.pt"), weights.path("tumor_t2only", models))
        record = {
            "command": "python scripts/train_t2only.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "start": f"bundle/models/{WEIGHTS['two_contrast']} (the shipped two-contrast network), fine-tuned with the T1w channel always zero",
            "training_data": f"{work / 'train'} (python -m imsct.phantoms --cases 80 --seed 1000, as for {WEIGHTS['two_contrast']}), split seed {args.seed}",
            "bundle_command": " ".join(cmd), "threads": args.threads, "wall_s": round(time.time() - t0, 1),
            "selected": "best.pt (highest validation mean Dice, T1w zeroed)", **parse_log(log.read_text()),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        }
        record_path.write_text(json.dumps(record, indent=1))
    if args.eval_cases:
        heldout = {}
        for mode in ("two_contrast", "t2_only"):
            out = work / f"heldout_eval_{mode}"
            if (out / "summary.json").exists() and (out / "summary.json").stat().st_mtime > (models / WEIGHTS[mode]).stat().st_mtime:
                print(f"{mode}: reusing {out / 'summary.json'} (newer than {WEIGHTS[mode]})")
            else:
                cmd = [sys.executable, str(ROOT / "scripts" / "evaluate_heldout.py"), "--models", str(models),
                       "--data", str(work / "heldout"), "--cases", str(args.eval_cases), "--seed", str(args.eval_seed), "--out", str(out)]
                if mode == "t2_only":
                    cmd.append("--t2-only")
                subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS=str(max(args.threads, 1))))
            summary = json.loads((out / "summary.json").read_text())["summary"]
            heldout[mode] = {k: v for k, v in summary.items() if k.endswith(("_mean", "_std", "_n")) or "box" in k}
        record["heldout"] = {"cases": args.eval_cases, "seed": args.eval_seed, **heldout}
        record_path.write_text(json.dumps(record, indent=1))
        print("| class (subjects) | two-contrast Dice | T2w-only Dice |\n|---|---|---|")
        for k in KEYS:
            a, b = heldout["two_contrast"], heldout["t2_only"]
            print(f"| {k} ({a[f'{k}_dice_n']}) | {a[f'{k}_dice_mean']:.3f} ± {a[f'{k}_dice_std']:.3f} "
                  f"| {b[f'{k}_dice_mean']:.3f} ± {b[f'{k}_dice_std']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
