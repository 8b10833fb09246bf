"""Stage-2 windows never show padding as anatomy (issue 12, part 1): one rule (imsct.windows) for
inference, validation, training patches and the app's Monte-Carlo scoring.

The rule fits the window to the crop, so the test is the one for a fitted window: no zero voxel of
padding ever reaches the network, what is padded (an axis shorter than 32) is a replicated edge
marked invalid, and the z-score takes its statistics from the real voxels only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imsct.networks import ModifiedUNet3D, PatchNormalised
from imsct.windows import PaddingSafeInferer, fitted_window, pad_replicate, padding_safe


def small_tumor_network():
    torch.manual_seed(0)
    return PatchNormalised(ModifiedUNet3D(in_channels=2, out_channels=4, base_filters=2)).eval()


class Spy(torch.nn.Module):
    """Records every window the sliding window hands to the network."""

    def __init__(self, net):
        super().__init__()
        self.net, self.seen = net, []
        self.accepts_validity = True

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.net(x)


@pytest.mark.parametrize("shape, want", [((55, 60, 26), (48, 48, 32)), ((550, 70, 35), (128, 64, 32)),
                                         ((300, 300, 40), (128, 128, 32)), ((20, 129, 31), (32, 128, 32))])
def test_window_fitted_to_the_crop(shape, want):
    assert fitted_window(shape, (128, 128, 32)) == want
    assert all(w % 16 == 0 and w >= 32 for w in want)


def test_no_zero_padding_reaches_the_network():
    # a positive crop smaller than the 128 x 128 x 32 window on every axis, 26 voxels right-left
    rng = np.random.default_rng(0)
    crop = torch.from_numpy(rng.uniform(1.0, 2.0, (1, 2, 55, 60, 26)).astype(np.float32))
    spy = Spy(small_tumor_network())
    with torch.no_grad():
        out = PaddingSafeInferer((128, 128, 32), sw_batch_size=2)(crop, spy)
    assert out.shape == (1, 4, 55, 60, 26)
    assert spy.seen
    for x in spy.seen:
        assert tuple(x.shape[2:]) == (48, 48, 32)  # windows inside the crop where it is long enough
        assert x.shape[1] == 3  # [T2w, T1w, validity]
        image, valid = x[:, :2], x[:, 2]
        assert (image >= 1.0).all(), "a zero voxel reached the network"
        # only the right-left axis (26 < 32) is padded: the last 6 slices, replicated from slice 25
        assert (valid[..., :26] == 1).all() and (valid[..., 26:] == 0).all()
        assert torch.equal(image[..., 26:], image[..., 25:26].expand_as(image[..., 26:]))


def test_zscore_statistics_from_real_voxels_only():
    inner = torch.nn.Identity()
    inner.in_channels = 2
    norm = PatchNormalised(inner)
    real = torch.randn(1, 2, 32, 32, 26) * 3 + 7
    padded, valid = pad_replicate(real, (32, 32, 32))
    got = norm(torch.cat([padded, valid], dim=1))[..., :26]
    mean = real.mean(dim=(2, 3, 4), keepdim=True)
    std = real.std(dim=(2, 3, 4), keepdim=True)
    torch.testing.assert_close(got, (real - mean) / (std + norm.eps), atol=1e-5, rtol=1e-5)
    # a mask of ones is exactly the old whole-patch z-score
    full = torch.randn(1, 2, 32, 32, 32)
    torch.testing.assert_close(norm(torch.cat([full, torch.ones(1, 1, 32, 32, 32)], 1)), norm(full), atol=0, rtol=0)


def test_cascade_and_bundle_use_the_one_rule(cascade):
    from monai.inferers import SlidingWindowInferer

    from imsct.cascade import Cascade

    assert isinstance(cascade.inferer, PaddingSafeInferer)
    plain = Cascade(None, small_tumor_network(), inferer=SlidingWindowInferer((128, 128, 32), sw_batch_size=3, overlap=0.5))
    assert isinstance(plain.inferer, PaddingSafeInferer)
    assert (plain.inferer.roi_size, plain.inferer.sw_batch_size, plain.inferer.overlap) == ((128, 128, 32), 3, 0.5)
    assert padding_safe(plain.inferer) is plain.inferer
    probs = plain.segment_crop(np.random.default_rng(1).uniform(1, 2, (2, 40, 36, 20)).astype(np.float32))
    assert probs.shape == (4, 40, 36, 20) and np.isfinite(probs).all()


def _tiny_npz(tmp_path, shape=(40, 50, 20)):
    rng = np.random.default_rng(2)
    cord = np.zeros(shape, np.uint8)
    cord[:, 20:30, 8:12] = 1
    label = np.zeros(shape, np.uint8)
    label[15:25, 22:28, 9:11] = 1
    path = tmp_path / "case.npz"
    np.savez(path, t2=rng.uniform(1, 2, shape).astype(np.float32), t1=rng.uniform(1, 2, shape).astype(np.float32),
             label=label, cord=cord, affine=np.diag([1.0, 1.0, 2.0, 1.0]))
    return path


def test_training_patch_padded_like_inference(tmp_path):
    from imsct.training import PatchDataset, stage2_sample

    npz = _tiny_npz(tmp_path)
    for seed in range(4):
        x, y = stage2_sample(npz, np.random.default_rng(seed), (128, 128, 32))
        assert x.shape == (3, 128, 128, 32) and y.shape == (4, 128, 128, 32)
        assert (x[:2] >= 1.0).all(), "zero padding in a training patch"
        assert x[2].sum() == 40 * 50 * 20 and (x[2][:40, :50, :20] == 1).all()
        np.testing.assert_array_equal(x[:2, 40:], np.broadcast_to(x[:2, 39:40], x[:2, 40:].shape))
    # with the random affine too: the warp samples the border, never zeros, and marks it invalid
    torch.manual_seed(0)
    ds = PatchDataset([npz], 2, (64, 64, 32), samples=6, augment_prob=1.0)
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (3, 64, 64, 32)
        assert (item["image"][:2] > 0.5).all()
        assert set(torch.unique(item["image"][2]).tolist()) <= {0.0, 1.0}
        # the network takes the patch with its validity channel
    with torch.no_grad():
        out = small_tumor_network()(torch.stack([ds[0]["image"], ds[1]["image"]]))
    assert out.shape == (2, 4, 64, 64, 32)


def test_validation_uses_the_inference_windows():
    from monai.bundle import ConfigParser

    from support.paths import BUNDLE

    p = ConfigParser()
    p.read_config(str(BUNDLE / "configs" / "train.json"))
    p["bundle_root"] = str(BUNDLE)
    p["stage"] = 2
    val = p.get_parsed_content("validate#inferer#inferer")
    assert isinstance(val, PaddingSafeInferer) and val.roi_size == (128, 128, 32)
    p = ConfigParser()
    p.read_config(str(BUNDLE / "configs" / "train.json"))
    p["stage"] = 1
    assert not isinstance(p.get_parsed_content("validate#inferer#inferer"), PaddingSafeInferer)  # stage 1's field is its own


def test_anatomy_patches_and_validation_reach_past_the_cord_ends(tmp_path):
    """Stage 3 trains and validates over the field's whole superior-inferior length, as stage 1's
    region reaches at test time in long fields: some patches lie wholly below the conus (where the
    cord target is empty), and the validation input is the whole length, not the cord box."""
    from imsct.training import PatchDataset, ValidationDataset, anatomy_sample

    shape = (300, 60, 20)  # axis 0: inferior (0) to superior
    rows = np.broadcast_to(np.arange(shape[0], dtype=np.float32)[:, None, None] + 1.0, shape)
    cord = np.zeros(shape, np.uint8)
    cord[150:, 25:35, 8:12] = 1  # the cord ends at row 150 (the conus); below it, other tissue
    discs = np.zeros(shape, np.uint8)
    discs[200:206, 36:44, 8:12] = 1
    npz = tmp_path / "long.npz"
    np.savez(npz, t2=np.ascontiguousarray(rows), t1=np.ones(shape, np.float32), label=np.zeros(shape, np.uint8), cord=cord,
             tight_cord=cord, discs=discs, affine=np.diag([1.0, 1.0, 2.0, 1.0]))
    rng = np.random.default_rng(0)
    below = 0
    for _ in range(40):
        x, y = anatomy_sample(npz, rng, (64, 64, 32))
        assert x.shape == (2, 64, 64, 32) and y.shape == (2, 64, 64, 32)
        top_row = x[0][x[1] > 0].max() - 1.0
        if top_row < 150:  # wholly below the cord's end
            below += 1
            assert not y[0].any()
    assert 3 <= below <= 30, below  # seen, while most patches still hold cord
    item = ValidationDataset([npz], 3)[0]
    assert item["image"].shape[1] == shape[0] and item["label"].shape[0] == 2
    assert len(PatchDataset([npz], 3, (64, 64, 32), samples=2)) == 2


def test_stage2_modality_substitution(tmp_path):
    """t1_dropout zeroes the T1w channel, t2_as_t1 replaces it by the T2w; the T2w, validity and
    labels stay those of the same draw without substitution; an impossible mix is refused."""
    from imsct.training import PatchDataset

    npz = _tiny_npz(tmp_path)

    def item(**kw):
        torch.manual_seed(3)  # the same draw for every setting
        return PatchDataset([npz], 2, (64, 64, 32), samples=1, augment_prob=0.0, **kw)[0]

    plain, dropped, copied = item(), item(t1_dropout=1.0), item(t2_as_t1=1.0)
    assert not torch.equal(plain["image"][1], plain["image"][0])
    assert (dropped["image"][1] == 0).all()
    torch.testing.assert_close(copied["image"][1], copied["image"][0])
    for other in (dropped, copied):
        torch.testing.assert_close(other["image"][[0, 2]], plain["image"][[0, 2]])
        torch.testing.assert_close(other["label"], plain["label"])
    torch.manual_seed(0)
    mixed = PatchDataset([npz], 2, (64, 64, 32), samples=40, augment_prob=0.0, t1_dropout=0.5, t2_as_t1=0.5)
    kinds = {("zero" if (s["image"][1] == 0).all() else "copy" if torch.equal(s["image"][1], s["image"][0]) else "t1")
             for s in (mixed[i] for i in range(len(mixed)))}
    assert kinds == {"zero", "copy"}
    for bad in ({"t1_dropout": 0.6, "t2_as_t1": 0.6}, {"t2_as_t1": -0.1}):
        with pytest.raises(ValueError, match="t2_as_t1"):
            PatchDataset([npz], 2, (64, 64, 32), **bad)
