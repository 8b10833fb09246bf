"""Bundle training through `python -m monai.bundle run` on two small phantoms."""

import math
import re
import subprocess
import sys

import pytest
import torch

from imsct import weights
from support.paths import BUNDLE

TINY = ["--samples_per_epoch", "2", "--val_fraction", "0.5", "--num_workers", "0"]


def train(dataset, out, *extra, config="configs/train.json"):
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config, "--meta_file", "configs/metadata.json",
           "--logging_file", "configs/logging.conf", "--dataset_dir", str(dataset), "--output_dir", str(out), *TINY, *extra]
    proc = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def epoch_of(ckpt):
    return ckpt["trainer"]["iteration"] // ckpt["trainer"]["epoch_length"]


def losses(log):
    return [float(v) for v in re.findall(r"train_loss: ([0-9.eE+-]+|nan)", log)]


@pytest.fixture(scope="module")
def stage2_run(tiny_phantom_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("train2")
    log = train(tiny_phantom_dir, out, "--stage", "2", "--epochs", "1", "--batch_size", "2", "--patch_size", "[64,64,32]")
    return out, log


def test_stage2_one_epoch(stage2_run):
    out, log = stage2_run
    assert losses(log) and all(math.isfinite(v) for v in losses(log))
    assert "val_mean_dice" in log
    ckpt = torch.load(next(out.glob("checkpoint*.pt")), map_location="cpu", weights_only=False)
    assert set(ckpt) == {"model", "optimizer", "lr_scheduler", "trainer"} and epoch_of(ckpt) == 1
    from imsct import weights

    weights.load("tumor", file=out / "best.pt")  # the best model loads into the served network
    assert list(out.glob("events.out.tfevents.*")), "TensorBoard logs"
    assert list((out / "cache").glob("*.npz"))


def test_resume_continues_from_saved_epoch(stage2_run, tiny_phantom_dir):
    out, _ = stage2_run
    log = train(tiny_phantom_dir, out, "--stage", "2", "--epochs", "2", "--batch_size", "2", "--patch_size", "[64,64,32]", "--resume", "True")
    assert "Restored all variables" in log
    assert "Epoch[2] Complete" in log and "Epoch[1] Complete" not in log
    latest = max(out.glob("checkpoint*.pt"), key=lambda p: p.stat().st_mtime)
    assert epoch_of(torch.load(latest, map_location="cpu", weights_only=False)) == 2


def test_stage1_one_epoch(tiny_phantom_dir, tmp_path):
    log = train(tiny_phantom_dir, tmp_path, "--stage", "1", "--epochs", "1", "--batch_size", "1", "--patch_size", "[128,64,32]")
    assert losses(log) and all(math.isfinite(v) for v in losses(log))
    from imsct import weights

    weights.load("localiser", file=tmp_path / "best.pt")


def test_finetune_starts_from_shipped_weights_and_tracks_in_mlflow(tiny_phantom_dir, tmp_path):
    """One run for two switches (each bundle run pays MONAI's start-up): --finetune starts from the
    shipped weights (learning rate 0: the best checkpoint equals them), --tracking mlflow logs the loss."""
    train(tiny_phantom_dir, tmp_path, "--stage", "2", "--epochs", "1", "--batch_size", "1", "--patch_size", "[32,32,32]",
          "--finetune", "True", "--learning_rate", "0.0", "--tracking", "mlflow")
    shipped = torch.load(weights.path("tumor"), map_location="cpu", weights_only=True)
    tuned = torch.load(tmp_path / "best.pt", map_location="cpu", weights_only=True)
    assert shipped.keys() == tuned.keys()
    for k in shipped:
        assert torch.allclose(shipped[k].float(), tuned[k].float()), k
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert runs and any("train_loss" in r.data.metrics for r in runs)
