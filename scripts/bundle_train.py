"""Launch ``python -m monai.bundle run`` on the bundle's train.json: the one place the scripts
(train_shipped, ksplit, cascade_experiment) build and start a training process."""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
from pathlib import Path

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"


def bundle_train_command(**overrides) -> list[str]:
    """The command line; each override becomes ``--key value`` (paths made absolute)."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json",
           "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf"]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value.resolve()) if isinstance(value, Path) else str(value)]
    return cmd


def start_bundle_training(log: Path, threads: int, append: bool = False, **overrides) -> tuple[subprocess.Popen, list[str]]:
    """Start one training process from bundle/ with ``threads`` CPU threads, output to ``log``
    (appended to with ``append``, as a resumed run does)."""
    cmd = bundle_train_command(**overrides)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.Popen(cmd, cwd=BUNDLE, env=env, stdout=open(log, "a" if append else "w"), stderr=subprocess.STDOUT)
    return proc, cmd


# ---- reading a bundle training log (console format of configs/logging.conf) ----


def parse_log(text: str) -> dict:
    """Per-epoch training loss (mean of the iterations) and validation Dice from a bundle log."""
    epochs: dict[int, list[float]] = {}
    for ep, loss in re.findall(r"Epoch: (\d+)/\d+, Iter: \d+/\d+ -- train_loss: ([0-9.eE+-]+)", text):
        epochs.setdefault(int(ep), []).append(float(loss))
    val = [(int(e), float(d)) for e, d in re.findall(r"Epoch\[(\d+)\] Metrics -- val_mean_dice: ([0-9.]+)", text)]
    return {"train_loss_per_epoch": {e: round(sum(v) / len(v), 4) for e, v in sorted(epochs.items())},
            "val_mean_dice": val, "best_val_mean_dice": max((d for _, d in val), default=None),
            "epochs_done": max(epochs, default=0)}


def log_span_s(log: str) -> float | None:
    """Seconds from the first to the last time stamp of a bundle log (a stage's training wall time)."""
    stamps = re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) - ", log, re.M)
    if len(stamps) < 2:
        return None
    t = [dt.datetime.strptime(v, "%Y-%m-%d %H:%M:%S,%f") for v in (stamps[0], stamps[-1])]
    return round((t[1] - t[0]).total_seconds(), 1)


def training_wall_s(log: str, pause_s: float = 1800.0) -> float:
    """Seconds of training in a log that may hold several runs (a run and its resumptions): the sum
    of the gaps between consecutive time stamps, leaving out gaps over ``pause_s`` (the time between
    a stopped run and its resumption; no epoch or validation of these trainings takes that long)."""
    t = [dt.datetime.strptime(v, "%Y-%m-%d %H:%M:%S,%f").timestamp()
         for v in re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) - ", log, re.M)]
    return round(sum(g for g in (b - a for a, b in zip(t, t[1:])) if g <= pause_s), 1)


def seconds_per_iteration(log: str) -> float:
    stamps = [dt.datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f") for t in re.findall(r"^(\S+ \S+) - INFO - Epoch: \d+/\d+, Iter:", log, re.M)]
    if len(stamps) < 2:
        return float("nan")
    gaps = sorted(b.timestamp() - a.timestamp() for a, b in zip(stamps, stamps[1:]))
    return float(gaps[len(gaps) // 2])  # median: validation pauses between epochs are left out
