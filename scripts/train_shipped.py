"""Reproduce the shipped weights in bundle/models/ from seeds: phantoms, both stages through the
bundle's train.json, held-out evaluation, provenance record.

    python scripts/train_shipped.py --work work/shipped --cases 80 --seed 1000 \
        --epochs1 30 --epochs2 65 --eval-cases 20 --eval-seed 9000

Both stages train at once in two ``python -m monai.bundle run`` processes (``--threads1`` and
``--threads2`` CPU threads each; on a GPU machine set ``--device cuda``). Each stage's best
checkpoint (validation Dice) is stored as float16 in bundle/models/, and the full record (commands,
seeds, data, epochs, per-epoch losses and validation Dice, held-out metrics, machine) goes to
bundle/models/provenance.json.
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
BUNDLE = ROOT / "bundle"

from bundle_train import parse_log, start_bundle_training, training_wall_s  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="work/shipped")
    ap.add_argument("--models", default=str(BUNDLE / "models"))
    ap.add_argument("--cases", type=int, default=80)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--epochs1", type=int, default=30)
    ap.add_argument("--epochs2", type=int, default=65)
    ap.add_argument("--samples1", type=int, default=20, help="patches per epoch, stage 1")
    ap.add_argument("--samples2", type=int, default=40, help="patches per epoch, stage 2")
    ap.add_argument("--batch1", type=int, default=2)
    ap.add_argument("--batch2", type=int, default=4)
    ap.add_argument("--patch1", default="[256, 128, 32]")
    ap.add_argument("--patch2", default="[96, 96, 32]")
    ap.add_argument("--val-interval", type=int, default=5)
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--threads1", type=int, default=1)
    ap.add_argument("--threads2", type=int, default=2)
    ap.add_argument("--device", default=None, help="e.g. cuda:0 (default: what the bundle picks)")
    ap.add_argument("--patience", type=int, default=4,
                    help="stop a stage after this many validations without a gain of 0.001 in mean Dice")
    ap.add_argument("--finetune", action="store_true",
                    help="start each stage from the weights now in --models instead of from random weights")
    ap.add_argument("--resume", action="store_true",
                    help="continue each stage from its newest checkpoint in --work (after a stop or a crash)")
    ap.add_argument("--no-train", action="store_true",
                    help="train nothing: take each stage's best.pt from --work, write the provenance, evaluate")
    ap.add_argument("--eval-cases", type=int, default=40)
    ap.add_argument("--eval-seed", type=int, default=9000)
    args = ap.parse_args(argv)

    from imsct import weights
    from imsct.phantoms import generate_dataset

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data, cache = work / "train", work / "cache"
    # every invocation on this work folder (training, resumptions, the final collection), for the record
    this_command = "python scripts/train_shipped.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with open(work / "commands.txt", "a") as fh:
        fh.write(this_command + "\n")
    t0 = time.time()
    if not (data / "participants.tsv").exists():
        generate_dataset(data, args.cases, args.seed, progress=True)
    gen_s = round(time.time() - t0, 1)

    common = {"seed": args.seed, "val_fraction": args.val_fraction, "val_interval": args.val_interval,
              "early_stop_patience": args.patience}
    if args.finetune:
        common["finetune"] = True
    if args.resume:
        common["resume"] = True
    if args.device:
        common["device"] = f"$torch.device('{args.device}')"
    plans = {
        1: dict(common, epochs=args.epochs1, samples_per_epoch=args.samples1, batch_size=args.batch1, patch_size=args.patch1),
        2: dict(common, epochs=args.epochs2, samples_per_epoch=args.samples2, batch_size=args.batch2, patch_size=args.patch2),
    }
    threads = {1: args.threads1, 2: args.threads2}
    # cache the working-grid arrays once, before two processes would race to write them
    from imsct.training import split_cases

    split_cases(data, None, cache, args.val_fraction, args.seed)
    procs, logs, cmds = {}, {}, {}
    for stage, plan in plans.items():
        logs[stage] = work / f"stage{stage}.log"
        plan = dict(plan, finetune_ckpt=weights.stage_model(stage).path(Path(args.models))) if args.finetune else plan
        if args.no_train:
            from bundle_train import bundle_train_command

            cmds[stage] = bundle_train_command(dataset_dir=data, output_dir=work / f"stage{stage}", cache_dir=cache, stage=stage, **plan)
            continue
        # a resumed run appends to the log, so that the learning curve and the wall time cover every run
        procs[stage], cmds[stage] = start_bundle_training(
            logs[stage], threads[stage], append=args.resume, dataset_dir=data, output_dir=work / f"stage{stage}",
            cache_dir=cache, stage=stage, **plan)
        print(f"stage {stage}: training, log in {logs[stage]}", flush=True)
    for stage, p in procs.items():
        rc = p.wait()
        if rc != 0:
            print(f"stage {stage} failed (exit {rc}); see {logs[stage]}", file=sys.stderr)
            return rc
    durations = {stage: training_wall_s(logs[stage].read_text()) for stage in plans}

    models = Path(args.models)
    for stage in (1, 2):
        m = weights.stage_model(stage)
        weights.save_weights(weights.load(m.key, file=work / f"stage{stage}" / "best.pt"), m.path(models))
    from imsct.phantoms import GENERATOR_VERSION

    record = {
        "command": this_command,
        "commands": (work / "commands.txt").read_text().splitlines(),
        "training_data": {"generator": f"python -m imsct.phantoms --out {data} --cases {args.cases} --seed {args.seed}",
                          "generator_version": GENERATOR_VERSION, "cases": args.cases, "seed": args.seed,
                          "validation_fraction": args.val_fraction,
                          "generation_s": gen_s},
        "stages": {
            str(stage): {"bundle_command": " ".join(cmds[stage]), "threads": threads[stage], "wall_s": durations[stage],
                         "selected": "best.pt (highest validation mean Dice)", **parse_log(logs[stage].read_text())}
            for stage in plans
        },
        "start": ("the weights that were in bundle/models before this run (fine-tuned)" if args.finetune
                  else "random initialisation"),
        "weights": {weights.stage_model(s).filename: f"stage {s}, float16 state dict" for s in (1, 2)},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
    }
    (models / "provenance.json").write_text(json.dumps(record, indent=1))
    if args.eval_cases:
        from evaluate_heldout import evaluate

        summary = evaluate(models, work / "heldout", args.eval_cases, args.eval_seed, work / "heldout_eval")
        record["heldout"] = {"generator": f"python -m imsct.phantoms --cases {args.eval_cases} --seed {args.eval_seed}", **summary}
        (models / "provenance.json").write_text(json.dumps(record, indent=1))
    print(f"weights and provenance in {models}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
