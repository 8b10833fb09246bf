import csv
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from imsct.phantoms import generate_case
from imsct.phantoms.anatomy import random_spec
from imsct.labels import SEG_SUFFIXES, CORD_BOX_SUFFIX, CORD_SUFFIX


def test_cli_writes_bids_layout(tmp_path):
    out = tmp_path / "ds"
    subprocess.run([sys.executable, "-m", "imsct.phantoms", "--out", str(out), "--cases", "2", "--seed", "3", "--quiet"], check=True)
    rows = list(csv.DictReader(open(out / "participants.tsv"), delimiter="\t"))
    assert [r["participant_id"] for r in rows] == ["sub-001", "sub-002"]
    assert {r["tumor_type"] for r in rows} <= {"astrocytoma", "ependymoma", "hemangioblastoma"}
    for sub in ("sub-001", "sub-002"):
        t2 = nib.load(out / sub / "anat" / f"{sub}_T2w.nii.gz")
        assert nib.load(out / sub / "anat" / f"{sub}_T1w.nii.gz").ndim == 3
        lab = out / "derivatives" / "labels" / sub / "anat"
        for suffix in list(SEG_SUFFIXES.values()) + [CORD_BOX_SUFFIX, CORD_SUFFIX]:
            m = nib.load(lab / f"{sub}_T2w{suffix}.nii.gz")
            assert m.shape == t2.shape and np.allclose(m.affine, t2.affine)
        info = json.loads((lab / f"{sub}_phantom.json").read_text())
        assert info["participant_id"] == sub and info["vertebrae"]


def test_deterministic_by_seed():
    a, b, c = generate_case(7, 0), generate_case(7, 0), generate_case(8, 0)
    assert np.array_equal(np.asanyarray(a.t2.dataobj), np.asanyarray(b.t2.dataobj))
    assert np.array_equal(np.asanyarray(a.t1.dataobj), np.asanyarray(b.t1.dataobj))
    assert np.allclose(a.t2.affine, b.t2.affine)
    assert a.t2.shape != c.t2.shape or not np.array_equal(np.asanyarray(a.t2.dataobj), np.asanyarray(c.t2.dataobj))


@pytest.mark.parametrize("index", [0, 1, 2])
def test_labels_inside_cord_and_consistent(index):
    case = generate_case(11, index)
    lab = {k: np.asanyarray(v.dataobj) > 0 for k, v in case.labels.items()}
    wt = lab[SEG_SUFFIXES["whole-tumor"]]
    union = lab[SEG_SUFFIXES["tumor"]] | lab[SEG_SUFFIXES["edema"]] | lab[SEG_SUFFIXES["cavity"]]
    assert np.array_equal(wt, union)
    assert wt.any()
    # lesions are intramedullary: inside the tight cord mask (partial-volume rim allowed)
    assert (wt & lab[CORD_SUFFIX]).sum() >= 0.97 * wt.sum()
    # and the stage-1 cylinder contains the cord where both exist
    assert (lab[CORD_SUFFIX] & lab[CORD_BOX_SUFFIX]).sum() >= 0.97 * lab[CORD_SUFFIX].sum()
    t2 = np.asanyarray(case.t2.dataobj).astype(float)
    t1 = np.asanyarray(case.t1.dataobj).astype(float)
    assert t2.std() > 0 and t1.std() > 0


def test_contrasts_follow_clinical_appearance():
    # T2w: CSF-like cavity brighter than cord, edema brighter than cord; T1w-Gd: cavity dark.
    for index in range(12):
        case = generate_case(5, index)
        if not case.info["t1_same_grid"] or not case.info["has_cavity"]:
            continue
        t2 = np.asanyarray(case.t2.dataobj).astype(float)
        t1 = np.asanyarray(case.t1.dataobj).astype(float)
        cav = np.asanyarray(case.labels[SEG_SUFFIXES["cavity"]].dataobj) > 0
        cord = (np.asanyarray(case.labels[CORD_SUFFIX].dataobj) > 0) & ~(np.asanyarray(case.labels[SEG_SUFFIXES["whole-tumor"]].dataobj) > 0)
        assert np.median(t2[cav]) > 1.3 * np.median(t2[cord])
        assert np.median(t1[cav]) < 0.6 * np.median(t1[cord])
        return
    pytest.skip("no case with a cavity on a shared grid in the first 12")


def test_prevalences_over_many_seeds():
    specs = [random_spec(np.random.default_rng([99, i])) for i in range(400)]
    types = [s.tumour_type for s in specs]
    edema = np.mean([any(les.edema_above or les.edema_below for les in s.lesions) for s in specs])
    cavity = np.mean([any(les.cavity_above or les.cavity_below for les in s.lesions) for s in specs])
    multiple = np.mean([len(s.lesions) > 1 for s in specs])
    assert 0.41 <= edema <= 0.61  # paper: 51 %
    assert 0.57 <= cavity <= 0.77  # paper: 67 %
    assert 0.03 <= multiple <= 0.3
    for t, p in (("astrocytoma", 101 / 343), ("ependymoma", 122 / 343), ("hemangioblastoma", 120 / 343)):
        assert abs(types.count(t) / len(types) - p) < 0.08


def test_orientations_resolution_and_grids_vary():
    infos = [generate_case(21, i, max_voxels=400_000).info for i in range(10)]
    assert len({i["t2_axcodes"] for i in infos}) >= 3
    assert any(not i["t1_same_grid"] for i in infos) and any(i["t1_same_grid"] for i in infos)
    for i in infos:
        inplane = sorted(i["t2_voxel_mm"])[:2]
        thick = max(i["t2_voxel_mm"])
        assert 0.29 <= min(inplane) and max(inplane) <= 1.31
        assert 1.49 <= thick <= 5.21


def test_volumes_in_paper_ranges():
    infos = [generate_case(31, i, max_voxels=1_500_000).info for i in range(8)]
    tumour = [i["volumes_mm3"]["tumor"] / 1000 for i in infos]
    assert 0.3 < np.median(tumour) < 15
    for i in infos:
        if i["has_cavity"]:
            assert i["volumes_mm3"]["cavity"] > 300


def test_misaligned_t1_moves_only_the_t1_content():
    from imsct.phantoms import generate_case as gen

    base, moved = gen(12, 1, max_voxels=150_000), gen(12, 1, max_voxels=150_000, misalign_t1=(4.0, 3.0))
    assert np.array_equal(np.asanyarray(base.t2.dataobj), np.asanyarray(moved.t2.dataobj))
    for k in base.labels:
        assert np.array_equal(np.asanyarray(base.labels[k].dataobj), np.asanyarray(moved.labels[k].dataobj))
    assert np.allclose(base.t1.affine, moved.t1.affine)  # the header does not know
    assert not np.array_equal(np.asanyarray(base.t1.dataobj), np.asanyarray(moved.t1.dataobj))
    truth = moved.info.pop("t1_motion")
    assert moved.info == base.info
    m = np.asarray(truth["motion_ras"])
    assert np.allclose(m @ np.asarray(truth["correction_ras"]), np.eye(4))
    angle = np.degrees(np.arccos((np.trace(m[:3, :3]) - 1) / 2))
    assert angle == pytest.approx(3.0, abs=1e-6)
    c = np.asarray(truth["centre_ras"])
    assert np.linalg.norm(m[:3, :3] @ c + m[:3, 3] - c) == pytest.approx(4.0, abs=1e-3)


def test_followup_sessions_dates_and_growth_truth(tmp_path):
    from imsct.bids import find_cases
    from imsct.cli import main
    from imsct.phantoms import generate_case as gen

    out = tmp_path / "fu"
    assert main(["phantoms", "--out", str(out), "--cases", "1", "--seed", "4", "--start", "0", "--followup", "2",
                 "--growth", "1.8", "--max-voxels", "150000", "--quiet"]) == 0
    cases = find_cases(out)
    assert [c.name for c in cases] == ["sub-001_ses-01_T2w", "sub-001_ses-02_T2w"]
    assert all(c.t1.exists() and c.labels for c in cases)
    sessions = list(csv.DictReader(open(out / "sub-001" / "sub-001_sessions.tsv"), delimiter="\t"))
    stamps = [json.loads(c.t2.with_name(c.name + ".json").read_text())["AcquisitionDateTime"] for c in cases]
    assert [r["acq_time"] for r in sessions] == stamps
    days = (np.datetime64(stamps[1][:10]) - np.datetime64(stamps[0][:10])).astype(int)
    assert days == round(2 * 365.25)
    # visit 1 is the cross-sectional case itself
    base = gen(4, 0, max_voxels=150_000)
    v1 = nib.load(cases[0].t2)
    assert np.array_equal(np.asanyarray(v1.dataobj), np.asanyarray(base.t2.dataobj))
    infos = [json.loads((out / "derivatives" / "labels" / "sub-001" / s / "anat" / f"sub-001_{s}_phantom.json").read_text())
             for s in ("ses-01", "ses-02")]
    # new grid at visit 2 and a patient motion with its inverse
    assert nib.load(cases[1].t2).shape != v1.shape or not np.allclose(nib.load(cases[1].t2).affine, v1.affine)
    m = np.asarray(infos[1]["motion"]["motion_ras"])
    assert np.allclose(m @ np.asarray(infos[1]["motion"]["correction_ras"]), np.eye(4))
    # the continuous truth: partial-volume fractions on each grid integrate to it (inside the field)
    for info in infos:
        for k in ("tumor", "whole-tumor"):
            assert info["soft_volumes_mm3"][k] == pytest.approx(info["true_volumes_in_field_mm3"][k], rel=0.02)
    # the tumour (free to grow inside the widening cord) grows by the requested factor
    assert infos[1]["followup"]["true_volume_ratio"]["tumor"] == pytest.approx(1.8, rel=0.06)
    assert infos[1]["followup"]["growth_factor"] == 1.8
