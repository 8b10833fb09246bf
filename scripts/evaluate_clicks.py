"""Dice after 0, 1, 3, 5 simulated clicks of the click-guided network ('clicks') on held-out phantoms.

    python scripts/evaluate_clicks.py --data work/clicks/heldout --seed 9500 --cases 12 [--out work/clicks/eval]

Phantoms are made (``python -m imsct.phantoms --seed 9500 --healthy-fraction 0``, a seed no training
used) where ``--data`` has none. Per case, on the working grid around the lesion (its bounding box
grown by 16 x 16 x 8 voxels and to at least 64 x 64 x 32, inside the true cord box grown as at test
time): the network's answer without clicks (stage 2's padding-safe
sliding window, click maps zero), then simulated clicks one at a time at the centre of the largest
error (imsct.clicks.next_click), each re-predicting the 64 x 64 x 32 box around the clicks
(imsct.clicks.correct). Dice per class (tumor, edema, cavity over the cases that have the class;
whole tumour over all), thresholded probabilities without post-processing. ``--baseline`` adds the
shipped stage 2 ('tumor') on the same boxes. Prints a table (mean ± std) and the time of one
correction; writes ``<out>/clicks_eval.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imsct.clicks import DICE_CLASSES as CLASSES  # noqa: E402



def region_of(npz) -> tuple[np.ndarray, np.ndarray]:
    """A cached case's ``(2, ...)`` [T2w, T1w] and 0..3 truth around its lesion (imsct.clicks.lesion_region)
    inside its true cord box (grown as at test time)."""
    from imsct.clicks import lesion_region
    from imsct.training import stage2_region

    d = np.load(npz)
    sl = stage2_region(d, crop_to_cord=True, whole_length=False)
    return lesion_region(np.stack([d["t2"][sl], d["t1"][sl]]).astype(np.float32), d["label"][sl].astype(np.uint8))


def summarise(rows: list[dict], clicks) -> dict:
    out = {}
    for n in clicks:
        for c in CLASSES:
            vals = [r[n][c] for r in rows if r[n][c] is not None]
            out[f"{n}_{c}"] = {"mean": float(np.mean(vals)) if vals else None, "std": float(np.std(vals)) if vals else None,
                               "n": len(vals)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="work/clicks/heldout")
    ap.add_argument("--seed", type=int, default=9500)
    ap.add_argument("--cases", type=int, default=12)
    ap.add_argument("--max-voxels", type=int, default=1_500_000)
    ap.add_argument("--models", default=str(ROOT / "bundle" / "models"))
    ap.add_argument("--weights", default=None, help="another 'clicks' weight file (e.g. a training best.pt)")
    ap.add_argument("--clicks", default="0,1,3,5")
    ap.add_argument("--baseline", action="store_true", help="also the shipped stage 2 ('tumor') without clicks")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="folder for clicks_eval.json (default: beside --data)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from imsct import weights
    from imsct.bids import find_cases
    from imsct.geometry import WORKING_SPACING
    from imsct.training import prepare_case
    from imsct.clicks import class_dice, dice_after_clicks

    data = Path(args.data)
    generator = (f"python -m imsct.phantoms --out {data} --cases {args.cases} --seed {args.seed} --healthy-fraction 0 "
                 f"--max-voxels {args.max_voxels}")
    if not (data / "participants.tsv").exists():
        subprocess.run([sys.executable, *generator.split()[1:]], check=True, cwd=ROOT)
    cache = data.parent / f"{data.name}_cache"
    cache.mkdir(parents=True, exist_ok=True)
    files = [prepare_case(c, cache) for c in find_cases(data) if c.labels][: args.cases]
    clicks = tuple(int(v) for v in args.clicks.split(","))
    net = weights.load("clicks", args.models, file=args.weights)
    stage2 = weights.load("tumor", args.models) if args.baseline else None
    rows, base_rows, seconds = [], [], []
    t0 = time.time()
    for f in files:
        image, truth = region_of(f)
        rows.append(dice_after_clicks(net, image, truth, WORKING_SPACING, clicks, seconds))
        if stage2 is not None:
            from imsct.postprocess import labelmap_from_probabilities

            base_rows.append({0: class_dice(labelmap_from_probabilities(_stage2(stage2, image)), truth)})
        print(f"{f.stem}: " + "; ".join(f"{n}: " + ", ".join(f"{c} {'-' if v is None else f'{v:.3f}'}" for c, v in rows[-1][n].items())
                                         for n in clicks), flush=True)
    summary = summarise(rows, clicks)
    header = "| clicks | " + " | ".join(f"{c} (n={summary[f'0_{c}']['n']})" for c in CLASSES) + " |"
    lines = [header, "|---" * (len(CLASSES) + 1) + "|"]
    if base_rows:
        b = summarise(base_rows, (0,))
        lines.append("| stage 2 (model.pt) | " + " | ".join(f"{b[f'0_{c}']['mean']:.3f} ± {b[f'0_{c}']['std']:.3f}" for c in CLASSES) + " |")
    for n in clicks:
        lines.append(f"| {n} | " + " | ".join(f"{summary[f'{n}_{c}']['mean']:.3f} ± {summary[f'{n}_{c}']['std']:.3f}" for c in CLASSES) + " |")
    table = "\n".join(lines)
    latency = {"corrections": len(seconds), "mean_s": round(float(np.mean(seconds)), 3) if seconds else None,
               "median_s": round(float(np.median(seconds)), 3) if seconds else None,
               "max_s": round(float(np.max(seconds)), 3) if seconds else None, "threads": args.threads}
    print(table)
    print(f"one correction (re-prediction around the clicks, {args.threads} thread): {latency}")
    out = Path(args.out) if args.out else data.parent
    out.mkdir(parents=True, exist_ok=True)
    weights_file = Path(args.weights) if args.weights else weights.path("clicks", args.models)
    (out / "clicks_eval.json").write_text(json.dumps({
        "command": "python scripts/evaluate_clicks.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "data": generator, "cases": len(files), "weights": str(weights_file), "clicks": list(clicks), "summary": summary,
        "baseline_stage2": summarise(base_rows, (0,)) if base_rows else None, "latency": latency, "table": table,
        "wall_s": round(time.time() - t0, 1)}, indent=1))
    return 0


def _stage2(net, image):
    """The shipped stage 2 on the region, by its own padding-safe sliding window."""
    import torch

    from imsct.cascade import sliding_window_inferer

    with torch.no_grad():
        return torch.sigmoid(sliding_window_inferer()(torch.from_numpy(image)[None], net))[0].numpy()


if __name__ == "__main__":
    sys.exit(main())
