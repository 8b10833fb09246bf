"""The bundle's configs spell the recipe a second time (MONAI bundles are JSON); these tests fail when
they drift from the library's defaults, which the command line, the app and continual learning use."""

import os

import pytest
from monai.bundle import ConfigParser

from imsct import weights
from imsct.cascade import ROI_SIZE, Cascade
from support.paths import BUNDLE


def parsed(*configs, **overrides):
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / c) for c in configs])
    parser.read_meta(str(BUNDLE / "configs" / "metadata.json"))
    parser["bundle_root"] = str(BUNDLE)
    for k, v in overrides.items():
        parser[k] = v
    return parser


def _bundle_cascade(**overrides):
    cwd = os.getcwd()
    os.chdir(BUNDLE)
    try:
        return parsed("inference.json", **overrides).get_parsed_content("cascade")
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def bundle_cascade():
    return _bundle_cascade()


def test_inference_config_matches_the_library_defaults(bundle_cascade):
    lib = Cascade.from_models()
    assert bundle_cascade.localiser.__class__.__name__ == lib.localiser.__class__.__name__  # same backend
    for attr in ("threshold", "min_volume_cm3", "fill_holes", "field_size", "fit_field", "safety_factor", "spacing", "amp",
                 "t2_only", "min_t1_coverage", "keep_probabilities"):
        assert getattr(bundle_cascade, attr) == getattr(lib, attr), attr
    for attr in ("roi_size", "overlap", "sw_batch_size", "mode"):
        a, b = getattr(bundle_cascade.inferer, attr), getattr(lib.inferer, attr)
        assert (tuple(a) if isinstance(a, list) else a) == (tuple(b) if isinstance(b, list) else b), attr


def test_inference_config_loads_the_table_s_weights():
    bundle = _bundle_cascade(backend="eager")
    lib = Cascade.from_models(backend="eager")
    assert bundle.anatomy is not None and lib.anatomy is not None  # the cord-and-levels network, as the CLI runs it
    assert bundle.models == lib.models
    for a, b in ((bundle.localiser, lib.localiser), (bundle.segmenter, lib.segmenter), (bundle.anatomy, lib.anatomy)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa and sa.keys() == sb.keys() and all((sa[k] == sb[k]).all() for k in sa)


def test_training_config_builds_the_same_networks_and_validates_like_inference():
    for stage in (1, 2):
        p = parsed("train.json")
        p["stage"] = stage
        net = p.get_parsed_content("network_def")
        ref = weights.build(weights.stage_model(stage).key)
        assert type(net) is type(ref)
        assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    p = parsed("train.json")
    assert tuple(p.get_parsed_content("roi_size")) == ROI_SIZE
    lib = Cascade.from_models().inferer
    val = p.get_parsed_content("validate#inferer#inferer")
    assert val.overlap == lib.overlap and val.mode == lib.mode


def test_validation_can_count_healthy_subjects():
    """val_ignore_empty False: a class absent from the truth scores 1 when nothing is predicted and 0
    for any false positive, so the checkpoint kept as best.pt is judged on healthy subjects too; the
    default (True) leaves such classes out, as MONAI's MeanDice does."""
    import torch

    truth = torch.zeros(2, 4, 8, 8, 8)
    truth[0, :, 2:5, 2:5, 2:5] = 1  # subject 0 has a lesion (every class channel), subject 1 none
    pred = truth.clone()
    pred[1, 1, 0, 0, 0] = 1  # one false-positive voxel of edema on the healthy subject
    scores = {}
    for ignore in (True, False):
        p = parsed("train.json")
        p["val_ignore_empty"] = ignore
        handler = p.get_parsed_content("validate#key_metric#val_mean_dice")
        handler.metric_fn(y_pred=pred, y=truth)
        scores[ignore] = float(handler.metric_fn.aggregate())
    assert parsed("train.json")["val_ignore_empty"] is True
    assert scores[True] == pytest.approx(1.0)  # the healthy subject left out
    assert scores[False] == pytest.approx((4 + 3) / 8)  # its edema channel 0, its three silent channels 1
