"""Results that do not depend on how a scanner or converter stores intensities, and a localiser
that sees the whole length of a long field (issue: hospital data, not test data).

Tolerance for intensity offsets and scales: every class's mask agrees with the unchanged run at
Dice >= 0.99 (float32 rounding of the z-score is all that may differ)."""

import numpy as np
import pytest

from imsct.bids import find_cases
from imsct.geometry import to_working
from imsct.io import Volume, load_volume
from imsct.labels import CORD_BOX_SUFFIX, LABELS
from imsct.metrics import box_counts, dice

TRANSFORMS = {
    "T2w 3000 lower (negative values)": (lambda v: v - 3000.0, None),
    "T2w 3000 higher": (lambda v: v + 3000.0, None),
    "T1w 3000 lower, T2w x0.01": (lambda v: v * 0.01, lambda v: v - 3000.0),
    "both x100 and offset": (lambda v: v * 100.0 + 500.0, lambda v: v * 100.0 - 700.0),
}


@pytest.fixture(scope="module")
def lesion_case(phantom_dir, cascade):
    """The lesion phantom's T2w cut to its lesion and 30 mm around it (the T1w stays whole: the cascade
    resamples it onto the T2w): every intensity change below reruns the cascade on it."""
    import nibabel as nib

    from imsct.evaluation import truth_labelmap

    case = next(c for c in find_cases(phantom_dir) if c.labels)
    img = nib.load(case.t2)
    lesion = np.argwhere(truth_labelmap(case, img.shape) > 0)
    margin = np.ceil(30.0 / np.asarray(img.header.get_zooms()[:3])).astype(int)
    lo, hi = np.maximum(lesion.min(0) - margin, 0), np.minimum(lesion.max(0) + margin + 1, img.shape)
    cut = img.slicer[tuple(slice(a, b) for a, b in zip(lo, hi))]
    t2 = Volume(np.asanyarray(cut.dataobj), cut.affine, str(case.t2))
    t1 = load_volume(case.t1, "T1w")
    ref = cascade(t2, t1)
    assert (ref.labelmap > 0).sum() > 100, "the phantom's lesion must be found for the comparison to mean anything"
    return t2, t1, ref.labelmap


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_intensity_offset_and_scale_give_the_same_masks(lesion_case, cascade, name):
    t2, t1, ref = lesion_case
    f2, f1 = TRANSFORMS[name]
    moved2 = Volume(f2(t2.data.astype(np.float32)), t2.affine, t2.path) if f2 else t2
    moved1 = Volume(f1(t1.data.astype(np.float32)), t1.affine, t1.path) if f1 else t1
    got = cascade(moved2, moved1).labelmap
    assert dice(got > 0, ref > 0) >= 0.99, name
    for cls, value in LABELS.items():
        if (ref == value).any():
            assert dice(got == value, ref == value) >= 0.99, (name, cls)


@pytest.fixture(scope="module")
def whole_spine(tmp_path_factory):
    """A whole-spine phantom (~720 mm along SI, longer than the localiser's 512 mm field) whose
    lesion reaches beyond the central 512 mm (seed and index chosen for that)."""
    from imsct.phantoms import generate_case, write_case

    case = generate_case(777, 8, healthy_fraction=0, random_intensity_fraction=0, acquisition="wholespine",
                         storage="int16", max_voxels=2_000_000)
    out = tmp_path_factory.mktemp("wholespine")
    write_case(case, out)
    return next(iter(find_cases(out)))


def test_localiser_covers_the_whole_length_of_a_long_field(whole_spine, cascade):
    t2 = load_volume(whole_spine.t2, "T2w")
    w = cascade.working(t2)
    assert w.shape[0] > cascade.field_size[0], "the phantom must be longer than the localiser's field"
    cord_truth = to_working((load_volume(whole_spine.labels[CORD_BOX_SUFFIX]).data > 0.5).astype(np.uint8),
                            t2.affine, w.shape, w.affine, label=True) > 0
    from imsct.evaluation import truth_labelmap

    lesion = to_working((truth_labelmap(whole_spine, t2.shape) > 0).astype(np.uint8), t2.affine, w.shape, w.affine, label=True) > 0
    rows = np.nonzero(lesion.any(axis=(1, 2)))[0]
    central = (w.shape[0] - cascade.field_size[0]) // 2
    assert rows.max() >= central + cascade.field_size[0], "the lesion must reach outside the central field"

    cord = cascade.localise(w.data) > 0
    # the centre crop alone covered 75 % of this phantom's cord: the rest of the cord (and any lesion
    # in it) never reached stage 2
    assert (cord & cord_truth).sum() / cord_truth.sum() >= 0.98
    lo, hi = cascade.box_of(cord.astype(np.uint8))
    inside, total = box_counts(lesion, lo, hi)
    assert inside == total
