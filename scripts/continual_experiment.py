"""Continual learning across two centres, measured: does the app's retraining round learn centre B
without forgetting centre A?

* Centre A: the default phantoms. The A base model is the shipped ``bundle/models`` (trained on 80
  default phantoms, seed 1000). A validation: ``--a-val`` phantoms of seed 9100 (never trained on).
  A replay cases: the first ``--a-replay`` of the shipped model's own training phantoms (seed 1000).
* Centre B: phantoms of seed 9200 with :data:`imsct.phantoms.centres.CENTRE_B` (coarser
  resolution, another contrast mapping, more noise); the app's persistent split picks the B
  validation cases (the first case of the centre, then every fifth).
* Two arms from the same A base, same data order, iterations, batch, patch and learning rate:
  ``naive`` (fine-tune on B only: no replay, no EWC) and ``continual`` (the app's method: replay of
  A cases in every batch, EWC anchored at the A model, and the gate).

Both arms run :func:`imsct.continual.retrain_round`, which evaluates the published (base) and the
candidate weights on every validation case with the test-time sliding window inside the case's
stage-2 region (true cord box). Final label maps (0..3) are written from the phantom truth, as the
app's annotators would save them. The last line printed is machine-readable::

    A_base=.. B_base=.. A_naive=.. B_naive=.. A_continual=.. B_continual=..

(mean whole-tumour Dice per centre over its validation cases). Run::

    OMP_NUM_THREADS=1 python scripts/continual_experiment.py --work work/continual
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import nibabel as nib
import torch

ROOT = Path(__file__).resolve().parents[1]

from imsct.bids import find_cases  # noqa: E402
from imsct.continual import LabelledCase, init_state, retrain_round  # noqa: E402
from imsct.evaluation import truth_labelmap  # noqa: E402
from imsct.labels import CORD_BOX_SUFFIX, LABELMAP_SUFFIX  # noqa: E402
from imsct.phantoms import generate_dataset  # noqa: E402
from imsct.phantoms.centres import generate_centre_dataset  # noqa: E402


def labelled_cases(bids_dir: Path, centre: str, prefix: str, limit: int | None = None) -> list[LabelledCase]:
    """The cases of a phantom BIDS folder as the app sees them: one final 0..3 label map per case
    (written beside the truth masks once), the truth stage-1 cylinder as the cord target."""
    out = []
    for case in find_cases(bids_dir)[:limit]:
        t2 = nib.load(case.t2)
        lab_path = case.labels[CORD_BOX_SUFFIX].with_name(f"{case.name}{LABELMAP_SUFFIX}.nii.gz")
        if not lab_path.exists():
            nib.save(nib.Nifti1Image(truth_labelmap(case, t2.shape), t2.affine), lab_path)
        out.append(LabelledCase(f"{prefix}-{case.subject}", case.t2, case.t1, lab_path, centre, cord=case.labels[CORD_BOX_SUFFIX]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="work/continual")
    ap.add_argument("--models", default=str(ROOT / "bundle" / "models"), help="centre-A base weights")
    ap.add_argument("--a-train-dir", default=str(ROOT / "work" / "shipped" / "train"), help="the base model's training phantoms (seed 1000); generated if missing")
    ap.add_argument("--a-replay", type=int, default=8)
    ap.add_argument("--a-val", type=int, default=6)
    ap.add_argument("--b-cases", type=int, default=21, help="centre-B cases (the split holds about a fifth out for validation)")
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--patch", type=int, nargs=3, default=[96, 96, 32])
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--replay", type=float, default=0.5)
    ap.add_argument("--ewc-lambda", type=float, default=1e4)
    ap.add_argument("--tolerance", type=float, default=0.02)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arms", nargs="+", default=["naive", "continual"], choices=["naive", "continual"])
    ap.add_argument("--tag", default="", help="suffix of the arm folders and results file (extra runs beside the main one)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    data = work / "data"
    t_all = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_all:7.0f} s] {msg}", flush=True)

    # data ------------------------------------------------------------------------------------------
    a_train_dir = Path(args.a_train_dir)
    if not (a_train_dir / "sub-001").exists():
        a_train_dir = data / "A_train"
        if not (a_train_dir / f"sub-{args.a_replay:03d}").exists():
            generate_dataset(a_train_dir, cases=args.a_replay, seed=1000)
    if not (data / "A_val" / f"sub-{args.a_val:03d}").exists():
        generate_dataset(data / "A_val", cases=args.a_val, seed=9100)
    if not (data / "B" / f"sub-{args.b_cases:03d}").exists():
        generate_centre_dataset(data / "B", cases=args.b_cases, seed=9200, centre="B")
    a_replay = labelled_cases(a_train_dir, "A", "A-train", args.a_replay)
    a_val = labelled_cases(data / "A_val", "A", "A-val", args.a_val)
    b_all = labelled_cases(data / "B", "B", "B", args.b_cases)
    log(f"data: {len(a_replay)} A replay, {len(a_val)} A validation, {len(b_all)} B cases")

    common = dict(stage=2, iterations=args.iterations, batch_size=args.batch, patch_size=tuple(args.patch), tolerance=args.tolerance,
                  seed=args.seed, lr=args.lr, cache_dir=work / "cache", log=log)
    results: dict = {"settings": vars(args)}
    for arm in args.arms:
        arm_dir = work / f"{arm}{args.tag}"
        shutil.rmtree(arm_dir, ignore_errors=True)
        shutil.copytree(args.models, arm_dir / "models")
        if arm == "naive":  # B only; A validation is known (so A is the earlier centre) but never replayed
            init_state(arm_dir / "state", validation=a_val)
            res = retrain_round(a_val + b_all, arm_dir / "models", arm_dir / "state", replay=0.0, ewc_lambda=0.0, **common)
        else:
            init_state(arm_dir / "state", trained=a_replay, validation=a_val)
            res = retrain_round(a_replay + a_val + b_all, arm_dir / "models", arm_dir / "state", replay=args.replay, ewc_lambda=args.ewc_lambda, **common)
        log(f"{arm}: {res.reason}")
        results[arm] = {"published": res.published, "reason": res.reason, "seconds": res.seconds, **res.metrics}

    first = results[args.arms[0]]
    table = {"base": first["before"]}
    for arm in args.arms:
        table[arm] = results[arm]["after"]
    results["table"] = table
    (work / f"results{args.tag}.json").write_text(json.dumps(results, indent=1, default=lambda o: None))

    classes = ("whole-tumor", "tumor", "edema", "cavity")
    print("\nDice per centre (validation cases), whole tumour first:")
    print(f"{'model':<12}" + "".join(f"{c + ' ' + k:>18}" for c in ("A", "B") for k in classes))
    for model, summ in table.items():
        cells = []
        for c in ("A", "B"):
            for k in classes:
                v = summ.get(c, {}).get(f"{k}_dice")
                cells.append(f"{'n/a' if v is None else f'{v:.3f}':>18}")
        print(f"{model:<12}" + "".join(cells))
    for arm in args.arms:
        print(f"{arm}: {'published' if results[arm]['published'] else 'NOT published'} ({results[arm]['reason']})")
    wt = {m: {c: table[m].get(c, {}).get("whole-tumor_dice") for c in ("A", "B")} for m in table}
    fmt = lambda v: "nan" if v is None else f"{v:.4f}"  # noqa: E731
    print(" ".join(f"{c}_{m}={fmt(wt[m][c])}" for m in ("base", "naive", "continual") if m in wt for c in ("A", "B")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
