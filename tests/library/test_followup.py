"""imsct compare on a generated follow-up pair (truth label maps): volumes, growth against the known
growth, rates per year from the BIDS dates, alignment against the known patient motion, bad input."""

import csv
import json
import math
import shutil

import nibabel as nib
import numpy as np
import pytest

from imsct.cli import main
from imsct.followup import growth, visit_date
from imsct.io import InputError
from imsct.registration import displacement_mm

SUB = "sub-009"  # seed 100, index 8: lesions inside both fields of view, 4-5 mm slices


@pytest.fixture(scope="module")
def followup(tmp_path_factory):
    out = tmp_path_factory.mktemp("followup")
    rc = main(["phantoms", "--out", str(out), "--cases", "1", "--seed", "100", "--start", "8",
               "--followup", "1.5", "--growth", "1.7", "--max-voxels", "400000", "--quiet",
               "--acquisition", "sagittal"])  # a field that holds the lesions at both visits (checked below)
    assert rc == 0
    return out


def _paths(root, ses, classes=("tumor", "edema", "cavity")):
    anat = root / SUB / ses / "anat"
    lab = root / "derivatives" / "labels" / SUB / ses / "anat"
    return {
        "t2": anat / f"{SUB}_{ses}_T2w.nii.gz",
        "seg": [str(lab / f"{SUB}_{ses}_T2w_seg-{c}.nii.gz") for c in classes],
        "info": json.loads((lab / f"{SUB}_{ses}_phantom.json").read_text()),
        "cord": lab / f"{SUB}_{ses}_T2w_seg-cord.nii.gz",
    }


def test_growth_arithmetic_by_hand():
    g = growth(1000.0, 2000.0, 2.0)
    assert g["change_mm3"] == 1000.0 and g["change_percent"] == 100.0
    assert g["rate_mm3_per_year"] == 500.0 and g["rate_percent_per_year_linear"] == 50.0
    assert g["rate_percent_per_year_compound"] == pytest.approx(100 * (math.sqrt(2) - 1))
    assert growth(0.0, 50.0, 1.0)["change_percent"] is None


def test_compare_reports_known_growth_and_motion(followup, tmp_path, capsys):
    v1, v2 = _paths(followup, "ses-01"), _paths(followup, "ses-02")
    out = tmp_path / "cmp"
    rc = main(["compare", "--t2", str(v1["t2"]), str(v2["t2"]), "--seg1", *v1["seg"], "--seg2", *v2["seg"], "-o", str(out)])
    assert rc == 0
    console = capsys.readouterr().out
    assert "tumor" in console and "years" in console
    res = json.loads((out / "compare.json").read_text())
    rows = {r["class"]: r for r in csv.DictReader(open(out / "compare.csv"))}
    i1, i2 = v1["info"], v2["info"]
    truth = i2["followup"]
    # dates from the sidecars: the interval the generator used
    assert res["days"] == truth["days"]
    years = truth["days"] / 365.25
    assert res["years"] == pytest.approx(years)
    for name in ("tumor", "whole-tumor"):
        c = res["classes"][name]
        # volumes on each visit's own grid are the label maps' volumes (the NIfTI stores the affine
        # in float32, hence 1e-6 rather than exact)
        assert c["volume_visit1_mm3"] == pytest.approx(i1["volumes_mm3"][name], rel=1e-6)
        assert c["volume_visit2_mm3"] == pytest.approx(i2["volumes_mm3"][name], rel=1e-6)
        ratio = c["volume_visit2_mm3"] / c["volume_visit1_mm3"]
        assert c["change_percent"] == pytest.approx(100 * (ratio - 1))
        assert c["rate_mm3_per_year"] == pytest.approx((c["volume_visit2_mm3"] - c["volume_visit1_mm3"]) / years)
        assert c["rate_percent_per_year_compound"] == pytest.approx(100 * (ratio ** (1 / years) - 1))
        assert float(rows[name]["change_percent"]) == pytest.approx(c["change_percent"])
        # against the known growth of the continuous anatomy. The lesions lie inside both fields
        # (checked), so the only gap is the label maps' partial-volume binarisation (majority class
        # of each voxel), which the generator measures against its own partial-volume fractions
        # (soft volumes), plus the soft volumes' own integration error against the true volumes.
        true_ratio = truth["true_volume_ratio"][name]
        err, slack = [], []
        for info in (i1, i2):
            assert info["true_volumes_in_field_mm3"][name] >= 0.995 * info["true_volumes_mm3"][name]
            err.append(abs(info["volumes_mm3"][name] / info["soft_volumes_mm3"][name] - 1))
            slack.append(abs(info["soft_volumes_mm3"][name] / info["true_volumes_in_field_mm3"][name] - 1))
        # the generator's partial-volume integration (boundary voxels supersampled) is within 2.5 %
        # of the continuous anatomy (2.1 % on this case's visit 1)
        assert max(slack) < 0.025
        bound = (1 + err[1]) * (1 + slack[1]) / ((1 - err[0]) * (1 - slack[0])) - 1
        assert abs(ratio / true_ratio - 1) <= bound + 1e-6, (name, ratio, true_ratio, bound)
        # and the growth the generator was asked for shows: well above no change
        assert ratio > 1.3
        assert c["dice_after_alignment"] > 0.5
    # rigid alignment of visit 2 onto visit 1 against the known patient motion (over the cord)
    est = np.asarray(res["registration"]["moving_to_fixed_ras"])
    true = np.asarray(i2["motion"]["correction_ras"])
    cord_img = nib.load(v1["cord"])
    ijk = np.argwhere(np.asanyarray(cord_img.dataobj) > 0)
    pts = ijk @ cord_img.affine[:3, :3].T + cord_img.affine[:3, 3]  # visit-1 world
    assert displacement_mm(np.eye(4), np.linalg.inv(true), pts) > 3.0
    # generator 2 (textured tissues): 1.04 mm on this subject (below 1 mm on generator 1); see the
    # registration tests for the regression this shows
    assert displacement_mm(np.linalg.inv(est), np.linalg.inv(true), pts) < 1.5


def test_dates_from_sessions_tsv(followup, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(followup / SUB, root / SUB)
    t2 = root / SUB / "ses-02" / "anat" / f"{SUB}_ses-02_T2w.nii.gz"
    stamp = json.loads(t2.with_name(f"{SUB}_ses-02_T2w.json").read_text())["AcquisitionDateTime"]
    t2.with_name(f"{SUB}_ses-02_T2w.json").unlink()
    assert visit_date(t2).isoformat() == stamp[:10]  # now from sub-XXX_sessions.tsv
    (root / SUB / f"{SUB}_sessions.tsv").unlink()
    with pytest.raises(InputError, match="no acquisition date"):
        visit_date(t2)


def test_bad_input_named_and_nothing_written(followup, tmp_path, capsys):
    v1, v2 = _paths(followup, "ses-01"), _paths(followup, "ses-02")
    out = tmp_path / "cmp"

    def run(*extra, t2=(v1["t2"], v2["t2"]), seg1=v1["seg"], seg2=v2["seg"]):
        rc = main(["compare", "--t2", str(t2[0]), str(t2[1]), "--seg1", *seg1, "--seg2", *seg2, "-o", str(out), *extra])
        return rc, capsys.readouterr().err

    rc, err = run(t2=(v2["t2"], v1["t2"]), seg1=v2["seg"], seg2=v1["seg"])  # visits swapped: dates reversed
    assert rc == 2 and "before visit 1" in err and str(v1["t2"]) in err
    rc, err = run("--dates", "2022-05-01", "2022-05-01")
    assert rc == 2 and "same day" in err
    rc, err = run(seg1=v2["seg"])  # visit 2's labels given for visit 1
    assert rc == 2 and "not on its T2w's grid" in err and v2["seg"][0] in err
    bad = tmp_path / "broken_T2w.nii.gz"
    bad.write_bytes(b"not a nifti at all")
    rc, err = run(t2=(bad, v2["t2"]))
    assert rc == 2 and str(bad) in err
    rc, err = run("--dates", "2022-05-01", "yesterday")
    assert rc == 2 and "'yesterday' is not a date" in err
    assert not out.exists()
