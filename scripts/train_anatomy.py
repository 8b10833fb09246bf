"""Train the anatomy network (model 'anatomy': tight spinal cord and intervertebral discs) that gives
``imsct segment`` its cord mask and vertebral levels, and record how.

    python scripts/train_anatomy.py --work work/anatomy            # generate, train, evaluate
    python scripts/train_anatomy.py --work work/anatomy --resume   # continue a stopped training

Steps: phantoms with disc truth (``imsct phantoms --disc-labels``, seed ``--seed``) in
``WORK/train``; training through the bundle's train.json as stage 3 (cord-centred [T2w] patches in
the true cord box, Dice loss on [cord, discs], validation Dice on whole boxes every
``--val-interval`` epochs, stopping after ``--patience`` validations without gain); the best
checkpoint saved as ``bundle/models/anatomy.pt``; evaluation on held-out phantoms of
``--eval-seed`` (:mod:`evaluate_anatomy`); everything in ``bundle/models/provenance_anatomy.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bundle_train import bundle_train_command, parse_log, start_bundle_training, training_wall_s  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="work/anatomy")
    ap.add_argument("--models", default=str(ROOT / "bundle" / "models"))
    ap.add_argument("--cases", type=int, default=48)
    ap.add_argument("--seed", type=int, default=3000, help="phantom and split seed (never used by the held-out set)")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=400)
    ap.add_argument("--samples", type=int, default=32, help="patches per epoch")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--patch", default="[128, 128, 32]")
    ap.add_argument("--val-interval", type=int, default=5)
    ap.add_argument("--patience", type=int, default=6, help="validations without improvement before stopping")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in WORK/stage3")
    ap.add_argument("--finetune", metavar="PT", help="start from these anatomy weights (e.g. bundle/models/anatomy.pt)")
    ap.add_argument("--lr", type=float, default=1e-3, help="learning rate (cosine-annealed over --epochs)")
    ap.add_argument("--no-train", action="store_true", help="collect and evaluate an existing WORK/stage3/best.pt")
    ap.add_argument("--eval-cases", type=int, default=24)
    ap.add_argument("--eval-seed", type=int, default=9200)
    args = ap.parse_args(argv)

    from imsct import weights
    from imsct.phantoms import GENERATOR_VERSION, generate_dataset
    from imsct.training import split_cases

    work, models = Path(args.work), Path(args.models)
    work.mkdir(parents=True, exist_ok=True)
    data, cache, log, out = work / "train", work / "cache", work / "stage3.log", work / "stage3"
    this_command = "python scripts/train_anatomy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with open(work / "commands.txt", "a") as fh:
        fh.write(this_command + "\n")
    # read before anything is written: the starting weights may be the file this run replaces
    origin = finetune_origin(Path(args.finetune), models / "provenance_anatomy.json") if args.finetune else None
    t0 = time.time()
    if not (data / "participants.tsv").exists():
        generate_dataset(data, args.cases, args.seed, progress=True, disc_labels=True)
    gen_s = round(time.time() - t0, 1)
    split_cases(data, None, cache, args.val_fraction, args.seed)  # cache once, before training reads it
    plan = dict(dataset_dir=data, output_dir=out, cache_dir=cache, stage=3, seed=args.seed, val_fraction=args.val_fraction,
                val_interval=args.val_interval, early_stop_patience=args.patience, epochs=args.epochs,
                samples_per_epoch=args.samples, batch_size=args.batch, patch_size=args.patch)
    if args.lr != 1e-3:
        plan["learning_rate"] = args.lr
    if args.finetune:
        plan.update(finetune=True, finetune_ckpt=Path(args.finetune).resolve())
    if args.resume:
        plan["resume"] = True
    cmd = bundle_train_command(**plan)
    if not args.no_train:
        proc, cmd = start_bundle_training(log, args.threads, append=args.resume, **plan)
        print(f"training, log in {log}", flush=True)
        if proc.wait() != 0:
            print(f"training failed; see {log}", file=sys.stderr)
            return 1
    weights.save_weights(weights.load("anatomy", file=out / "best.pt"), weights.path("anatomy", models))
    text = log.read_text()
    record = {
        "command": this_command,
        "commands": (work / "commands.txt").read_text().splitlines(),
        "training_data": {"generator": f"imsct phantoms --out {data} --cases {args.cases} --seed {args.seed} --disc-labels",
                          "generator_version": GENERATOR_VERSION, "cases": args.cases, "seed": args.seed,
                          "validation_fraction": args.val_fraction, "generation_s": gen_s},
        "bundle_command": " ".join(cmd), "threads": args.threads, "wall_s": training_wall_s(text),
        "selected": "best.pt (highest validation mean Dice of cord and discs)", **parse_log(text),
        "weights": {weights.spec("anatomy").filename: "stage 3, float16 state dict"},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
    }
    record_path = models / "provenance_anatomy.json"
    if origin:
        record["finetuned_from"] = origin
    record_path.write_text(json.dumps(record, indent=1))
    if args.eval_cases:
        from evaluate_anatomy import evaluate

        record["heldout"] = evaluate(models, work / "heldout", args.eval_cases, args.eval_seed, work / "heldout_eval")
        record_path.write_text(json.dumps(record, indent=1))
    print(f"weights and provenance in {models}")
    return 0


def finetune_origin(start: Path, record_path: Path) -> dict:
    """What a fine-tune started from: the weight file's checksum and the record that made it (read from the
    provenance beside the starting weights, else the one about to be replaced), so no training history is lost."""
    from imsct.qc import sha256

    origin = {"weights": str(start), "sha256": sha256([start])}
    for earlier in (start.parent / "provenance_anatomy.json", record_path):
        if earlier.exists():
            origin["provenance"] = json.loads(earlier.read_text())
            break
    return origin


if __name__ == "__main__":
    sys.exit(main())
