"""Interactive correction (imsct.clicks): click conventions and maps, the click simulator, the
click-guided network's start from stage 2, and the shipped weights' gain from clicks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imsct import weights
from imsct.clicks import (CLICK_CLASSES, CROP_SIZE, SIGMA_MM, check_inside, click_box, click_maps, dice_after_clicks, lesion_region,
                          next_click, parse_points, to_working_points)
from imsct.geometry import WORKING_SPACING, working_grid
from imsct.io import InputError, world
from imsct.networks import ClickGuided


def test_click_maps_peak_at_the_clicked_voxels_of_their_class():
    pts = {"tumor": np.array([[10, 12, 5]]), "background": np.array([[30, 4, 2], [3, 40, 9]]), "edema": np.zeros((0, 3))}
    maps = click_maps(pts, (40, 48, 12), WORKING_SPACING)
    assert maps.shape == (4, 40, 48, 12) and maps.dtype == np.float32
    t, e, c, bg = (CLICK_CLASSES.index(k) for k in ("tumor", "edema", "cavity", "background"))
    assert maps[t, 10, 12, 5] == 1.0 and np.unravel_index(maps[t].argmax(), maps[t].shape) == (10, 12, 5)
    assert maps[bg, 30, 4, 2] == 1.0 and maps[bg, 3, 40, 9] == 1.0
    assert not maps[e].any() and not maps[c].any()
    # a Gaussian of the distance in mm: one voxel along right-left is 2 mm, along superior-inferior 1 mm
    assert maps[t, 11, 12, 5] == pytest.approx(np.exp(-1 / (2 * SIGMA_MM**2)), rel=1e-5)
    assert maps[t, 10, 12, 6] == pytest.approx(np.exp(-4 / (2 * SIGMA_MM**2)), rel=1e-5)
    assert maps[t, 10 + int(3 * SIGMA_MM) + 1, 12, 5] == 0.0  # cut at 3 sigma
    # the same click seen from a crop starting at voxel (5, 5, 2) of the grid
    crop = click_maps(pts, (20, 20, 8), WORKING_SPACING, origin=(5, 5, 2))
    assert np.array_equal(crop[t], maps[t, 5:25, 5:25, 2:10])
    assert maps.min() >= 0 and maps.max() <= 1  # never z-scored


def test_monai_label_deepedit_and_deepgrow_parameters():
    request = {"model": "clicks", "image": "/x/sub-001.nii.gz", "device": "cpu", "result_extension": ".nii.gz",
               "tumor": [[10, 20, 3], [11, 21, 3]], "edema": [], "background": [[1, 2, 0]], "cavity": "[[4, 5, 6]]"}
    pts = parse_points(request)
    assert set(pts) == set(CLICK_CLASSES)
    assert pts["tumor"].tolist() == [[10, 20, 3], [11, 21, 3]] and pts["cavity"].tolist() == [[4, 5, 6]]
    assert pts["background"].tolist() == [[1, 2, 0]] and pts["edema"].shape == (0, 3)
    grow = parse_points({"foreground": [[7, 8, 9]], "background": [], "label": "edema"})
    assert grow["edema"].tolist() == [[7, 8, 9]] and len(grow["tumor"]) == 0
    with pytest.raises(InputError, match="'label'"):
        parse_points({"foreground": [[7, 8, 9]]})
    with pytest.raises(InputError, match="'tumor'"):
        parse_points({"tumor": [[1, 2]]})
    with pytest.raises(InputError, match=r"click 'background' at voxel \[1.0, 99.0, 0.0\]: outside the T2w \(40 x 50 x 8 voxels\)"):
        check_inside(parse_points({"background": [[1, 99, 0]]}), (40, 50, 8), "T2w")


def test_native_clicks_land_on_the_working_voxel_of_the_same_world_point():
    # an oblique, anisotropic native grid (0.6 x 0.6 x 3 mm, rotated) and its working grid
    a = np.deg2rad(12)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.6, 0.6, 3.0])
    affine[:3, 3] = [-40, 10, 7]
    shape = (120, 100, 12)
    w_shape, w_aff = working_grid(affine, shape)
    native = {"tumor": np.array([[60, 50, 6], [10, 90, 1]]), "background": np.zeros((0, 3))}
    pts = to_working_points(native, affine, w_aff)
    assert np.allclose(world(pts["tumor"], w_aff), world(native["tumor"], affine), atol=1e-6)
    maps = click_maps(pts, w_shape, WORKING_SPACING)
    t = CLICK_CLASSES.index("tumor")
    peak = np.unravel_index(maps[t].argmax(), w_shape)
    assert np.abs(np.asarray(peak) - pts["tumor"][0]).max() <= 0.5 or np.abs(np.asarray(peak) - pts["tumor"][1]).max() <= 0.5


def test_click_box_is_the_crop_around_the_clicks_inside_the_field():
    lo, hi = click_box({"tumor": np.array([[50, 60, 20]])}, (200, 150, 40))
    assert (hi - lo).tolist() == list(CROP_SIZE) and (lo <= [50, 60, 20]).all() and (hi > [50, 60, 20]).all()
    lo, hi = click_box({"tumor": np.array([[1, 1, 1]]), "background": np.array([[199, 2, 1]])}, (200, 150, 20))
    assert lo.tolist() == [1, 0, 0] and hi.tolist() == [200, 64, 20]  # grown to hold both, clipped to a thin field


def test_simulated_click_goes_to_the_centre_of_the_largest_error():
    truth = np.zeros((30, 30, 20), np.uint8)
    truth[2:9, 2:9, 2:9] = 2  # edema, missed entirely: 343 voxels
    truth[20:25, 20:25, 10:15] = 1  # tumour, found
    pred = truth.copy()
    pred[2:9, 2:9, 2:9] = 0
    pred[12:17, 12:17, 12:17] = 3  # a false cavity on background: 125 voxels
    name, ijk = next_click(pred, truth)
    assert name == "edema" and ijk.tolist() == [5, 5, 5]
    pred[2:9, 2:9, 2:9] = 2  # once the edema is right, the false cavity is the largest error
    name, ijk = next_click(pred, truth)
    assert name == "background" and ijk.tolist() == [14, 14, 14]
    assert next_click(truth, truth) is None
    # errors only where the patch is valid (imsct.windows: padding is not anatomy)
    valid = np.ones(truth.shape, bool)
    valid[10:20] = False
    assert next_click(pred, truth, valid=valid) is None


def test_click_network_equals_stage2_at_initialisation():
    stage2 = weights.load("tumor")
    net = ClickGuided.from_stage2(stage2).eval()
    assert set(net.state_dict()) == set(weights.build("clicks").state_dict())
    torch.manual_seed(0)
    x = torch.randn(1, 2, 32, 32, 32) * 50 + 300
    valid = torch.ones(1, 1, 32, 32, 32)
    valid[..., 28:] = 0
    with torch.no_grad():
        want = stage2(torch.cat([x, valid], 1))
        assert torch.equal(net(torch.cat([x, torch.zeros(1, 4, 32, 32, 32), valid], 1)), want)
        clicks = torch.rand(1, 4, 32, 32, 32)
        assert torch.equal(net(torch.cat([x, clicks, valid], 1)), want)  # zero click weights: clicks change nothing yet
        net.click_stem.weight.add_(0.1)
        assert not torch.equal(net(torch.cat([x, clicks, valid], 1)), want)  # trained click weights reach the output


@pytest.fixture(scope="module")
def lesion_case(tmp_path_factory):
    """A tiny lesion phantom on the working grid, cut to its lesion (as scripts/evaluate_clicks.py)."""
    from imsct.bids import find_cases
    from imsct.phantoms import generate_case, write_case
    from imsct.training import prepare_case, stage2_region

    root = tmp_path_factory.mktemp("click_phantom")
    write_case(generate_case(9501, 3, max_voxels=400_000, healthy_fraction=0.0, random_intensity_fraction=0.0,
                             acquisition="sagittal", storage="int16"), root / "bids")
    d = np.load(prepare_case(find_cases(root / "bids")[0], root / "cache"))
    sl = stage2_region(d, crop_to_cord=True, whole_length=False)
    return lesion_region(np.stack([d["t2"][sl], d["t1"][sl]]).astype(np.float32), d["label"][sl])


def test_shipped_click_weights_gain_from_three_clicks(lesion_case):
    """Seed 9501 subject 3 (never used in training; the held-out phantoms are seed 9500), a small
    tumour missed in part without clicks: whole-tumour Dice 0.214 without clicks, 0.252 after 3
    simulated clicks (measured, one thread, AVX2 host). Asserted: at least 0.01 above, a behaviour
    check with room for float differences between CPUs and thread counts, not a benchmark (on the 12
    held-out phantoms the mean whole-tumour gain is +0.006 after 3 clicks: README)."""
    if not weights.path("clicks").is_file():
        pytest.skip("bundle/models/clicks.pt not shipped (scripts/train_clicks.py ships it only when clicks beat no clicks)")
    image, truth = lesion_case
    assert truth.any()
    dice = dice_after_clicks(weights.load("clicks"), image, truth, WORKING_SPACING, clicks=(0, 3))
    assert dice[3]["whole-tumor"] >= dice[0]["whole-tumor"] + 0.01, dice


def test_a_click_that_did_not_fix_its_region_is_not_repeated():
    truth = np.zeros((30, 30, 12), np.uint8)
    truth[5:25, 10:14, 4:8] = 1  # a long missed tumour
    pred = np.zeros_like(truth)
    first = next_click(pred, truth, WORKING_SPACING)
    assert first[0] == "tumor" and truth[tuple(first[1])] == 1
    second = next_click(pred, truth, WORKING_SPACING, clicked={"tumor": first[1][None].astype(float)})
    assert second[0] == "tumor" and truth[tuple(second[1])] == 1
    assert np.linalg.norm((second[1] - first[1]) * WORKING_SPACING) > SIGMA_MM
