"""Batch throughput of ``imsct segment --bids`` (not a test): cases per minute by number of jobs.

    python scripts/benchmark_batch.py [--cases 8] [--seed 9300] [--jobs 1,2] [--work work/benchmark_batch]

Generates ``--cases`` phantoms of the default generator (mixed acquisitions, healthy subjects
included), then runs the real command line, ``imsct segment --bids DATA -o OUT --overwrite --jobs J``,
once per ``J`` (and once with ``--no-anatomy`` at the first J, for the cost of the cord and
levels), each in a fresh process so that start-up is counted. Wall time is the whole command;
cases per minute = cases / wall time. Ratios are against the first configuration of the same run,
so they hold from machine to machine where absolute times do not.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(data: Path, out: Path, jobs: int, *extra: str) -> float:
    cmd = [sys.executable, "-m", "imsct", "segment", "--bids", str(data), "-o", str(out), "--overwrite",
           "--jobs", str(jobs), *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--seed", type=int, default=9300)
    ap.add_argument("--jobs", default="1,2", help="comma-separated job counts")
    ap.add_argument("--work", default="work/benchmark_batch")
    args = ap.parse_args(argv)
    from imsct.phantoms import generate_dataset

    work = Path(args.work)
    data = work / "data"
    if not (data / "participants.tsv").exists():
        generate_dataset(data, args.cases, args.seed)
    jobs = [int(j) for j in args.jobs.split(",")]
    configs = [(f"--jobs {j}", j, ()) for j in jobs] + [(f"--jobs {jobs[0]} --no-anatomy", jobs[0], ("--no-anatomy",))]
    print(f"{args.cases} cases (seed {args.seed}), {os.cpu_count()} CPU(s)")
    first = None
    for name, j, extra in configs:
        wall = run(data, work / "out", j, *extra)
        rate = args.cases / wall * 60.0
        first = first or rate
        print(f"{name:<26} wall {wall:7.1f} s  {rate:5.2f} cases/min  x{rate / first:.2f} vs {configs[0][0]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
