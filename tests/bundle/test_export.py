import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from support.paths import BUNDLE
from imsct.cascade import Cascade
from imsct import weights
from imsct.weights import export_models
from imsct.io import load_volume


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("exported")
    for key in weights.MODELS:  # every model of the table, the T2w-only one included
        shutil.copy(weights.path(key), weights.path(key, d))
    export_models(d)
    return d


@pytest.mark.parametrize("key", list(weights.MODELS))
@pytest.mark.parametrize("backend", ["torchscript", "onnx", "openvino"])
def test_exported_matches_eager(exported, key, backend):
    eager = weights.load(key, exported)
    net = weights.load_backend(key, exported, backend)
    stem, ext, channels = key, backend, weights.spec(key).in_channels
    torch.manual_seed(1)
    for shape in ((64, 64, 32), (128, 96, 32)):  # dynamic spatial size
        x = torch.randn(1, channels, *shape)
        from imsct.windows import accepts_validity

        # stage 2's and 3's graphs (they slide the same windows) take the validity channel (all ones:
        # a window of real voxels, the same z-score as the eager network without it)
        x_in = torch.cat([x, torch.ones_like(x[:, :1])], dim=1) if accepts_validity(net) else x
        assert accepts_validity(net) == (weights.spec(key).stage in (2, 3))
        with torch.no_grad():
            a, b = net(x_in), eager(x)
        # what the cascade uses: sigmoid probabilities
        pa, pb = torch.sigmoid(a), torch.sigmoid(b)
        prob_diff = (pa - pb).abs().max().item()
        # OpenVINO's float32 CPU kernels reorder the reductions more, and more on one thread: with the
        # fine-tuned anatomy weights on the 128 x 96 x 32 noise input, 1.00e-3 in probability (1.9e-4
        # relative in logits) on one thread, 3.9e-4 on two, against float64 eager (eager float32:
        # 1.6e-5); the localiser 8.8e-4. The bound leaves 3x room; the masks are checked below.
        tol_prob, tol_logit = (3e-3, 6e-4) if backend == "openvino" else (1e-4, 2e-5)
        assert prob_diff < tol_prob, (stem, ext, shape, prob_diff)
        # what the cascade keeps: the masks at 0.5 (measured: at most 1 voxel of 393,216 differs)
        flipped = ((pa > 0.5) != (pb > 0.5)).float().mean().item()
        assert flipped < 1e-4, (stem, ext, shape, flipped)
        # raw logits: ONNX Runtime's float32 kernels drift ~1e-4 on logits of magnitude ~10
        # (PyTorch eager is the closer of the two to a float64 reference), so compare relatively
        logit_diff = (a - b).abs().max().item() / max(1.0, b.abs().max().item())
        assert logit_diff < tol_logit, (stem, ext, shape, logit_diff)


def test_openvino_graph_made_once_into_the_cache(tmp_path, monkeypatch):
    """Without an export beside the weights, OpenVINO reads an ONNX graph made once into the user
    cache, named by the weights' hash, and the network gives the eager network's output."""
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(weights.path("localiser"), weights.path("localiser", models))
    monkeypatch.setenv("IMSCT_CACHE", str(tmp_path / "cache"))
    net = weights.load_backend("localiser", models, "openvino")
    made = list((tmp_path / "cache" / "onnx").glob("localiser-*.onnx"))
    assert len(made) == 1 and weights.onnx_source("localiser", models) == made[0]
    x = torch.randn(1, 1, 64, 64, 32)
    with torch.no_grad():
        assert (torch.sigmoid(net(x)) - torch.sigmoid(weights.load("localiser", models)(x))).abs().max() < 1e-3


def test_monai_ckpt_export_route(exported, tmp_path):
    out = tmp_path / "model_monai.ts"
    subprocess.run([sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(out),
                    "--ckpt_file", str(weights.path("tumor", exported)), "--meta_file", "configs/metadata.json",
                    "--config_file", "configs/inference.json"], cwd=BUNDLE, check=True, capture_output=True)
    ts = torch.jit.load(str(out), map_location="cpu")
    eager = weights.load("tumor", exported)
    x = torch.randn(1, 2, 64, 64, 32)
    with torch.no_grad():
        assert (ts(x) - eager(x)).abs().max().item() < 1e-4


def test_cascade_runs_from_onnx(exported, tiny_phantom_dir, cascade):
    t2 = load_volume(next(tiny_phantom_dir.glob("sub-002/anat/*_T2w.nii.gz")))
    t1 = load_volume(next(tiny_phantom_dir.glob("sub-002/anat/*_T1w.nii.gz")))
    onnx = Cascade.from_models(exported, backend="onnx", keep_probabilities=True, with_anatomy=False)
    a, b = cascade(t2, t1), onnx(t2, t1)  # both float32
    assert np.abs(a.probabilities - b.probabilities).max() < 1e-3
    assert (a.labelmap != b.labelmap).mean() < 1e-4
