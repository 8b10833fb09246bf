"""torchrun with the gloo backend on CPU: 2 processes, tiny data."""

import csv
import os
import json
import math
import re
import subprocess
import sys

import torch

from support.paths import BUNDLE

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle", "run"]


def torchrun(configs, dataset, out, *extra):
    cmd = TORCHRUN + ["--config_file", str(configs), "--meta_file", "configs/metadata.json", "--logging_file",
                      "configs/logging.conf", "--dataset_dir", str(dataset), "--output_dir", str(out), *extra]
    proc = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_two_process_training(tiny_phantom_dir, tmp_path):
    log = torchrun("['configs/train.json','configs/multi_gpu_train.json']", tiny_phantom_dir, tmp_path, "--stage", "2",
                   "--epochs", "1", "--samples_per_epoch", "4", "--batch_size", "1", "--patch_size", "[32,32,32]",
                   "--val_fraction", "0.5")
    losses = [float(v) for v in re.findall(r"train_loss: ([0-9.eE+-]+|nan)", log)]
    assert losses and all(math.isfinite(v) for v in losses)
    assert len(re.findall(r"Iter: \d+/2 -- train_loss", log)) == 2  # 4 samples over 2 ranks, logged by rank 0 only
    ckpts = list(tmp_path.glob("checkpoint*.pt"))
    assert len(ckpts) == 1 and log.count("Saved checkpoint at epoch: 1") == 1
    state = torch.load(tmp_path / "best.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in state)  # saved unwrapped from DDP
    from imsct.networks import tumor_network

    tumor_network().load_state_dict(state)


def test_two_process_evaluation_shards_cases(tiny_phantom_dir, tmp_path):
    torchrun("['configs/inference.json','configs/evaluate.json','configs/multi_gpu_evaluate.json']", tiny_phantom_dir, tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert sorted(r["case"] for r in rows) == ["sub-001_T2w", "sub-002_T2w"]  # each case exactly once
    summary = json.loads((tmp_path / "summary.json").read_text())["summary"]
    assert summary["cases"] == 2
    for cls in ("tumor", "edema", "cavity", "whole-tumor"):  # every Table-4 metric per class
        for metric in ("dice", "tpr_detection", "fpr_detection", "precision", "recall", "avd", "rvd"):
            assert f"{cls}_{metric}" in rows[0] and f"{cls}_{metric}_mean" in summary
    for key in ("stage1_dice", "box_lesion_coverage"):
        assert 0.0 <= float(rows[0][key]) <= 1.0
    assert 0.0 <= summary["lesion_voxels_in_box"] <= 1.0
    preds = sorted(p.name for p in (tmp_path / "predictions").iterdir())
    assert len(preds) == 10 and len(set(preds)) == 10
