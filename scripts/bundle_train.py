"""Launch ``python -m monai.bundle run`` on the bundle's train.json: the one place the scripts
(train_shipped, ksplit, cascade_experiment) build and start a training process."""

from __future__ import annotations

import os
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


def start_bundle_training(log: Path, threads: int, **overrides) -> tuple[subprocess.Popen, list[str]]:
    """Start one training process from bundle/ with ``threads`` CPU threads, output to ``log``."""
    cmd = bundle_train_command(**overrides)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.Popen(cmd, cwd=BUNDLE, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    return proc, cmd
