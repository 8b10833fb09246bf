"""Train the click-guided correction network (model 'clicks' of imsct.weights) on phantoms with simulated clicks.

    python scripts/train_clicks.py --work work/clicks --max-minutes 38          # phantoms made if missing
    python scripts/train_clicks.py --work work/clicks --resume                   # go on from the last checkpoint

Start: the shipped stage-2 network ('tumor') with its first convolution widened for the four click
channels, zero-initialised (imsct.networks.ClickGuided.from_stage2): with any clicks it answers as
stage 2. Each training sample is a 64 x 64 x 32 patch (imsct.training.stage2_sample, lesion-centred
with probability 0.9, random affine) with 0 to ``--max-clicks`` clicks simulated iteratively as
DeepEdit does: the current network predicts the patch, the next click goes to the centre of its
largest error (imsct.clicks.next_click), it predicts again with the clicks so far, and so on; the
training step then sees the patch with all its clicks. Loss: multiclass Dice (as stage 2).
Optimiser: Adam, ``--lr`` for the stage-2 weights, ``--lr-clicks`` for the new click weights.

Validation every ``--val-every`` iterations on the validation phantoms (around the lesion, as
scripts/evaluate_clicks.py):
Dice after 0 and 3 simulated clicks; the best mean Dice after 3 clicks is kept (best.pt). Training
stops after ``--iterations``, after ``--patience`` validations without improvement, or at
``--max-minutes`` of wall time (resumed runs count their earlier time). The result is copied to
bundle/models/clicks.pt only if, on validation, 3 clicks beat 0 clicks; the record is
bundle/models/provenance_clicks.json. CPU, one thread by default.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHANTOM_SETS = {  # folder: (seed, first index, cases, extra options)
    "train": (1000, 0, 30, []),
    "val": (1000, 80, 4, ["--healthy-fraction", "0"]),
}


def make_phantoms(work: Path, max_voxels: int) -> dict:
    import subprocess

    made = {}
    for name, (seed, start, cases, extra) in PHANTOM_SETS.items():
        cmd = [sys.executable, "-m", "imsct.phantoms", "--out", str(work / name), "--cases", str(cases), "--seed", str(seed),
               "--start", str(start), "--max-voxels", str(max_voxels), "--quiet", *extra]
        if not (work / name / "participants.tsv").exists():
            subprocess.run(cmd, check=True, cwd=ROOT)
        made[name] = "python -m imsct.phantoms " + " ".join(cmd[3:])
    return made


def cached(folder: Path, cache: Path) -> list[Path]:
    from imsct.bids import find_cases
    from imsct.training import prepare_case

    cache.mkdir(parents=True, exist_ok=True)
    return [prepare_case(c, cache) for c in find_cases(folder) if c.labels]


def labelmap_of(target: np.ndarray) -> np.ndarray:
    """0..3 label map from the four target channels [tumor, edema, cavity, whole]."""
    return np.where(target[0] > 0.5, 1, np.where(target[1] > 0.5, 2, np.where(target[2] > 0.5, 3, 0))).astype(np.uint8)


def training_batch(net, files, rng, patch, batch, max_clicks, p_lesion, spacing):
    """``batch`` patches with their simulated clicks: (inputs [T2w, T1w, 4 click maps, validity], targets, clicks per sample)."""
    import torch

    from imsct.clicks import CLICK_CLASSES, ClickSession, click_maps, predict
    from imsct.training import _augment, stage2_sample

    xs, ys, ks = [], [], []
    net.eval()
    for _ in range(batch):
        f = files[int(rng.integers(len(files)))]
        x, y = stage2_sample(f, rng, patch, p_lesion)
        xt, yt = _augment(torch.from_numpy(x)[None], torch.from_numpy(y)[None], rng, 0.5, validity=True)
        img, valid, tgt = xt[0, :2].numpy(), xt[0, 2].numpy() > 0.5, yt[0].numpy()
        k = int(rng.integers(0, max_clicks + 1))
        points = {c: np.zeros((0, 3)) for c in CLICK_CLASSES}
        if k:
            empty = np.zeros((len(CLICK_CLASSES), *img.shape[1:]), np.float32)
            s = ClickSession(net, img, labelmap_of(tgt), spacing, predict(net, img, empty), valid=valid, size=tuple(patch))
            for _ in range(k):
                if not s.click():
                    break
            points = s.points
        maps = click_maps(points, img.shape[1:], spacing)
        xs.append(np.concatenate([img, maps, valid[None].astype(np.float32)]))
        ys.append(tgt)
        ks.append(sum(len(v) for v in points.values()))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys)), ks


def validate(net, files, clicks=(0, 3), spacing=(1.0, 1.0, 2.0)) -> dict:
    """Mean Dice (tumor, edema, cavity, whole; classes present in the truth) after each number of
    ``clicks`` on the validation cases, around the lesion (evaluate_clicks.region_of)."""
    from evaluate_clicks import region_of

    from imsct.clicks import dice_after_clicks

    per = {k: [] for k in clicks}
    for f in files:
        image, truth = region_of(f)
        rows = dice_after_clicks(net, image, truth, spacing, clicks)
        for k in clicks:
            vals = [v for v in rows[k].values() if v is not None]
            per[k].append(float(np.mean(vals)) if vals else 1.0)
    return {f"dice_{k}_clicks": round(float(np.mean(v)), 4) for k, v in per.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="work/clicks", help="phantoms (train/, val/), cache and checkpoints")
    ap.add_argument("--models", default=str(ROOT / "bundle" / "models"), help="where 'tumor' is read and 'clicks' written")
    ap.add_argument("--seed", type=int, default=15)
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--patch", default="64,64,32")
    ap.add_argument("--max-clicks", type=int, default=3, help="clicks per sample drawn from 0..N")
    ap.add_argument("--p-lesion", type=float, default=0.9)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--lr-clicks", type=float, default=1e-3)
    ap.add_argument("--val-every", type=int, default=40)
    ap.add_argument("--patience", type=int, default=3, help="validations without improvement before stopping")
    ap.add_argument("--max-minutes", type=float, default=38.0)
    ap.add_argument("--max-voxels", type=int, default=1_500_000, help="phantom size when they are generated")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", action="store_true", help="continue from <work>/run/checkpoint.pt")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from monai.losses import DiceLoss

    from imsct import weights
    from imsct.geometry import WORKING_SPACING
    from imsct.networks import ClickGuided
    from imsct.phantoms import GENERATOR_VERSION

    work, models = Path(args.work), Path(args.models)
    run = work / "run"
    run.mkdir(parents=True, exist_ok=True)
    command = "python scripts/train_clicks.py " + " ".join(argv if argv is not None else sys.argv[1:])
    generators = make_phantoms(work, args.max_voxels)
    train_files, val_files = cached(work / "train", work / "cache"), cached(work / "val", work / "cache")
    patch = tuple(int(v) for v in args.patch.split(","))
    spacing = tuple(float(v) for v in WORKING_SPACING)

    torch.manual_seed(args.seed)
    net = ClickGuided.from_stage2(weights.load("tumor", models))
    opt = torch.optim.Adam([{"params": list(net.net.parameters()), "lr": args.lr},
                            {"params": list(net.click_stem.parameters()), "lr": args.lr_clicks}])
    loss_fn = DiceLoss(sigmoid=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)
    state = {"iteration": 0, "wall_s": 0.0, "history": [], "best": None, "since_best": 0, "rng": None}
    ckpt = run / "checkpoint.pt"
    if args.resume and ckpt.exists():
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        net.load_state_dict(saved["net"])
        opt.load_state_dict(saved["opt"])
        state = saved["state"]
        torch.set_rng_state(saved["torch_rng"])
        print(f"resumed at iteration {state['iteration']} ({state['wall_s'] / 60:.1f} min so far)", flush=True)
    rng = np.random.default_rng([args.seed, state["iteration"]])
    if not state["history"]:
        v0 = validate(net, val_files, spacing=spacing)
        state["history"].append({"iteration": 0, **v0})
        state["start_val"] = v0
        print(f"start (stage 2, zero click weights): {v0}", flush=True)

    def save_checkpoint():
        torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "state": state, "torch_rng": torch.get_rng_state()}, ckpt)

    t_start, wall0 = time.time(), state["wall_s"]
    losses, stop = [], "iterations"
    while state["iteration"] < args.iterations:
        x, y, ks = training_batch(net, train_files, rng, patch, args.batch, args.max_clicks, args.p_lesion, spacing)
        net.train()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        state["iteration"] += 1
        losses.append(float(loss))
        it = state["iteration"]
        state["wall_s"] = wall0 + time.time() - t_start
        if it % 10 == 0:
            print(f"it {it} loss {np.mean(losses[-10:]):.4f} clicks {ks} {state['wall_s'] / 60:.1f} min", flush=True)
        out_of_time = state["wall_s"] > args.max_minutes * 60
        if it % args.val_every == 0 or out_of_time or it == args.iterations:
            v = validate(net, val_files, spacing=spacing)
            state["wall_s"] = wall0 + time.time() - t_start
            entry = {"iteration": it, "train_loss": round(float(np.mean(losses[-args.val_every:])), 4), **v,
                     "wall_min": round(state["wall_s"] / 60, 1)}
            state["history"].append(entry)
            print(f"validation {entry}", flush=True)
            if state["best"] is None or v["dice_3_clicks"] > state["best"]["dice_3_clicks"]:
                state["best"], state["since_best"] = entry, 0
                weights.save_weights(net, run / "best.pt")
            else:
                state["since_best"] += 1
            save_checkpoint()
            if state["since_best"] >= args.patience:
                stop = f"validation Dice after 3 clicks did not improve for {args.patience} validations"
                break
            if state["wall_s"] > args.max_minutes * 60:
                stop = f"wall-time budget of {args.max_minutes} min"
                break

    start_val, best = state["start_val"], state["best"]
    beats = best is not None and best["dice_3_clicks"] > start_val["dice_0_clicks"] and best["dice_3_clicks"] > best["dice_0_clicks"]
    record = {
        "command": command, "seed": args.seed, "generator_version": GENERATOR_VERSION,
        "data": {"train": generators["train"], "validation": generators["val"], "train_cases": len(train_files),
                 "validation_cases": len(val_files)},
        "start": "bundle/models/" + weights.spec("tumor").filename + " (stage 2), first convolution widened by 4 zero-initialised click channels",
        "settings": {k: getattr(args, k) for k in ("batch", "patch", "max_clicks", "p_lesion", "lr", "lr_clicks", "val_every", "patience",
                                                   "max_minutes", "threads")},
        "iterations": state["iteration"], "wall_s": round(state["wall_s"], 1), "stopped": stop,
        "validation": {"what": "mean Dice (tumor, edema, cavity, whole; classes present) around the lesion "
                               "(scripts/evaluate_clicks.py region_of), "
                               "after 0 and 3 simulated clicks", "curve": state["history"], "best": best},
        "shipped": bool(beats),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
    }
    if beats:
        weights.save_weights(weights.load("clicks", file=run / "best.pt"), weights.path("clicks", models))
        record["weights"] = {weights.spec("clicks").filename: weights.checksum("clicks", models)}
        print(f"shipped {weights.path('clicks', models)} (best: {best})")
    else:
        print(f"not shipped: 3 clicks do not beat 0 clicks on validation (best {best}, start {start_val})")
    (models / "provenance_clicks.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
