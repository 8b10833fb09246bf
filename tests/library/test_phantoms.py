import csv
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from imsct.phantoms import GENERATOR_VERSION, GM_SUFFIX, generate_case, generate_dataset, is_healthy, subject_appearance
from imsct.phantoms.anatomy import random_spec
from imsct.labels import SEG_SUFFIXES, CORD_BOX_SUFFIX, CORD_SUFFIX


def test_cli_writes_bids_layout(tmp_path):
    out = tmp_path / "ds"
    subprocess.run([sys.executable, "-m", "imsct.phantoms", "--out", str(out), "--cases", "2", "--seed", "3", "--quiet",
                    "--max-voxels", "300000"], check=True)
    rows = list(csv.DictReader(open(out / "participants.tsv"), delimiter="\t"))
    assert [r["participant_id"] for r in rows] == ["sub-001", "sub-002"]
    assert {r["tumor_type"] for r in rows} <= {"astrocytoma", "ependymoma", "hemangioblastoma", "none"}
    assert {r["generator_version"] for r in rows} == {GENERATOR_VERSION}
    for sub in ("sub-001", "sub-002"):
        t2 = nib.load(out / sub / "anat" / f"{sub}_T2w.nii.gz")
        assert nib.load(out / sub / "anat" / f"{sub}_T1w.nii.gz").ndim == 3
        lab = out / "derivatives" / "labels" / sub / "anat"
        for suffix in list(SEG_SUFFIXES.values()) + [CORD_BOX_SUFFIX, CORD_SUFFIX]:
            m = nib.load(lab / f"{sub}_T2w{suffix}.nii.gz")
            assert m.shape == t2.shape and np.allclose(m.affine, t2.affine)
        info = json.loads((lab / f"{sub}_phantom.json").read_text())
        assert info["participant_id"] == sub and info["vertebrae"]
        assert info["generator_version"] == GENERATOR_VERSION


def test_deterministic_by_seed():
    a, b, c = (generate_case(s, 0, max_voxels=400_000, gm_mask=True) for s in (7, 7, 8))
    assert np.array_equal(np.asanyarray(a.t2.dataobj), np.asanyarray(b.t2.dataobj))
    assert np.array_equal(np.asanyarray(a.t1.dataobj), np.asanyarray(b.t1.dataobj))
    assert np.allclose(a.t2.affine, b.t2.affine)
    for k in a.labels:
        assert np.array_equal(np.asanyarray(a.labels[k].dataobj), np.asanyarray(b.labels[k].dataobj))
    assert a.info == b.info
    assert a.t2.shape != c.t2.shape or not np.array_equal(np.asanyarray(a.t2.dataobj), np.asanyarray(c.t2.dataobj))


@pytest.mark.parametrize("index", [0, 1, 2])
def test_labels_inside_cord_and_consistent(index):
    case = generate_case(11, index, max_voxels=1_000_000, healthy_fraction=0)
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
    # T2w: CSF-like cavity brighter than cord, edema brighter than cord; T1w-Gd: cavity dark
    # (the paper's rules hold in the non-random intensity share).
    for index in range(12):
        case = generate_case(5, index, max_voxels=600_000, healthy_fraction=0, random_intensity_fraction=0)
        assert case.info["intensity_mode"] == "paper"
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
    infos = [generate_case(21, i, max_voxels=200_000, acquisition="sagittal").info for i in range(10)]
    assert len({i["t2_axcodes"] for i in infos}) >= 3
    assert any(not i["t1_same_grid"] for i in infos) and any(i["t1_same_grid"] for i in infos)
    for i in infos:  # 2D sagittal: the v1 ranges
        inplane = sorted(i["t2_voxel_mm"])[:2]
        thick = max(i["t2_voxel_mm"])
        assert 0.29 <= min(inplane) and max(inplane) <= 1.31
        assert 1.49 <= thick <= 5.21


def test_volumes_in_paper_ranges():
    infos = [generate_case(31, i, max_voxels=1_000_000, healthy_fraction=0).info for i in range(8)]
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


# ---- generator v2 (issue 17) ------------------------------------------------------------------------------
from imsct.phantoms import _draw_subject, cord_tilt_in_field  # noqa: E402
from imsct.phantoms.anatomy import TISSUES  # noqa: E402

LESION_SUFFIXES = [SEG_SUFFIXES[k] for k in ("tumor", "edema", "cavity", "whole-tumor")]


def test_healthy_share_over_many_seeds():
    flags = np.array([[is_healthy(seed, i) for i in range(250)] for seed in range(8)])
    assert 0.22 <= flags.mean() <= 0.28  # default 0.25 over 2000 subjects (3 sigma ~ 0.03)
    assert 0.08 < flags.mean(axis=1).min() and flags.mean(axis=1).max() < 0.42  # every seed has its share
    assert not any(is_healthy(s, i, 0.0) for s in range(3) for i in range(100))
    assert all(is_healthy(s, i, 1.0) for s in range(3) for i in range(100))
    # nested: a subject healthy at 0.25 stays healthy at 0.5, and the draw is deterministic
    assert all(is_healthy(s, i, 0.5) for s in range(8) for i in range(250) if flags[s, i])
    assert flags.tolist() == [[is_healthy(seed, i) for i in range(250)] for seed in range(8)]


def test_healthy_subject_has_empty_lesion_masks(tmp_path):
    index = next(i for i in range(50) if is_healthy(41, i))
    sick = next(i for i in range(50) if not is_healthy(41, i))
    infos = generate_dataset(tmp_path / "ds", cases=max(index, sick) + 1, seed=41, max_voxels=150_000)
    rows = {r["participant_id"]: r for r in csv.DictReader(open(tmp_path / "ds" / "participants.tsv"), delimiter="\t")}
    sub = f"sub-{index + 1:03d}"
    assert rows[sub]["tumor_type"] == "none" and infos[index]["n_tumors"] == 0 and infos[index]["healthy"]
    lab = tmp_path / "ds" / "derivatives" / "labels" / sub / "anat"
    for suffix in LESION_SUFFIXES:  # written, all zero
        assert not np.asanyarray(nib.load(lab / f"{sub}_T2w{suffix}.nii.gz").dataobj).any()
    assert np.asanyarray(nib.load(lab / f"{sub}_T2w{CORD_SUFFIX}.nii.gz").dataobj).any()
    assert np.asanyarray(nib.load(lab / f"{sub}_T2w{CORD_BOX_SUFFIX}.nii.gz").dataobj).any()
    assert json.loads((lab / f"{sub}_phantom.json").read_text())["tumor_type"] == "none"
    assert rows[f"sub-{sick + 1:03d}"]["tumor_type"] != "none" and infos[sick]["volumes_mm3"]["whole-tumor"] > 0
    # healthy_fraction=0: the same subject gets its lesion back
    again = generate_case(41, index, max_voxels=150_000, healthy_fraction=0)
    assert again.info["tumor_type"] != "none" and np.asanyarray(again.labels[SEG_SUFFIXES["whole-tumor"]].dataobj).any()


def test_followup_forces_lesions(tmp_path):
    infos = generate_dataset(tmp_path / "fu", cases=1, seed=4, followup_years=1.0, max_voxels=100_000, healthy_fraction=1.0)
    assert infos[0]["tumor_type"] != "none" and infos[0]["n_tumors"] >= 1


def test_cord_tilt_distribution_reaches_30_degrees():
    tilts = []
    for i in range(300):
        _, spec, acq = _draw_subject(2024, i, 6_000_000)
        tilts.append(cord_tilt_in_field(spec, *acq.grid()))
    tilts = np.array(tilts)
    assert tilts.max() >= 30.0
    assert (tilts >= 25).mean() >= 0.05  # not a single outlier
    assert np.median(tilts) >= 8.0  # v1 phantoms tilted at most ~8 degrees
    assert (tilts < 60).all()


@pytest.mark.parametrize("kind", ["iso3d", "crop", "axial", "wholespine"])
def test_acquisition_grids(kind):
    for i in range(12):  # grids only (no rendering): spacing, orientation and extent
        _, spec, acq = _draw_subject(77, i, 6_000_000, acquisition=kind)
        shape, aff = acq.grid()
        spacing = np.sqrt((aff[:3, :3] ** 2).sum(0))
        ext = {}  # world axis -> extent (mm)
        for col in range(3):
            w = int(np.argmax(np.abs(aff[:3, col])))
            ext[w] = shape[col] * spacing[col]
        assert sorted(ext) == [0, 1, 2]
        if kind in ("iso3d", "crop"):
            assert np.allclose(spacing, spacing[0]) and 0.8 <= spacing[0] <= 1.2
        if kind == "crop":
            assert 49 <= ext[2] <= 121 and 19 <= ext[0] <= 56 and ext[1] <= 81
        if kind == "iso3d":
            assert ext[2] >= 149 and ext[0] >= 35
        if kind == "wholespine":
            assert 599 <= ext[2] <= 901 and max(spacing) >= 2.5
        if kind == "axial":
            slice_col = int(np.argmax(spacing))
            assert 2.5 <= spacing[slice_col] <= 5.0 and max(np.delete(spacing, slice_col)) <= 0.8
            normal = aff[:3, slice_col] / spacing[slice_col]
            z = np.array([acq.centre[2] - 1.0, acq.centre[2] + 1.0])
            c = spec.centreline(z).astype(float)
            t = (c[1] - c[0]) / np.linalg.norm(c[1] - c[0])
            assert np.degrees(np.arccos(abs(t @ normal))) < 6.0  # slices perpendicular to the cord
    # and a rendered one has that grid, labels aligned
    case = generate_case(77, 0, max_voxels=150_000, acquisition=kind)
    shape0, aff0 = _draw_subject(77, 0, 150_000, acquisition=kind)[2].grid()
    assert case.t2.shape == shape0 and np.allclose(case.t2.affine, aff0)
    assert all(v.shape == case.t2.shape and np.allclose(v.affine, case.t2.affine) for v in case.labels.values())
    assert case.info["acquisition"] == kind


def test_max_voxels_is_respected():
    for kind in ("mixed", "sagittal", "iso3d", "crop", "axial", "wholespine"):
        for i in range(4):
            _, _, acq = _draw_subject(5, i, 200_000, acquisition=kind)
            assert np.prod(acq.grid()[0]) <= 200_000 * 1.05


def test_intensity_randomisation():
    T = {n: TISSUES.index(n) for n in TISSUES}
    apps = [subject_appearance(3, i) for i in range(400)]
    rand = [a for a in apps if a.mode == "random"]
    paper = [a for a in apps if a.mode == "paper"]
    assert 0.14 <= len(rand) / len(apps) <= 0.26  # default 0.2
    # random share: no fixed ordering (CSF darker than cord on T2w, brighter on T1w, fat darker than muscle...)
    assert np.mean([a.lut2[T["csf"]] < a.lut2[T["cord"]] for a in rand]) > 0.25
    assert np.mean([a.lut1[T["csf"]] > a.lut1[T["cord"]] for a in rand]) > 0.25
    assert np.mean([a.lut2[T["fat"]] < a.lut2[T["muscle"]] for a in rand]) > 0.25
    # paper share: the appearance rules of Lemay et al. hold, means vary widely between subjects
    for a in paper:
        c2, c1 = a.lut2[T["cord"]], a.lut1[T["cord"]]
        assert a.lut2[T["csf"]] > 1.8 * c2 and a.lut2[T["cavity"]] > 1.6 * c2
        assert c2 < a.lut2[T["edema"]] < a.lut2[T["csf"]] and a.lut2[T["tumor"]] >= c2
        assert a.lut1[T["csf"]] < 0.35 * c1 and a.lut1[T["cavity"]] < 0.42 * c1 and a.lut1[T["edema"]] < c1
        assert abs(a.lut2[T["gm"]] / c2 - 1) < 0.1 and abs(a.lut1[T["gm"]] / c1 - 1) < 0.05  # GM does not show
    fat = np.array([a.lut2[T["fat"]] / a.lut2[T["cord"]] for a in paper])
    assert fat.max() / fat.min() > 3
    # rendered: in a random subject with CSF darker than cord on T2w, the image shows it
    i = next(i for i, a in enumerate(apps) if a.mode == "random" and a.lut2[T["csf"]] < 0.5 * a.lut2[T["cord"]])
    case = generate_case(3, i, max_voxels=300_000, acquisition="crop", healthy_fraction=0)
    t2 = np.asanyarray(case.t2.dataobj, dtype=float)
    cord = np.asanyarray(case.labels[CORD_SUFFIX].dataobj) > 0
    from scipy import ndimage

    ring = ndimage.binary_dilation(cord, iterations=2) & ~ndimage.binary_dilation(cord, iterations=1)
    assert np.median(t2[ring]) < np.median(t2[cord & ~(np.asanyarray(case.labels[SEG_SUFFIXES["whole-tumor"]].dataobj) > 0)])


def test_grey_matter_inside_the_cord_everywhere():
    for i, (kind, healthy) in enumerate([("iso3d", 1), ("crop", 1), ("axial", 1), ("sagittal", 0), ("crop", 0)]):
        case = generate_case(13, i, max_voxels=300_000, acquisition=kind, gm_mask=True, healthy_fraction=healthy)
        gm = np.asanyarray(case.labels[GM_SUFFIX].dataobj) > 0
        cord = np.asanyarray(case.labels[CORD_SUFFIX].dataobj) > 0
        lesion = np.asanyarray(case.labels[SEG_SUFFIXES["whole-tumor"]].dataobj) > 0
        assert not (gm & ~cord).any() and not (gm & lesion).any()
        if healthy:  # majority label of thin horns at ~1 mm: fewer voxels than the butterfly's area
            assert 0.02 < gm.sum() / cord.sum() < 0.4
    # point-wise in the continuous anatomy: every GM point is within the cord's cross-section
    from imsct.phantoms.anatomy import GM, classify

    spec = random_spec(np.random.default_rng([13, 99]))
    rng = np.random.default_rng(0)
    z = rng.uniform(spec.conus_z, 10, 400_000).astype(np.float32)
    c = spec.centreline(z)
    x = c[:, 0] + rng.uniform(-9, 9, z.size).astype(np.float32)
    y = c[:, 1] + rng.uniform(-9, 9, z.size).astype(np.float32)
    code, _, _ = classify(spec, x, y, z)
    g = code == GM
    from imsct.phantoms.anatomy import CORD_CODES

    frac = g.sum() / np.isin(code, CORD_CODES).sum()
    assert 0.08 < frac < 0.35  # the butterfly: 10-25 % of the cord's cross-section in real cords
    cord_ap, cord_rl = spec.lookup_many(("cord_ap", "cord_rl"), z)
    assert (np.hypot(x[g] - c[g, 0], y[g] - c[g, 1]) < 1.3 * np.maximum(cord_ap[g], cord_rl[g])).all()


def test_storage_types(tmp_path):
    from imsct.phantoms import write_case

    for storage, dtype in (("int16", np.int16), ("int16-scaled", np.int16), ("uint8", np.uint8), ("float32", np.float32)):
        case = generate_case(9, 1, max_voxels=60_000, storage=storage)
        paths = write_case(case, tmp_path / storage)
        img = nib.load(paths["t2"])
        assert img.get_data_dtype() == dtype and case.info["storage"] == storage
        if storage == "int16-scaled":
            assert img.dataobj.slope != 1.0  # nibabel moves scl_slope to the proxy on load
            assert np.abs(np.asanyarray(img.dataobj)).max() > 32767
        assert np.asanyarray(img.dataobj).std() > 0


def test_generator_version_recorded():
    case = generate_case(7, 0, max_voxels=100_000)
    assert case.info["generator_version"] == GENERATOR_VERSION == "2.0"
