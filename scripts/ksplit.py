"""k random splits (train, evaluate) reported as mean +- std per class, like Table 4 of the paper.

    python scripts/ksplit.py --data work/ksplit/data --cases 40 --seed 2000 --k 3 \
        --epochs1 10 --epochs2 20 --out work/ksplit

For each split, the labelled cases are shuffled with seed ``seed + split``, ``--test-fraction`` of
them held out, both stages trained on the rest through the bundle's train.json (datalist mode), and
the cascade evaluated on the held-out part. Writes ``results.json`` and prints a table of
mean +- std over splits for every metric and class.

At the shipped recipe a split takes over an hour on a 2-core CPU, so the work can be spread:
``--splits 1`` runs only split 1 (several processes can share ``--out``, and each one's table covers
every split finished so far), and a finished split, or a finished stage of an unfinished split, is
read back instead of trained again when its settings are unchanged.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from bundle_train import log_span_s, parse_log, seconds_per_iteration, start_bundle_training  # noqa: E402
from imsct.io import write_text_atomically  # noqa: E402

from imsct.labels import CLASSES  # noqa: E402
METRICS = ("dice", "tpr_detection", "fpr_detection", "precision", "recall", "avd", "rvd")


def datalist_entry(case) -> dict:
    return {"t2": str(case.t2.resolve()), "t1": str(case.t1.resolve()), "labels": {k: str(v.resolve()) for k, v in case.labels.items()}}


def cell(t: dict, scale: float) -> str:
    return "n/a" if t["mean"] is None else f"{scale * t['mean']:.1f} ± {scale * t['std']:.1f}"


def markdown_table(table: dict) -> str:
    """Mean ± std over splits: Dice, precision, recall, detection TPR/FPR in %, AVD/RVD in %."""
    rows = ["| metric | " + " | ".join(CLASSES) + " |", "|---" * (len(CLASSES) + 1) + "|"]
    for metric in METRICS:
        rows.append(f"| {metric} (%) | " + " | ".join(cell(table[f"{c}_{metric}"], 100) for c in CLASSES) + " |")
    extra = [("stage-1 (cord) Dice (%)", "stage1_dice_mean"), ("lesion voxels inside the cord box (%)", "lesion_voxels_in_box"),
             ("subjects with all lesions inside the box (%)", "subjects_lesions_fully_in_box")]
    rows += ["", "| cascade | mean ± std over splits |", "|---|---|"]
    rows += [f"| {label} | {cell(table[key], 100)} |" for label, key in extra]
    return "\n".join(rows)


def finished_stage(sdir: Path, stage: int, plan: dict) -> bool:
    """Whether ``sdir/stage<N>`` holds a finished training run of ``plan``, so that a rerun evaluates
    instead of training again: its ``plan.json`` (written when training ends) equals ``plan``, or,
    for a run without one, its log shows ``epochs`` complete epochs of ``samples // batch`` iterations."""
    log, done = sdir / f"stage{stage}.log", sdir / f"stage{stage}" / "plan.json"
    if not (sdir / f"stage{stage}" / "best.pt").exists() or not log.exists():
        return False
    if done.exists():
        return json.loads(done.read_text()) == plan
    epochs, iterations = plan["epochs"], plan["samples"] // plan["batch"]
    text = log.read_text()
    runs = set(re.findall(r"Epoch: \d+/(\d+), Iter: \d+/(\d+) -- train_loss", text))
    return runs == {(str(epochs), str(iterations))} and f"Epoch[{epochs}] Complete" in text


def finished_split(sdir: Path, recipe: dict) -> dict | None:
    """The summary of the split in ``sdir`` if it was finished with ``recipe``."""
    f = sdir / "summary.json"
    return s if f.exists() and (s := json.loads(f.read_text())).get("recipe") == recipe else None


def finished_splits(out: Path, k: int, recipe: dict) -> list[dict]:
    """Summaries of the splits finished with ``recipe`` (by this run or by others on other splits)."""
    return [s for split in range(k) if (s := finished_split(out / f"split{split}", recipe)) is not None]


def report(splits: list, args, command: str) -> None:
    """Table over the splits done so far; results.json (and the markdown doc) rewritten after each split."""
    out = Path(args.out)
    table: dict = {}
    for metric in METRICS:
        for c in CLASSES:
            vals = [s[f"{c}_{metric}_mean"] for s in splits if s[f"{c}_{metric}_mean"] is not None]
            table[f"{c}_{metric}"] = {"mean": float(np.mean(vals)) if vals else None, "std": float(np.std(vals)) if vals else None, "splits": len(vals)}
    for key in ("stage1_dice_mean", "lesion_voxels_in_box", "subjects_lesions_fully_in_box"):
        vals = [s[key] for s in splits if s.get(key) is not None]
        table[key] = {"mean": float(np.mean(vals)) if vals else None, "std": float(np.std(vals)) if vals else None, "splits": len(vals)}
    write_text_atomically(out / "results.json", json.dumps({"command": command, "settings": vars(args), "table": table,
                                                            "splits": splits}, indent=1))
    md = markdown_table(table)
    print(md)
    minutes = {key: np.mean([s[key]["wall_s"] if isinstance(s[key], dict) else s[key] for s in splits]) / 60
               for key in ("stage1_training", "stage2_training", "evaluation_wall_s")}
    times = (f"Per split (mean): stage 1 trained in {minutes['stage1_training']:.0f} min, stage 2 in {minutes['stage2_training']:.0f} min, "
             f"{len(splits[0]['cases']['test'])} test cases evaluated in "
             f"{minutes['evaluation_wall_s']:.1f} min.")
    print(times)
    if args.doc:
        write_text_atomically(args.doc, f"# {len(splits)} of {args.k} random splits (phantoms)\n\nCommand: `{command}`\n\n{times}\n\n{md}\n")


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
    ap.add_argument("--val-interval", type=int, default=None, help="validate every N epochs (default: at half and at the end of each stage's epochs, or only at the end)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per training process and for evaluation")
    ap.add_argument("--sequential", action="store_true", help="train stage 1, then stage 2 (default: both at once)")
    ap.add_argument("--out", default="work/ksplit")
    ap.add_argument("--doc", default=None, help="write the table (markdown) here")
    ap.add_argument("--splits", default=None, help="comma-separated split indices to run (default: all k); several "
                    "processes can share --out, each on its own splits, and each report covers every finished split")
    args = ap.parse_args(argv)
    argv = list(argv if argv is not None else sys.argv[1:])
    if "--splits" in argv:  # the table's command is the one that reproduces all splits
        i = argv.index("--splits")
        del argv[i:i + 2]
    command = "python scripts/ksplit.py " + " ".join(argv)
    todo = range(args.k) if args.splits is None else [int(v) for v in args.splits.split(",")]

    from imsct.bids import find_cases
    from imsct.cascade import Cascade
    from imsct.evaluation import evaluate_case, summarise, write_report
    from imsct import weights
    from imsct.phantoms import generate_dataset
    import torch

    torch.set_num_threads(args.threads)
    data, out = Path(args.data), Path(args.out)
    if not (data / "participants.tsv").exists():
        generate_dataset(data, args.cases, args.seed, progress=True)
    cases = [c for c in find_cases(data) if c.labels]
    # what makes a split's result: not k (split i is the same in a k=2 and a k=3 run)
    recipe = {k: getattr(args, k) for k in ("data", "cases", "seed", "test_fraction", "val_fraction", "epochs1", "epochs2", "samples1",
                                             "samples2", "patch1", "patch2", "batch1", "batch2", "val_interval")}
    for split in todo:
        order = np.random.default_rng(args.seed + split).permutation(len(cases))
        n_test = max(1, int(round(args.test_fraction * len(cases))))
        n_val = max(1, int(round(args.val_fraction * len(cases))))
        test = [cases[i] for i in order[:n_test]]
        val = [cases[i] for i in order[n_test:n_test + n_val]]
        train = [cases[i] for i in order[n_test + n_val:]]
        sdir = out / f"split{split}"
        sdir.mkdir(parents=True, exist_ok=True)
        # A split finished by an earlier run with the same training settings is read back, so a long
        # k-split (the shipped recipe: ~75 min per split on a 2-core CPU) can be run a few splits at a time.
        done_file = sdir / "summary.json"
        if finished_split(sdir, recipe) is not None:
            print(f"split {split}: done earlier ({done_file}), read back", flush=True)
            continue
        if done_file.exists():
            print(f"split {split}: {done_file} has other settings; training again", flush=True)
        datalist = sdir / "datalist.json"
        write_text_atomically(datalist, json.dumps({"training": [datalist_entry(c) for c in train], "validation": [datalist_entry(c) for c in val]}, indent=1))
        plans = ((1, args.epochs1, args.samples1, args.patch1, args.batch1), (2, args.epochs2, args.samples2, args.patch2, args.batch2))

        def plan_of(stage, epochs, samples, patch, batch):
            return {"epochs": epochs, "samples": samples, "patch": patch, "batch": batch, "seed": args.seed + split,
                    "val_interval": args.val_interval, "datalist": json.loads(datalist.read_text())}

        def start(stage, epochs, samples, patch, batch):
            if finished_stage(sdir, stage, plan_of(stage, epochs, samples, patch, batch)):
                print(f"split {split}: stage {stage} finished earlier ({sdir}/stage{stage}.log), not trained again", flush=True)
                return stage, None
            proc, _ = start_bundle_training(
                sdir / f"stage{stage}.log", args.threads, datalist=datalist, output_dir=sdir / f"stage{stage}",
                cache_dir=out / "cache", stage=stage, epochs=epochs, samples_per_epoch=samples, patch_size=patch,
                batch_size=batch, val_interval=args.val_interval or (epochs // 2 if epochs % 2 == 0 else epochs), seed=args.seed + split)
            print(f"split {split}: stage {stage} training, log in {sdir}/stage{stage}.log", flush=True)
            return stage, proc

        def finish(stage, proc):
            rc = 0 if proc is None else proc.wait()
            if proc is not None and rc == 0:
                write_text_atomically(sdir / f"stage{stage}" / "plan.json", json.dumps(plan_of(*plans[stage - 1]), indent=1))
            return rc

        if args.sequential:
            failed = any(finish(*start(*plan)) != 0 for plan in plans)
        else:
            running = [start(*plan) for plan in plans]
            failed = any([finish(*r) != 0 for r in running])
        if failed:
            print(f"split {split}: training failed, see {sdir}/stage*.log", file=sys.stderr)
            return 1
        cascade = Cascade(weights.load("localiser", file=sdir / "stage1" / "best.pt"), weights.load("tumor", file=sdir / "stage2" / "best.pt"))
        t_eval = time.time()
        rows = [evaluate_case(cascade, c)[0] for c in test]
        summary = summarise(rows)
        write_report(rows, summary, sdir / "eval")
        for stage in (1, 2):
            log = (sdir / f"stage{stage}.log").read_text()
            summary[f"stage{stage}_training"] = {"wall_s": log_span_s(log), "seconds_per_iteration": seconds_per_iteration(log),
                                                 "val_mean_dice": parse_log(log)["val_mean_dice"]}
        summary["evaluation_wall_s"] = round(time.time() - t_eval, 1)
        summary["cases"] = {"train": [c.name for c in train], "validation": [c.name for c in val], "test": [c.name for c in test]}
        summary["recipe"] = recipe
        write_text_atomically(done_file, json.dumps(summary, indent=1, default=float))
        print(f"split {split}: whole tumour Dice {summary['whole-tumor_dice_mean']}", flush=True)
    splits = finished_splits(out, args.k, recipe)
    if splits:
        report(splits, args, command)

    return 0


if __name__ == "__main__":
    sys.exit(main())
