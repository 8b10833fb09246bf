"""Sanity checks on real MRI (issue 12, part 5): two healthy real T2w scans with manual cord masks in
``<repo>/../shared/realdata`` (public Spinal Cord Toolbox data, see its README). A sanity check,
not tuning data: no parameter of the project is chosen on these files.

On each scan: the localiser's region covers >= 99 % of the manual cord, the centreline error
(mean over the working grid's axial slices where both exist, of the in-plane distance between the
centroids of the region and of the manual cord) is <= 3 mm, and the cascade writes < 0.1 cm3 of
whole tumour, two-contrast (no T1w exists: the T2w is given as the T1w too) and T2w-only.

The anatomy network (issue 14) on each scan, T2w-only as it runs there: its tight cord
(``_seg-cord``) has a Dice >= 0.85 with the manual cord (a bound for "the cord is found and
delineated", below the 0.894 +- 0.093 measured on held-out phantoms, not chosen on these scans), and
its level map runs the right way: each level lies below the one before (C2 highest, SCT numbers).

A check the shipped weights fail is marked ``xfail(strict=True)`` with the number measured, so that
it turns into a failure (to remove the mark) the day retrained weights pass it; it is not weakened.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from support.paths import ROOT

REALDATA = ROOT.parent / "shared" / "realdata"
SCANS = {"sct-t2": "sct-t2_T2w", "pam50": "pam50-small_T2w"}
MIN_COVERAGE = 0.99
MAX_CENTRELINE_MM = 3.0
MAX_WHOLE_TUMOUR_CM3 = 0.1

if not REALDATA.is_dir():
    pytest.skip(f"real-data sanity checks skipped: {REALDATA} is absent (it holds the healthy real scans of "
                "../shared/realdata, see the issue-12 note)", allow_module_level=True)


def _files(scan: str) -> tuple[Path, Path]:
    t2, cord = REALDATA / f"{SCANS[scan]}.nii.gz", REALDATA / f"{SCANS[scan]}_seg-cord.nii.gz"
    if not (t2.exists() and cord.exists()):
        pytest.skip(f"{t2.name} or {cord.name} missing from {REALDATA}")
    return t2, cord


@pytest.fixture(scope="module")
def cascades():
    from imsct.cascade import Cascade

    return {False: Cascade.from_models(), True: Cascade.from_models(t2_only=True)}


def _xfail(reason: str, weights: str = "shipped (generator-1) weights", issue: str = "issue 12 part 4"):
    return pytest.mark.xfail(strict=True, reason=f"{weights}: {reason}; retraining is {issue}")


_cache: dict = {}


def localised(cascades, scan: str) -> dict:
    """The localiser's region and the manual cord on the working grid, with coverage and centreline error."""
    if ("loc", scan) not in _cache:
        from imsct.io import load_volume

        t2_path, cord_path = _files(scan)
        t2, manual = load_volume(t2_path, "T2w"), load_volume(cord_path, "cord mask")
        c = cascades[False]
        w, region, _ = c.locate(t2)
        man_w = c.cord_to_working(manual, t2, w)
        # coverage on the T2w's own grid (the manual mask's grid)
        region_native = c.cord_to_native(region, w, t2)
        man = manual.data > 0.5
        coverage = float((region_native.astype(bool) & man).sum() / man.sum())
        errors = []
        spacing = np.asarray(c.spacing)
        for k in range(w.shape[0]):  # axis 0 of the working grid is superior-inferior
            a, b = np.argwhere(region[k] > 0), np.argwhere(man_w[k] > 0)
            if len(a) and len(b):
                errors.append(float(np.linalg.norm((a.mean(0) - b.mean(0)) * spacing[1:])))
        _cache[("loc", scan)] = {"coverage": coverage, "centreline_mm": float(np.mean(errors)) if errors else np.inf,
                                 "slices": len(errors)}
    return _cache[("loc", scan)]


def segmented(cascades, scan: str, t2_only: bool):
    """The cascade's result on the scan, and the T2w."""
    if ("seg", scan, t2_only) not in _cache:
        from imsct.io import load_volume

        t2 = load_volume(_files(scan)[0], "T2w")
        res = cascades[t2_only](t2, None if t2_only else t2)  # no T1w exists: the T2w stands in for it
        _cache[("seg", scan, t2_only)] = res, t2
    return _cache[("seg", scan, t2_only)]


def whole_tumour_cm3(cascades, scan: str, t2_only: bool) -> float:
    res, t2 = segmented(cascades, scan, t2_only)
    return float((res.labelmap > 0).sum()) * t2.voxel_volume_mm3 / 1000.0


@pytest.mark.parametrize("scan", [
    pytest.param("sct-t2", marks=_xfail("the region covers 97.5 % of the manual cord (108 of 4275 voxels missed, "
                                        "all in the 3 most inferior 1-mm slices of the field)")),
    "pam50",
])
def test_localiser_region_covers_the_manual_cord(cascades, scan):
    got = localised(cascades, scan)
    assert got["coverage"] >= MIN_COVERAGE, f"{scan}: region covers {got['coverage']:.1%} of the manual cord"


@pytest.mark.parametrize("scan", ["sct-t2", "pam50"])
def test_localiser_centreline_error(cascades, scan):
    got = localised(cascades, scan)
    assert got["slices"] > 0, f"{scan}: the region and the manual cord share no axial slice"
    assert got["centreline_mm"] <= MAX_CENTRELINE_MM, f"{scan}: centreline error {got['centreline_mm']:.2f} mm"


@pytest.mark.parametrize("scan, t2_only", [
    pytest.param("sct-t2", False, id="sct-t2-two-contrast"),
    pytest.param("sct-t2", True, id="sct-t2-t2only"),
    pytest.param("pam50", False, id="pam50-two-contrast"),
    pytest.param("pam50", True, id="pam50-t2only", marks=_xfail(
        "1.34 cm3 of whole tumour (edema below the conus, where the tight cord also runs; the tumour in the "
        "medulla is removed by the tight-cord constraint) measured",
        weights="shipped model_t2only.pt (Dice + BCE fine-tune)")),
])
def test_cascade_finds_no_tumour_on_a_healthy_scan(cascades, scan, t2_only):
    got = whole_tumour_cm3(cascades, scan, t2_only)
    assert got < MAX_WHOLE_TUMOUR_CM3, f"{scan} ({'T2w-only' if t2_only else 'two-contrast'}): {got:.3f} cm3 of whole tumour"


MIN_CORD_DICE = 0.85


def _anatomy(cascades, scan: str):
    res, t2 = segmented(cascades, scan, True)
    if res.anatomy is None:
        pytest.skip("the shipped models folder has no anatomy network")
    return res.anatomy, t2


@pytest.mark.parametrize("scan", [
    "sct-t2",
    pytest.param("pam50", marks=_xfail("Dice 0.789: the tight cord runs 52 mm below the manual cord's end, past the "
                                       "conus, and 16 mm above it into the medulla (0.884 on the manual cord's slices)",
                                       weights="shipped anatomy.pt", issue="issue 14")),
])
def test_anatomy_cord_matches_the_manual_cord(cascades, scan):
    from imsct.io import load_volume
    from imsct.metrics import dice as dice_of

    anatomy, _ = _anatomy(cascades, scan)
    dice = dice_of(anatomy.cord > 0, load_volume(_files(scan)[1], "cord mask").data > 0.5)
    assert dice >= MIN_CORD_DICE, f"{scan}: tight cord Dice {dice:.3f} against the manual cord"


@pytest.mark.parametrize("scan", ["sct-t2", "pam50"])
def test_anatomy_levels_run_down_the_cord(cascades, scan):
    anatomy, t2 = _anatomy(cascades, scan)
    numbers = [int(v) for v in np.unique(anatomy.levels) if v > 0]
    assert len(numbers) >= 2, f"{scan}: {len(numbers)} vertebral level(s) on a cord of several vertebrae"
    assert numbers == list(range(numbers[0], numbers[-1] + 1)), f"{scan}: levels {numbers} skip a number"
    from imsct.io import world

    # mean world superior coordinate of each level's voxels
    heights = [float(world(np.argwhere(anatomy.levels == n), t2.affine)[:, 2].mean()) for n in numbers]
    assert all(a > b for a, b in zip(heights, heights[1:])), (
        f"{scan}: levels {numbers} at heights {np.round(heights, 1)} mm: a level lies above the one before it")
