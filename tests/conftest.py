import os
import sys

import pytest
import torch

from support.paths import ROOT

sys.path.insert(0, str(ROOT))
# with pytest-xdist (`make test` runs one worker per core), each worker takes its share of the cores
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(4, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory):
    """Two generated subjects in a BIDS folder (seed never used for the shipped weights), their T2w
    matrix capped at 1.5 M voxels (a quarter of the default): every test on them is about behaviour,
    not size, and the suite must stay fast on slow CPUs."""
    from imsct.phantoms import generate_dataset
    from support.cases import LIKE_SHIPPED_TRAINING

    out = tmp_path_factory.mktemp("phantoms")
    generate_dataset(out, cases=2, seed=424242, max_voxels=1_500_000, **LIKE_SHIPPED_TRAINING)
    return out


@pytest.fixture(scope="session")
def tiny_phantom_dir(tmp_path_factory):
    """The same two subjects with their field of view shrunk to 0.4 M voxels, for runs whose checks do not
    depend on what the image shows (training loops, checkpoints, sharding, batch bookkeeping): there a
    run costs MONAI's start-up and a few windows, and its validation slides over a small field."""
    from imsct.phantoms import generate_dataset
    from support.cases import LIKE_SHIPPED_TRAINING

    out = tmp_path_factory.mktemp("tiny_phantoms")
    generate_dataset(out, cases=2, seed=424242, max_voxels=400_000, **LIKE_SHIPPED_TRAINING)
    return out


@pytest.fixture(scope="session")
def cascade():
    from imsct.cascade import Cascade

    # float32: geometry and export checks compare outputs to 1e-3; the bfloat16 default path is
    # exercised by the command line, bundle and app tests and compared with this one in test_cascade_fast_path;
    # no anatomy network: no library test here reads the cord or levels (the CLI and bundle tests do), and it
    # would add a third of each call
    return Cascade.from_models(keep_probabilities=True, precision="float32", backend="eager", with_anatomy=False)
