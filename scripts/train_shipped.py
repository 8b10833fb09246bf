"""Reproduce the shipped weights in bundle/models/ from seeds: phantoms, both stages, evaluation.

    python scripts/train_shipped.py --work work/shipped --cases 80 --seed 1000 \
        --steps1 300 --steps2 600 --eval-cases 20 --eval-seed 9000

Stage 1 and stage 2 train one after the other or in parallel (``--parallel``, one thread each).
The record (command, seeds, cases, steps, losses, held-out metrics) goes to
bundle/models/provenance.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imsct.phantoms import generate_dataset  # noqa: E402
from imsct.training import train_stage  # noqa: E402


def _train(kw, threads, q):
    torch.set_num_threads(threads)
    q.put(train_stage(**kw))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="work/shipped")
    ap.add_argument("--models", default=str(ROOT / "bundle" / "models"))
    ap.add_argument("--cases", type=int, default=80)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--steps1", type=int, default=300)
    ap.add_argument("--steps2", type=int, default=600)
    ap.add_argument("--batch1", type=int, default=2)
    ap.add_argument("--batch2", type=int, default=4)
    ap.add_argument("--patch2", type=int, nargs=3, default=[96, 96, 32])
    ap.add_argument("--time-limit1", type=float, default=None, help="seconds")
    ap.add_argument("--time-limit2", type=float, default=None, help="seconds")
    ap.add_argument("--parallel", action="store_true", help="train both stages at once, one thread each")
    ap.add_argument("--eval-cases", type=int, default=20)
    ap.add_argument("--eval-seed", type=int, default=9000)
    args = ap.parse_args(argv)
    work = Path(args.work)
    data = work / "train"
    t0 = time.time()
    if not (data / "participants.tsv").exists():
        generate_dataset(data, args.cases, args.seed, progress=True)
    gen_s = time.time() - t0
    models = Path(args.models)
    common = dict(dataset_dir=data, cache_dir=work / "cache", seed=args.seed)
    kw1 = dict(stage=1, out=models / "localiser.pt", steps=args.steps1, batch_size=args.batch1, time_limit_s=args.time_limit1, **common)
    kw2 = dict(stage=2, out=models / "model.pt", steps=args.steps2, batch_size=args.batch2, patch=tuple(args.patch2), time_limit_s=args.time_limit2, **common)
    from imsct.bids import find_cases
    from imsct.training import prepare_case

    for c in find_cases(data):  # cache once, before any worker starts
        prepare_case(c, work / "cache")
    if args.parallel:
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        procs = [ctx.Process(target=_train, args=(kw, 1, q)) for kw in (kw1, kw2)]
        for p in procs:
            p.start()
        recs = [q.get(), q.get()]
        for p in procs:
            p.join()
        recs.sort(key=lambda r: r["stage"])
    else:
        recs = [train_stage(**kw1), train_stage(**kw2)]
    record = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:])),
        "training_data": {"generator": "python -m imsct.phantoms", "cases": args.cases, "seed": args.seed, "generation_s": round(gen_s, 1)},
        "stage1": recs[0], "stage2": recs[1],
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    models.mkdir(parents=True, exist_ok=True)
    (models / "provenance.json").write_text(json.dumps(record, indent=1))
    print(f"weights in {models}; record in {models / 'provenance.json'}")
    if args.eval_cases:
        from evaluate_heldout import evaluate  # noqa: E402

        res = evaluate(models, work / "heldout", args.eval_cases, args.eval_seed)
        record["heldout"] = res
        (models / "provenance.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
