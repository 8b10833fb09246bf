import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundle"
sys.path.insert(0, str(ROOT))
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory):
    """Two generated subjects in a BIDS folder (seed never used for the shipped weights)."""
    from imsct.phantoms import generate_dataset

    out = tmp_path_factory.mktemp("phantoms")
    generate_dataset(out, cases=2, seed=424242)
    return out


@pytest.fixture(scope="session")
def cascade():
    from imsct.runner import build_cascade

    # float32: geometry and export checks compare outputs to 1e-3; the bfloat16 default path is
    # exercised by the command line, bundle and app tests and compared with this one in test_cascade_fast_path
    return build_cascade(BUNDLE / "models", keep_probabilities=True, amp=False)
