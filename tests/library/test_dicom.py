"""NIfTI <-> DICOM MR series and DICOM SEG: geometry and voxel values survive the round trip."""

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from imsct import dicom
from imsct.io import InputError, Volume, load_volume
from imsct.labels import COLOURS, LABELS, SEG_SUFFIXES
from support.cases import assert_same_image, phantom_labelmap


def oblique_volume() -> Volume:
    """Small anisotropic volume, rotated about two axes, left-handed (PIR-like) voxel order."""
    rng = np.random.default_rng(7)
    a, b = np.deg2rad(17.0), np.deg2rad(-9.0)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    axes = np.array([[0, -1, 0], [0, 0, -1], [1, 0, 0]], dtype=float).T  # P, I, R
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ axes @ np.diag([0.7, 0.45, 3.3])
    aff[:3, 3] = [12.5, -40.25, 310.0]
    data = rng.gamma(2.0, 300.0, size=(23, 31, 9)).astype(np.float32)
    return Volume(data, aff, "oblique")


def sitk_read(folder) -> Volume:
    """Read with SimpleITK/GDCM (what MONAI Label's DICOMweb datastore uses) and convert to RAS."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    img = reader.Execute()
    lps = np.eye(4)
    lps[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    return Volume(sitk.GetArrayFromImage(img).transpose(2, 1, 0).astype(np.float32), dicom.LPS @ lps, str(folder))


@pytest.mark.parametrize("which", ["phantom-0", "phantom-1", "oblique"])
def test_series_round_trip(phantom_dir, tmp_path, which):
    if which == "oblique":
        vol = oblique_volume()
    else:
        t2s = sorted(phantom_dir.glob("sub-*/anat/sub-*_T2w.nii.gz"))
        vol = load_volume(t2s[int(which[-1])])
    files = dicom.volume_to_series(vol, tmp_path / "s", patient_id="p1", series_description=dicom.T2W_DESCRIPTION, series_number=1)
    assert len(files) == vol.shape[2]
    ds = pydicom.dcmread(files[0])
    assert ds.Modality == "MR" and ds.SeriesDescription == "T2w"
    assert sorted((ds.Columns, ds.Rows)) == sorted(vol.shape[:2])
    slope = float(ds.RescaleSlope)
    assert_same_image(dicom.read_series(tmp_path / "s"), vol, tol=slope / 2 + 1e-3)
    assert_same_image(sitk_read(tmp_path / "s"), vol, tol=slope / 2 + 1e-2)
    # NIfTI written from the series reads back through the library loader with the same grid.
    out = dicom.series_to_nifti(tmp_path / "s", tmp_path / "back.nii.gz")
    assert_same_image(load_volume(out), vol, tol=slope / 2 + 1e-3)


def test_display_orientation(phantom_dir):
    """Slices are laid out the radiological way whatever the voxel order: head up on sagittal slices."""
    t2 = load_volume(sorted(phantom_dir.glob("sub-*/anat/sub-*_T2w.nii.gz"))[0])
    assert nib.aff2axcodes(t2.affine)[2] in "LR"  # this phantom is sagittal
    for vol in (t2, oblique_volume()):
        for flips in ([1, 1], [-1, 1], [1, -1]):
            aff = vol.affine.copy()
            data = np.asarray(vol.data)
            for axis, f in enumerate(flips):
                if f < 0:
                    aff[:3, 3] += aff[:3, axis] * (data.shape[axis] - 1)
                    aff[:3, axis] *= -1
                    data = np.flip(data, axis)
            for swap in (False, True):
                v = Volume(data.transpose(1, 0, 2), aff[:, [1, 0, 2, 3]], "v") if swap else Volume(data, aff, "v")
                d = dicom.display_oriented(v)
                assert_same_image(d, vol, tol=0)
                lps = dicom.LPS @ d.affine
                assert lps[:3, 0] @ [0, 1, 0] > 0.7 * np.linalg.norm(lps[:3, 0])  # rows run anterior -> posterior
                assert lps[:3, 1] @ [0, 0, -1] > 0.7 * np.linalg.norm(lps[:3, 1])  # columns run head -> feet


def test_oblique_geometry_in_header(tmp_path):
    vol = dicom.display_oriented(oblique_volume())
    files = dicom.volume_to_series(vol, tmp_path, patient_id="p", series_description="x", series_number=3)
    lps = dicom.LPS @ vol.affine
    for k in (0, vol.shape[2] - 1):
        ds = pydicom.dcmread(files[k])
        np.testing.assert_allclose(np.array(ds.ImagePositionPatient, float), lps[:3, :3] @ [0, 0, k] + lps[:3, 3], atol=1e-4)
    iop = np.array(ds.ImageOrientationPatient, float)
    np.testing.assert_allclose(iop[:3], lps[:3, 0] / 0.7, atol=1e-6)
    np.testing.assert_allclose(iop[3:], lps[:3, 1] / 0.45, atol=1e-6)
    np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], [0.45, 0.7], atol=1e-6)
    assert float(ds.SliceThickness) == pytest.approx(3.3)


def test_sheared_affine_refused(tmp_path):
    vol = oblique_volume()
    vol.affine[:3, 2] += vol.affine[:3, 0]  # slice axis no longer perpendicular to the slices
    with pytest.raises(InputError, match="sheared"):
        dicom.volume_to_series(vol, tmp_path, patient_id="p", series_description="x", series_number=1)
    assert not list(tmp_path.iterdir())


def test_study_holds_t2_and_gd_t1(phantom_dir, tmp_path):
    studies = dicom.bids_to_dicom(phantom_dir, tmp_path)
    assert [s.patient_id for s in studies] == ["sub-001", "sub-002"]
    s = studies[0]
    t2 = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted((tmp_path / "sub-001" / "T2w").iterdir())]
    t1 = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted((tmp_path / "sub-001" / "T1w_Gd").iterdir())]
    assert {d.StudyInstanceUID for d in t2 + t1} == {s.study_uid}
    assert {d.SeriesDescription for d in t2} == {"T2w"} and {d.SeriesDescription for d in t1} == {"T1w Gd"}
    assert {d.SeriesInstanceUID for d in t2} == {s.t2_series_uid} != {s.t1_series_uid}
    assert len({d.FrameOfReferenceUID for d in t2 + t1}) == 1
    assert len({d.SOPInstanceUID for d in t2 + t1}) == len(t2) + len(t1)
    assert studies[1].study_uid != s.study_uid
    # T1w keeps its own grid
    t1_nii = load_volume(phantom_dir / "sub-001" / "anat" / "sub-001_T1w.nii.gz")
    slope = float(pydicom.dcmread(next((tmp_path / "sub-001" / "T1w_Gd").iterdir())).RescaleSlope)
    assert_same_image(dicom.read_series(tmp_path / "sub-001" / "T1w_Gd"), t1_nii, tol=slope / 2 + 1e-3)
    # Writing the same subject again gives the same UIDs (re-upload replaces, no duplicates)
    again = dicom.write_study(phantom_dir / "sub-001/anat/sub-001_T2w.nii.gz", phantom_dir / "sub-001/anat/sub-001_T1w.nii.gz",
                              tmp_path / "again", "sub-001")
    assert (again.study_uid, again.t2_series_uid, again.t1_series_uid) == (s.study_uid, s.t2_series_uid, s.t1_series_uid)


def test_seg_round_trip(phantom_dir, tmp_path):
    t2 = load_volume(phantom_dir / "sub-001" / "anat" / "sub-001_T2w.nii.gz")
    dicom.volume_to_series(t2, tmp_path / "t2", patient_id="sub-001", series_description="T2w", series_number=1)
    lm = phantom_labelmap(phantom_dir)
    out = dicom.write_seg(lm, tmp_path / "t2", tmp_path / "seg.dcm")
    ds = pydicom.dcmread(out)
    assert ds.Modality == "SEG" and ds.SOPClassUID == dicom.SEG_STORAGE
    src = pydicom.dcmread(next((tmp_path / "t2").iterdir()), stop_before_pixels=True)
    assert ds.StudyInstanceUID == src.StudyInstanceUID
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
    segs = dicom.seg_segments(out)
    assert [(s.number, s.label) for s in segs] == [(i, n) for n, i in LABELS.items()]
    for s in segs:
        assert max(abs(a - b) for a, b in zip(s.rgb, COLOURS[s.label])) <= 1
    back = dicom.read_seg(out)
    assert_same_image(back, lm, tol=0)


def test_seg_refuses_bad_label_maps(phantom_dir, tmp_path):
    t2 = load_volume(phantom_dir / "sub-002" / "anat" / "sub-002_T2w.nii.gz")
    dicom.volume_to_series(t2, tmp_path / "t2", patient_id="sub-002", series_description="T2w", series_number=1)
    empty = Volume(np.zeros(t2.shape, np.uint8), t2.affine, "empty.nii.gz")
    with pytest.raises(InputError, match="empty.nii.gz: label map is empty"):
        dicom.write_seg(empty, tmp_path / "t2", tmp_path / "a.dcm")
    bad = Volume(np.full(t2.shape, 7, np.uint8), t2.affine, "seven.nii.gz")
    with pytest.raises(InputError, match=r"seven.nii.gz: label values \[7\]"):
        dicom.write_seg(bad, tmp_path / "t2", tmp_path / "b.dcm")
    shifted = t2.affine.copy()
    shifted[:3, 3] += 5.0
    moved = Volume(np.ones(t2.shape, np.uint8), shifted, "moved.nii.gz")
    with pytest.raises(InputError, match="does not match the DICOM series"):
        dicom.write_seg(moved, tmp_path / "t2", tmp_path / "c.dcm")
    assert not list(tmp_path.glob("*.dcm"))


# ---------------------------------------------------------------------------------------------
# Acquisition plane: one instance per acquired slice, whatever order the NIfTI stores its axes in.

def _rotated(affine: np.ndarray, deg_ap: float, deg_si: float) -> np.ndarray:
    """The same grid turned about the AP then the SI axis through its origin (a double-oblique header)."""
    a, b = np.deg2rad(deg_ap), np.deg2rad(deg_si)
    ry = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    out = affine.copy()
    out[:3, :3] = rz @ ry @ affine[:3, :3]
    return out


# name: (acquisition, index, world axis the slices are stacked along (0 RL, 2 SI; None: the
# NIfTI's third, isotropic data), transform). Seed 11, 120 k voxels: small cases whose storage
# orders put the slice axis first (RAS, LPS), last (IPL, PLS) or, once transposed, first for an axial.
PLANE_CASES = {
    "sagittal-RAS": ("sagittal", 3, 0, None),
    "sagittal-LPS": ("sagittal", 1, 0, None),
    "sagittal-IPL": ("sagittal", 0, 0, None),
    "sagittal-double-oblique": ("sagittal", 3, 0, "rotate"),
    "wholespine-RAS": ("wholespine", 3, 0, None),
    "axial-PLS": ("axial", 0, 2, None),  # the axial phantoms are tilted with the cord (oblique)
    "axial-stored-SRA": ("axial", 2, 2, "transpose"),
    "iso3d-RAS": ("iso3d", 3, None, None),
}


def plane_case(name: str) -> tuple[Volume, Volume, int]:
    """(T2w, label map with every class, the voxel axis the acquisition stacked its slices along)."""
    from imsct.phantoms import generate_case

    acquisition, index, world, how = PLANE_CASES[name]
    case = generate_case(11, index, max_voxels=120_000, acquisition=acquisition)
    data = np.asarray(case.t2.dataobj, dtype=np.float32)
    lm = np.zeros(data.shape, np.uint8)
    for cls, idx in LABELS.items():
        lm[np.asarray(case.labels[SEG_SUFFIXES[cls]].dataobj) > 0] = idx
        if not (lm == idx).any():
            lm[idx:idx + 2, 1:3, 1:3] = idx
    aff = case.t2.affine.copy()
    if how == "rotate":
        aff = _rotated(aff, 20.0, 10.0)
    elif how == "transpose":
        data, lm, aff = data.transpose(2, 0, 1), lm.transpose(2, 0, 1), aff[:, [2, 0, 1, 3]]
    if world is None:
        axis = 2
    else:  # the voxel axis closest to that world axis
        axis = int(np.argmax(np.abs(aff[world, :3]) / np.linalg.norm(aff[:3, :3], axis=0)))
    return Volume(data, aff, f"{name}.nii.gz"), Volume(lm, aff, f"{name}_labels.nii.gz"), axis


def oblique_stored_slice_axis_first() -> Volume:
    """The oblique volume (pixels 0.7 x 0.45 mm, slices 3.3 mm) with its slice axis stored first."""
    vol = oblique_volume()
    return Volume(np.ascontiguousarray(vol.data.transpose(2, 0, 1)), vol.affine[:, [2, 0, 1, 3]], "oblique-first.nii.gz")


def _headers(folder):
    return sorted((pydicom.dcmread(f, stop_before_pixels=True) for f in folder.iterdir()), key=lambda d: int(d.InstanceNumber))


def check_acquisition_plane(vol: Volume, axis: int, folder) -> list:
    """One instance per acquired slice along voxel ``axis`` of ``vol``, with that axis's spacing as
    SliceThickness and SpacingBetweenSlices, the slice normal along it, PixelSpacing row spacing
    first, positions stepping along the normal; returns the headers by InstanceNumber."""
    hdrs = _headers(folder)
    lps = dicom.LPS @ vol.affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    assert len(hdrs) == vol.shape[axis]
    assert {d.SeriesInstanceUID for d in hdrs} == {hdrs[0].SeriesInstanceUID}
    for d in hdrs:
        assert float(d.SliceThickness) == pytest.approx(spacing[axis], abs=1e-6)
        assert float(d.SpacingBetweenSlices) == pytest.approx(spacing[axis], abs=1e-6)
    iop = np.array(hdrs[0].ImageOrientationPatient, float)
    assert all(np.allclose(np.array(d.ImageOrientationPatient, float), iop) for d in hdrs)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    assert abs(normal @ lps[:3, axis] / spacing[axis]) == pytest.approx(1.0, abs=1e-6)
    # the in-plane voxel axes: along a row (columns) and down a column (rows)
    along_row = int(np.argmax([abs(row_dir @ lps[:3, a]) / spacing[a] for a in range(3)]))
    down_col = int(np.argmax([abs(col_dir @ lps[:3, a]) / spacing[a] for a in range(3)]))
    assert {along_row, down_col, axis} == {0, 1, 2}
    assert (hdrs[0].Columns, hdrs[0].Rows) == (vol.shape[along_row], vol.shape[down_col])
    np.testing.assert_allclose([float(v) for v in hdrs[0].PixelSpacing], [spacing[down_col], spacing[along_row]], atol=1e-6)
    pos = np.array([np.array(d.ImagePositionPatient, float) for d in hdrs])
    np.testing.assert_allclose(np.diff(pos, axis=0), np.tile(normal * spacing[axis], (len(hdrs) - 1, 1)), atol=1e-4)
    # the first instance's corner is a corner of the NIfTI grid
    corners = [lps[:3, :3] @ (np.array(c) * (np.array(vol.shape) - 1)) + lps[:3, 3] for c in np.ndindex(2, 2, 2)]
    assert min(np.linalg.norm(pos[0] - c) for c in corners) < 1e-4
    return hdrs


@pytest.mark.parametrize("name", list(PLANE_CASES))
def test_series_in_acquisition_plane(tmp_path, name):
    vol, _, axis = plane_case(name)
    dicom.volume_to_series(vol, tmp_path / "s", patient_id="p", series_description="T2w", series_number=1)
    hdrs = check_acquisition_plane(vol, axis, tmp_path / "s")
    tol = float(hdrs[0].RescaleSlope) / 2 + 1e-3
    # the project's reader, onto the NIfTI's own voxel order: same shape, same affine, same voxels
    back = dicom.read_series(tmp_path / "s", like=vol)
    assert back.shape == vol.shape
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-3)
    assert np.abs(back.data.astype(np.float64) - vol.data).max() <= tol
    # GDCM (SimpleITK, what MONAI Label reads DICOM with) sees the same image
    assert_same_image(sitk_read(tmp_path / "s"), vol, tol=tol + 1e-2)
    out = dicom.series_to_nifti(tmp_path / "s", tmp_path / "back.nii.gz", like=vol)
    got = load_volume(out)
    assert got.shape == vol.shape and np.allclose(got.affine, vol.affine, atol=1e-3)


def test_in_plane_spacing_row_first_when_slice_axis_stored_first(tmp_path):
    vol = oblique_stored_slice_axis_first()
    dicom.volume_to_series(vol, tmp_path / "s", patient_id="p", series_description="x", series_number=1)
    hdrs = check_acquisition_plane(vol, 0, tmp_path / "s")
    assert float(hdrs[0].SliceThickness) == pytest.approx(3.3)
    back = dicom.read_series(tmp_path / "s", like=vol)
    assert back.shape == vol.shape and np.allclose(back.affine, vol.affine, atol=1e-3)


def test_slice_axis_rule():
    def aff(*spacing):
        return np.diag([*spacing, 1.0])

    assert dicom.slice_axis(aff(4.0, 0.7, 0.7)) == 0
    assert dicom.slice_axis(aff(0.7, 3.0, 0.7)) == 1
    assert dicom.slice_axis(aff(0.7, 0.7, 3.0)) == 2
    assert dicom.slice_axis(aff(1.0, 1.0, 1.0)) == 2  # isotropic: the stored third axis
    assert dicom.slice_axis(aff(1.005, 1.0, 1.0)) == 2  # within 1 %: isotropic
    assert dicom.slice_axis(aff(1.02, 1.0, 1.0)) == 0
    assert dicom.slice_axis(aff(3.0, 3.0, 1.0)) == 1  # two tied, neither third: the later


def test_read_series_like_a_foreign_grid_is_a_clear_error(tmp_path):
    vol, _, _ = plane_case("sagittal-RAS")
    dicom.volume_to_series(vol, tmp_path / "s", patient_id="p", series_description="x", series_number=1)
    moved = vol.affine.copy()
    moved[:3, 3] += 2.0
    with pytest.raises(InputError, match=r"DICOM series .*/s: grid .* is not a reordering .*translation"):
        dicom.read_series(tmp_path / "s", like=(vol.shape, moved))


@pytest.mark.parametrize("name", ["sagittal-RAS", "axial-stored-SRA", "sagittal-double-oblique"])
def test_seg_frames_lie_on_and_reference_the_source_slices(tmp_path, name):
    """Every SEG frame lies on one source instance (same position, orientation, pixel grid),
    references it, and holds that slice of the label map: what OHIF needs to overlay it."""
    vol, lm, axis = plane_case(name)
    dicom.volume_to_series(vol, tmp_path / "s", patient_id="p", series_description="T2w", series_number=1)
    out = dicom.write_seg(lm, tmp_path / "s", tmp_path / "seg.dcm")  # label map on the NIfTI's voxel order
    src = _headers(tmp_path / "s")
    seg = pydicom.dcmread(out)
    assert (seg.Rows, seg.Columns) == (src[0].Rows, src[0].Columns)
    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float),
                               np.array(src[0].ImageOrientationPatient, float), atol=1e-6)
    np.testing.assert_allclose([float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing],
                               [float(v) for v in src[0].PixelSpacing], atol=1e-6)
    assert float(shared.PixelMeasuresSequence[0].SliceThickness) == pytest.approx(float(src[0].SliceThickness), abs=1e-6)
    by_uid = {d.SOPInstanceUID: k for k, d in enumerate(src)}
    referenced = {str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(by_uid)
    # the label map as the source series stacks it (slice k = instance k + 1)
    on_src = dicom.reorient_like(lm, dicom.read_series(tmp_path / "s")).data
    pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    seen: dict[int, set] = {}
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
        ref_uid = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        k = by_uid[ref_uid]
        np.testing.assert_allclose(np.array(item.PlanePositionSequence[0].ImagePositionPatient, float),
                                   np.array(src[k].ImagePositionPatient, float), atol=1e-3)
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        np.testing.assert_array_equal(frame, (on_src[:, :, k] == number).T)
        seen.setdefault(number, set()).add(k)
    assert seen == {i: set(range(len(src))) for i in LABELS.values()}
    back = dicom.reorient_like(dicom.read_seg(out), lm)
    assert back.shape == lm.shape and np.array_equal(back.data, lm.data)


def test_command_writes_sagittal_series_stored_ras(tmp_path):
    """``python -m imsct.dicom`` on a sagittal T2w stored RAS (slices along the first axis): one
    instance per sagittal slice, not one per voxel row along SI."""
    import subprocess
    import sys

    vol, _, axis = plane_case("sagittal-RAS")
    anat = tmp_path / "bids" / "sub-001" / "anat"
    anat.mkdir(parents=True)
    for c in ("T2w", "T1w"):
        nib.save(nib.Nifti1Image(vol.data, vol.affine), anat / f"sub-001_{c}.nii.gz")
    res = subprocess.run([sys.executable, "-m", "imsct.dicom", str(tmp_path / "bids"), "--out", str(tmp_path / "dcm")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    for series in ("T2w", "T1w_Gd"):
        hdrs = check_acquisition_plane(vol, axis, tmp_path / "dcm" / "sub-001" / series)
        assert len(hdrs) == vol.shape[0] < vol.shape[2]
        normal = np.cross(np.array(hdrs[0].ImageOrientationPatient[:3], float), np.array(hdrs[0].ImageOrientationPatient[3:], float))
        assert abs(normal[0]) > 0.99  # sagittal: the normal runs left-right
