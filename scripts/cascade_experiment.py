"""The paper's cascade experiment on phantoms: cascade (localise, crop, segment) against one
network on the whole field, same training data and the same training budget.

    python scripts/cascade_experiment.py --train work/shipped/train --cache work/shipped/cache \
        --heldout work/heldout --epochs 12 --out work/cascade_exp --doc bundle/docs/cascade_experiment.md

    # reuse the shipped stage 2 (bundle/models/, trained by scripts/train_shipped.py) as the
    # cascade arm and train only the single network with the same recipe (read from provenance.json)
    python scripts/cascade_experiment.py --reuse-cascade bundle/models/provenance.json \
        --heldout work/shipped/heldout --out work/cascade_exp_full --doc bundle/docs/cascade_experiment.md

Both arms train the stage-2 network through the bundle's train.json with identical settings and
number of patches; the cascade arm samples and infers inside the cord box (stage 2), the baseline
over the whole working field (stage 0). The cascade arm uses the shipped localiser. Reported per
arm: per-class Dice on the held-out cases, training time per epoch (an epoch being one pass over
each training volume's region with 128x128x32 patches at the paper's 64x64x32 stride, timed at the
measured seconds per patch) and inference time per case. Each arm is evaluated with the checkpoint
its validation picked (``best.pt``, highest validation mean Dice, as train_shipped.py selects the
shipped weights), stored as float16 like the shipped weights.

With ``--reuse-cascade PROVENANCE`` the cascade arm is not retrained: its weights are the ones
next to that provenance.json (the 'tumor' weights of imsct.weights), its recipe (epochs, samples, batch, patch, seed,
validation fraction and interval) is read from the record's stage-2 bundle command and used for the
single-network arm, and its training time comes from the record (and its log, when given).
"""

from __future__ import annotations

import argparse
import json
import re
import time
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundle"

from bundle_train import seconds_per_iteration, start_bundle_training  # noqa: E402

from imsct.labels import CLASSES  # noqa: E402

RECIPE_KEYS = {"epochs": int, "samples_per_epoch": int, "batch_size": int, "seed": int, "val_fraction": float, "val_interval": int}


def recipe_from_provenance(record: dict, stage: str = "2") -> dict:
    """The training settings of one stage, read back from its recorded bundle command."""
    cmd = record["stages"][stage]["bundle_command"]
    recipe = {k: cast(re.search(rf"--{k} (\S+)", cmd).group(1)) for k, cast in RECIPE_KEYS.items()}
    recipe["patch_size"] = re.search(r"--patch_size (\[[^\]]*\])", cmd).group(1)
    recipe["dataset_dir"] = re.search(r"--dataset_dir (\S+)", cmd).group(1)
    recipe["cache_dir"] = re.search(r"--cache_dir (\S+)", cmd).group(1)
    return recipe


def patches_per_pass(files, crop_to_cord: bool, roi=(128, 128, 32), stride=(64, 64, 32)) -> int:
    from imsct.training import stage2_region

    n = 0
    for f in files:
        d = np.load(f)
        sl = stage2_region(d, crop_to_cord)
        size = [s.stop - s.start for s in sl]
        n += int(np.prod([max(1, int(np.ceil((z - r) / st)) + 1) for z, r, st in zip(size, roi, stride)]))
    return n


def select_weights(run_dir: Path, out: Path) -> tuple[Path, str]:
    """The checkpoint validation picked (best.pt), stored as float16 like the shipped weights."""
    from imsct.networks import tumor_network
    from imsct.weights import load_weights, save_weights

    best = run_dir / "best.pt"
    if best.exists():
        src, how = best, "best.pt (highest validation mean Dice)"
    else:  # no validation ran: the last epoch
        src = max(run_dir.glob("checkpoint*.pt"), key=lambda p: p.stat().st_mtime)
        how = f"{src.name} (last epoch; no validation checkpoint)"
        import torch

        net = tumor_network()
        net.load_state_dict(torch.load(src, map_location="cpu", weights_only=False)["model"])
        save_weights(net, out)
        return out, how
    save_weights(load_weights(tumor_network(), src), out)
    return out, how


def log_span_s(log: str) -> float:
    """Seconds from the first to the last timestamped line of a bundle log."""
    import datetime as dt

    stamps = re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) - ", log, re.M)
    parse = lambda t: dt.datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return round(parse(stamps[-1]) - parse(stamps[0]), 1) if len(stamps) > 1 else float("nan")


def dice_stats(summary: dict) -> dict:
    return {c: {"mean": summary[f"{c}_dice_mean"], "std": summary[f"{c}_dice_std"], "n": summary[f"{c}_dice_n"]}
            for c in CLASSES}


def interleaved_timing(cascades: dict, cases, repeats: int = 1) -> dict:
    """Seconds (wall and CPU) per case of each cascade, the arms alternating case by case in one
    process so that both see the same load on a shared CPU; medians over cases and repeats."""
    from imsct.io import load_volume

    times: dict = {arm: {"wall": [], "cpu": []} for arm in cascades}
    for _ in range(repeats):
        for case in cases:
            t2, t1 = load_volume(case.t2, "T2w"), load_volume(case.t1, "T1w")
            for arm, cascade in cascades.items():
                w0, c0 = time.perf_counter(), time.process_time()
                cascade(t2, t1)
                times[arm]["wall"].append(time.perf_counter() - w0)
                times[arm]["cpu"].append(time.process_time() - c0)
    return {arm: {"median_wall_s": float(np.median(t["wall"])), "median_cpu_s": float(np.median(t["cpu"])), "runs": len(t["wall"])}
            for arm, t in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", default="work/shipped/train")
    ap.add_argument("--cache", default="work/shipped/cache")
    ap.add_argument("--heldout", default="work/heldout")
    ap.add_argument("--heldout-cases", type=int, default=20)
    ap.add_argument("--heldout-seed", type=int, default=9000)
    ap.add_argument("--models", default=str(BUNDLE / "models"), help="for the cascade arm's localiser")
    ap.add_argument("--reuse-cascade", default=None, metavar="PROVENANCE",
                    help="provenance.json of already trained cascade weights (next to them): do not retrain the "
                         "cascade arm, train only the single network with that record's stage-2 recipe")
    ap.add_argument("--cascade-log", default=None, help="with --reuse-cascade: that run's stage-2 bundle log (seconds per iteration)")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--patch", default="[96, 96, 32]")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--val-interval", type=int, default=None, help="validate every N epochs (default: once, at the end)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per training process and for evaluation")
    ap.add_argument("--out", default="work/cascade_exp")
    ap.add_argument("--doc", default=None, help="write the results table (markdown) here")
    ap.add_argument("--json", default=None, help="also copy results.json here")
    ap.add_argument("--evaluate-only", action="store_true",
                    help="train nothing: evaluate the runs already in --out (training time read from their logs)")
    ap.add_argument("--arms", default="cascade,single", help="arms to evaluate now (cascade, single); each arm's result is "
                    "kept in --out/arm_stage<N>.json and reused, the table is written once both are there")
    ap.add_argument("--timing-cases", type=int, default=0,
                    help="time inference only: the first N held-out cases, both arms alternating (uses the selected weights in --out)")
    args = ap.parse_args(argv)

    import torch

    from imsct.cascade import Cascade
    from imsct.evaluation import CohortEvaluator
    from imsct import weights as imsct_weights
    from imsct.phantoms import generate_dataset
    from imsct.training import split_cases


    reused = None
    if args.reuse_cascade:
        record = json.loads(Path(args.reuse_cascade).read_text())
        recipe = recipe_from_provenance(record)
        args.epochs, args.samples, args.batch = recipe["epochs"], recipe["samples_per_epoch"], recipe["batch_size"]
        args.patch, args.seed = recipe["patch_size"], recipe["seed"]
        args.val_fraction, args.val_interval = recipe["val_fraction"], recipe["val_interval"]
        args.train, args.cache = recipe["dataset_dir"], recipe["cache_dir"]
        iters = args.epochs * args.samples // args.batch
        st2 = record["stages"]["2"]
        log_s = seconds_per_iteration(Path(args.cascade_log).read_text()) if args.cascade_log else float("nan")
        reused = {"weights": str(imsct_weights.path("tumor", Path(args.reuse_cascade).parent)), "wall_s": st2["wall_s"], "threads": st2["threads"],
                  "seconds_per_iteration": log_s if log_s == log_s else st2["wall_s"] / iters,
                  "seconds_per_iteration_source": f"median gap between iterations in {args.cascade_log}" if log_s == log_s
                  else "recorded wall time / iterations (includes validation)",
                  "selected": st2.get("selected"), "val_mean_dice": st2.get("val_mean_dice")}
        print(f"cascade arm: {reused['weights']} as recorded in {args.reuse_cascade}; single network trained with {recipe}", flush=True)
    val_interval = args.val_interval or args.epochs
    torch.set_num_threads(args.threads)
    if args.timing_cases:
        from imsct.bids import find_cases

        single = Path(args.out) / "stage0" / "model_fp16.pt"
        cascade_w = Path(reused["weights"]) if reused else Path(args.out) / "stage2" / "model_fp16.pt"
        cascades = {"cascade": Cascade(imsct_weights.load("localiser", args.models), imsct_weights.load("tumor", file=cascade_w)),
                    "single network": Cascade(None, imsct_weights.load("tumor", file=single))}
        cases = [c for c in find_cases(args.heldout) if c.labels][: args.timing_cases]
        timing = interleaved_timing(cascades, cases)
        timing["cases"] = [c.name for c in cases]
        timing["threads"] = args.threads
        timing["speedup_wall"] = timing["single network"]["median_wall_s"] / timing["cascade"]["median_wall_s"]
        timing["speedup_cpu"] = timing["single network"]["median_cpu_s"] / timing["cascade"]["median_cpu_s"]
        print(json.dumps(timing, indent=1))
        (Path(args.out) / "timing.json").write_text(json.dumps(timing, indent=1))
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    heldout = Path(args.heldout)
    if not (heldout / "participants.tsv").exists():
        generate_dataset(heldout, args.heldout_cases, args.heldout_seed)
    train_files, _ = split_cases(args.train, None, args.cache, args.val_fraction, args.seed)
    arms = {"cascade": 2, "single network": 0}
    to_train = {} if args.evaluate_only else {a: s for a, s in arms.items() if not (reused and s == 2)}
    names = {"cascade": "cascade", "single": "single network"}
    wanted = {names[a.strip()] for a in args.arms.split(",") if a.strip()}
    procs, logs, started, walls = {}, {}, {}, {}
    for arm, stage in to_train.items():
        logs[arm] = out / f"stage{stage}.log"
        started[arm] = time.time()
        procs[arm], _ = start_bundle_training(
            logs[arm], args.threads, dataset_dir=Path(args.train), cache_dir=Path(args.cache), output_dir=out / f"stage{stage}",
            stage=stage, epochs=args.epochs, samples_per_epoch=args.samples, batch_size=args.batch, patch_size=args.patch,
            seed=args.seed, val_fraction=args.val_fraction, val_interval=val_interval)
        print(f"{arm}: training (stage {stage}), log in {logs[arm]}", flush=True)
    for arm, p in procs.items():
        if p.wait() != 0:
            print(f"{arm}: training failed, see {logs[arm]}", file=sys.stderr)
            return 1
        walls[arm] = round(time.time() - started[arm], 1)

    results = {}
    iterations = args.epochs * args.samples // args.batch
    for arm, stage in arms.items():
        arm_json = out / f"arm_stage{stage}.json"
        if arm not in wanted or arm_json.exists():
            if arm_json.exists():
                results[arm] = json.loads(arm_json.read_text())
            continue
        if reused and stage == 2:
            weights, how = Path(reused["weights"]), reused["selected"]
            wall, s_per_it, curve = reused["wall_s"], reused["seconds_per_iteration"], reused["val_mean_dice"]
            epochs_done = args.epochs
        else:
            from bundle_train import parse_log

            weights, how = select_weights(out / f"stage{stage}", out / f"stage{stage}" / "model_fp16.pt")
            log_path = out / f"stage{stage}.log"
            log = log_path.read_text()
            parsed = parse_log(log)
            wall = walls.get(arm) or log_span_s(log)
            s_per_it, curve, epochs_done = seconds_per_iteration(log), parsed["val_mean_dice"], parsed["epochs_done"]
        seg = imsct_weights.load("tumor", file=weights)
        loc = imsct_weights.load("localiser", args.models) if stage == 2 else None
        print(f"{arm}: evaluating {weights} on {heldout}", flush=True)
        cpu0 = time.process_time()
        summary = CohortEvaluator(Cascade(loc, seg), str(heldout), str(out / f"eval_stage{stage}"), write_predictions=False).run()
        cpu_per_case = (time.process_time() - cpu0) / max(1, summary["tumor_dice_n"])
        n_pass = patches_per_pass(train_files, crop_to_cord=stage == 2)
        results[arm] = {
            "weights": str(weights), "selected": how, "val_mean_dice": curve, "epochs_done": epochs_done,
            "dice": {c: v["mean"] for c, v in dice_stats(summary).items()},
            "dice_std": {c: v["std"] for c, v in dice_stats(summary).items()},
            "dice_n": {c: v["n"] for c, v in dice_stats(summary).items()},
            "train_wall_s": wall, "seconds_per_iteration": s_per_it,
            "seconds_per_patch": s_per_it / args.batch,
            "patches_per_epoch_at_paper_stride": n_pass,
            "train_minutes_per_epoch": n_pass * s_per_it / args.batch / 60,
            "inference_seconds_per_case": summary["seconds_per_case_mean"],
            "inference_cpu_seconds_per_case": cpu_per_case,
            "iterations": iterations,
            "evaluated_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "heldout_summary": summary,
        }
        arm_json.write_text(json.dumps(results[arm], indent=1))
    if len(results) < 2:
        print(f"evaluated {sorted(results)}; the table is written once both arms are in {out}")
        return 0
    c, s = results["cascade"], results["single network"]
    results["cascade_gain_dice_points"] = {k: (None if c["dice"][k] is None or s["dice"][k] is None else 100 * (c["dice"][k] - s["dice"][k])) for k in c["dice"]}
    results["inference_speedup"] = s["inference_seconds_per_case"] / c["inference_seconds_per_case"]
    results["inference_cpu_speedup"] = s["inference_cpu_seconds_per_case"] / c["inference_cpu_seconds_per_case"]
    # both arms train the same network on the same patch size: a patch costs the same in either arm, and
    # the arms' measured seconds differ only by the load on a shared CPU; the per-epoch cost is compared
    # at the least-loaded measurement (the cost per epoch then differs by the patches per epoch only)
    common = min(c["seconds_per_patch"], s["seconds_per_patch"])
    results["common_seconds_per_patch"] = common
    for arm in (c, s):
        arm["train_minutes_per_epoch_common"] = arm["patches_per_epoch_at_paper_stride"] * common / 60
    results["command"] = "python scripts/cascade_experiment.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results["settings"] = dict(vars(args), val_interval=val_interval, reused_cascade=reused)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    fmt = lambda m, sd: "n/a" if m is None else f"{m:.3f} ± {sd:.3f}"
    rows = ["| | cascade | single network | cascade gain |", "|---|---|---|---|"]
    for k in CLASSES:
        g = results["cascade_gain_dice_points"][k]
        rows.append(f"| Dice {k} (n={c['dice_n'][k]}) | {fmt(c['dice'][k], c['dice_std'][k])} | {fmt(s['dice'][k], s['dice_std'][k])} | "
                    f"{'n/a' if g is None else f'{g:+.1f} points'} |")
    rows.append(f"| training s / iteration ({args.batch} patches) | {c['seconds_per_iteration']:.2f} | {s['seconds_per_iteration']:.2f} | |")
    rows.append(f"| patches / epoch (128x128x32, paper stride 64x64x32) | {c['patches_per_epoch_at_paper_stride']} | {s['patches_per_epoch_at_paper_stride']} | |")
    rows.append(f"| training min / epoch (paper stride) at {common:.2f} s / patch | {c['train_minutes_per_epoch_common']:.1f} | {s['train_minutes_per_epoch_common']:.1f} | "
                f"{s['patches_per_epoch_at_paper_stride'] / c['patches_per_epoch_at_paper_stride']:.1f}x fewer |")
    rows.append(f"| training min / epoch (paper stride) at each arm's own s / patch | {c['train_minutes_per_epoch']:.1f} | {s['train_minutes_per_epoch']:.1f} | |")
    rows.append(f"| epochs trained (of {args.epochs}) / training wall time (min) | {c['epochs_done']} / {c['train_wall_s'] / 60:.1f} | {s['epochs_done']} / {s['train_wall_s'] / 60:.1f} | |")
    rows.append(f"| inference CPU s / case (held-out, {args.threads} thread) | {c['inference_cpu_seconds_per_case']:.1f} | {s['inference_cpu_seconds_per_case']:.1f} | {s['inference_cpu_seconds_per_case'] / c['inference_cpu_seconds_per_case']:.2f}x faster |")
    rows.append(f"| inference wall s / case (held-out, {args.threads} thread, shared CPU) | {c['inference_seconds_per_case']:.1f} | {s['inference_seconds_per_case']:.1f} | {results['inference_speedup']:.2f}x faster |")
    table = "\n".join(rows)
    print(table)
    if args.doc:
        Path(args.doc).write_text(
            "# Cascade against one network on the whole field (phantoms)\n\n"
            f"Command: `{results['command']}`\n\n"
            f"Same training data ({len(train_files)} phantoms), same budget ({iterations} iterations of "
            f"{args.batch} patches {args.patch}, validation every {val_interval} epochs, best validation checkpoint), "
            f"{args.heldout_cases} held-out phantoms (seed {args.heldout_seed}). "
            "The cascade arm also uses the shipped localiser. Paper (real data): cascade +5 / +30 / +4.6 Dice points "
            "for tumour / edema / cavity, 2.2x faster inference.\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
