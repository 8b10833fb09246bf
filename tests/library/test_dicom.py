"""NIfTI <-> DICOM MR series and DICOM SEG: geometry and voxel values survive the round trip."""

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from imsct import dicom
from imsct.io import InputError, Volume, load_volume
from imsct.labels import COLOURS, LABELS
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
