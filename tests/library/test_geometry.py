import nibabel as nib
import numpy as np
import pytest

from imsct.geometry import crop_or_pad, field_overlap, resample, to_working, working_grid
from imsct.io import Volume, load_volume


def reorient(data, affine, codes):
    """The same image stored with other axis codes (exact: permutation / flips only)."""
    tr = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt(codes))
    return nib.orientations.apply_orientation(data, tr), affine @ nib.orientations.inv_ornt_aff(tr, data.shape)


@pytest.mark.parametrize("codes", [("R", "A", "S"), ("L", "P", "I"), ("S", "R", "P"), ("P", "I", "R")])
def test_working_grid_independent_of_storage_order(codes):
    rng = np.random.default_rng(0)
    data = rng.random((30, 40, 9)).astype(np.float32)
    aff = np.diag([0.6, 0.8, 3.5, 1.0])
    aff[:3, 3] = [12.0, -40.0, 7.0]
    d2, a2 = reorient(data, aff, codes)
    s1, w1 = working_grid(aff, data.shape)
    s2, w2 = working_grid(a2, d2.shape)
    assert s1 == s2 and np.allclose(w1, w2)
    # axis 0 runs to S with 1 mm, axis 1 to A with 1 mm, axis 2 to R with 2 mm
    assert nib.aff2axcodes(w1) == ("S", "A", "R")
    assert np.allclose(np.sqrt((w1[:3, :3] ** 2).sum(0)), [1, 1, 2])
    x1 = resample(data, aff, s1, w1).numpy()
    x2 = resample(d2, a2, s2, w2).numpy()
    assert np.abs(x1 - x2).max() < 1e-5


def test_resample_round_trip_and_world_positions():
    aff = np.eye(4)
    aff[:3, :3] = np.diag([1.0, 1.0, 2.0])
    data = np.zeros((20, 20, 10), np.float32)
    data[5, 6, 3] = 1.0
    # a grid shifted by exactly one voxel: the bright voxel moves by one index
    shifted = aff.copy()
    shifted[:3, 3] = [1.0, 0.0, 0.0]
    out = resample(data, aff, data.shape, shifted, mode="nearest").numpy()
    assert out[4, 6, 3] == 1.0 and out.sum() == 1.0
    back = resample(data, aff, data.shape, aff).numpy()
    assert np.allclose(back, data, atol=1e-6)


def test_oblique_grid_is_sampled_in_world_space():
    theta = np.deg2rad(7)
    rot = np.array([[1, 0, 0], [0, np.cos(theta), -np.sin(theta)], [0, np.sin(theta), np.cos(theta)]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([3.0, 0.7, 0.7])
    i, j, k = np.meshgrid(np.arange(8), np.arange(60), np.arange(70), indexing="ij")
    world = np.einsum("ab,bijk->aijk", aff[:3, :3], np.stack([i, j, k])) + aff[:3, 3, None, None, None]
    data = (world[2] * 0.5 + world[1]).astype(np.float32)  # a linear function of world position
    s, w = working_grid(aff, data.shape)
    x = resample(data, aff, s, w).numpy()
    wi = np.stack(np.meshgrid(*[np.arange(n) for n in s], indexing="ij"))
    ww = np.einsum("ab,bijk->aijk", w[:3, :3], wi) + w[:3, 3, None, None, None]
    inside = field_overlap(data.shape, aff, s, w).numpy()
    interior = inside & (x != 0)
    expected = ww[2] * 0.5 + ww[1]
    err = np.abs(x - expected)[interior]
    assert interior.sum() > 0.5 * inside.size and np.median(err) < 1e-3


def test_label_resampling_keeps_classes():
    lab = np.zeros((40, 40, 10), np.uint8)
    lab[10:20, 10:20, 2:6] = 1
    lab[20:30, 10:20, 2:6] = 3
    aff = np.diag([0.5, 0.5, 2.0, 1.0])
    s, w = working_grid(aff, lab.shape)
    out = to_working(lab, aff, s, w, label=True)
    assert set(np.unique(out)) == {0, 1, 3}
    # volume preserved within partial-volume error
    for v in (1, 3):
        assert abs((out == v).sum() * 2.0 - (lab == v).sum() * 0.5) < 0.25 * (lab == v).sum() * 0.5


def test_crop_or_pad_offsets():
    a = np.arange(5 * 6 * 7).reshape(1, 5, 6, 7)
    out, off = crop_or_pad(a, (3, 8, 7))
    assert out.shape == (1, 3, 8, 7) and off.tolist() == [1, -1, 0]
    assert out[0, 0, 1, 0] == a[0, 1, 0, 0] and out[0, 0, 0, 0] == 0


def test_cascade_orientation_round_trip(tiny_phantom_dir, cascade):
    """A re-oriented input gives the re-oriented output (probabilities and masks)."""
    t2p = next(tiny_phantom_dir.glob("sub-001/anat/*_T2w.nii.gz"))
    t1p = next(tiny_phantom_dir.glob("sub-001/anat/*_T1w.nii.gz"))
    t2, t1 = load_volume(t2p), load_volume(t1p)
    codes = ("I", "L", "A") if nib.aff2axcodes(t2.affine) != ("I", "L", "A") else ("R", "P", "S")
    d2, a2 = reorient(t2.data, t2.affine, codes)
    r1 = cascade(t2, t1)
    r2 = cascade(Volume(np.ascontiguousarray(d2), a2, "reoriented"), t1)
    p1 = np.stack([reorient(p, t2.affine, codes)[0] for p in r1.probabilities])
    assert np.abs(p1 - r2.probabilities).max() < 2e-3
    l1 = reorient(r1.labelmap, t2.affine, codes)[0]
    assert (l1 != r2.labelmap).mean() < 1e-4
    assert r1.labelmap.shape == t2.shape and r2.labelmap.shape == d2.shape


def _oblique_affine(rng, zooms):
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    aff = np.eye(4)
    aff[:3, :3] = q * np.asarray(zooms)
    aff[:3, 3] = rng.normal(scale=20, size=3)
    return aff


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_resampling_a_box_onto_its_covering_box_equals_the_whole_grid(seed):
    """The cascade resamples only the stage-1 box onto the part of the T2w grid it reaches: that
    must give exactly what resampling the whole (zero outside the box) working array gives."""
    from imsct.geometry import covering_box, shifted

    rng = np.random.default_rng(seed)
    w_shape, w_aff = (40, 36, 12), _oblique_affine(rng, (1.0, 1.0, 2.0))
    lo, hi = np.array([7, 9, 2]), np.array([31, 20, 10])
    box = rng.random((2, *(hi - lo))).astype(np.float32) + 0.1
    whole = np.zeros((2, *w_shape), np.float32)
    whole[(slice(None), *[slice(a, b) for a, b in zip(lo, hi)])] = box
    # a native grid finer than the working grid, rotated against it, covering it
    n_aff = _oblique_affine(rng, (0.7, 0.6, 1.5))
    centre_w = w_aff @ np.r_[(np.asarray(w_shape) - 1) / 2, 1]
    n_shape = (90, 90, 40)
    n_aff[:3, 3] += centre_w[:3] - (n_aff @ np.r_[(np.asarray(n_shape) - 1) / 2, 1])[:3]
    ref = resample(whole, w_aff, n_shape, n_aff).numpy()
    n_lo, n_hi = covering_box(lo, hi, w_aff, n_shape, n_aff)
    assert np.all(n_hi - n_lo < np.asarray(n_shape))  # it is a real sub-box here, not the whole grid
    sub = resample(box, shifted(w_aff, lo), tuple(int(v) for v in n_hi - n_lo), shifted(n_aff, n_lo)).numpy()
    got = np.zeros_like(ref)
    got[(slice(None), *[slice(a, b) for a, b in zip(n_lo, n_hi)])] = sub
    assert ref.max() > 0.1  # the box is seen on the native grid
    assert np.abs(got - ref).max() < 1e-5
