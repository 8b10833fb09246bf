"""DICOM for IMSCT: NIfTI volumes as MR series, series back to volumes, label maps as DICOM SEG.

Conventions (used by the DICOMweb datastore of the MONAI Label app):

- one study (one ``StudyInstanceUID``) per subject, holding two MR series that share one
  ``FrameOfReferenceUID``: the T2w series (``SeriesDescription`` ``"T2w"``, series number 1) and the
  Gd-enhanced T1w series (``SeriesDescription`` ``"T1w Gd"``, series number 2);
- a series is written in its acquisition plane, one instance per acquired slice. The slice axis
  (:func:`slice_axis`) is the voxel axis with the largest spacing (a 2D acquisition's slices are
  thicker than its pixels, whatever order the NIfTI stores its axes in); when the NIfTI's third
  axis is within 1 % of that spacing (isotropic 3D data, or a tie) the third axis is kept, as the
  axis a DICOM-to-NIfTI converter (dcm2niix) stores the acquired slices along. The two other axes
  become the rows and columns, ordered and flipped for radiological display
  (:func:`display_oriented`), and instance 1 is the first slice along the normal (row x column);
- geometry is exact: the NIfTI affine (RAS+, mm) is turned into LPS ``ImagePositionPatient`` per
  slice, ``ImageOrientationPatient``, ``PixelSpacing`` (row spacing first), and ``SliceThickness``
  = ``SpacingBetweenSlices`` = the slice spacing (a NIfTI holds no gap between slices);
  :func:`read_series` reads the series back (on the NIfTI's own voxel order with ``like=``);
- voxel values are stored as signed 16-bit integers with ``RescaleSlope`` chosen so that no value
  loses more than half a slope step (slope 1 when the image already holds integers that fit);
- segmentations are DICOM SEG (pydicom-seg) with one segment per class of :mod:`imsct.labels`
  (tumor=1, edema=2, cavity=3), their names and display colours.

UIDs are derived from the subject and series name, so writing the same case twice gives the same
instances (a second upload to a PACS replaces rather than duplicates).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from .io import InputError, Volume, _grid, grid_difference, load_image, load_volume, replace_atomically, same_grid
from .labels import COLOURS, LABELS

T2W_DESCRIPTION = "T2w"
T1W_DESCRIPTION = "T1w Gd"
SEG_DESCRIPTION = "IMSCT segmentation"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS (its own inverse)

# SNOMED CT codes for each class (category: morphologically altered structure).
_CATEGORY = {"CodeValue": "49755003", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Morphologically Altered Structure"}
SEGMENT_TYPES: dict[str, dict[str, str]] = {
    "tumor": {"CodeValue": "108369006", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Neoplasm"},
    "edema": {"CodeValue": "79654002", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Edema"},
    "cavity": {"CodeValue": "441457006", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Cyst"},
}
SEGMENT_DESCRIPTIONS = {"tumor": "Intramedullary tumour", "edema": "Peritumoral edema", "cavity": "Syrinx / tumour cavity"}


def _uid(*parts: str) -> str:
    return generate_uid(entropy_srcs=["imsct", *[str(p) for p in parts]])


def _ds(values) -> list[str]:
    """Decimal strings (DS holds at most 16 characters)."""
    out = []
    for v in values:
        s = f"{float(v):.10g}"
        if len(s) > 16:
            s = f"{float(v):.8g}"
        out.append(s)
    return out


@dataclass
class SeriesGeometry:
    row_dir: np.ndarray  # LPS unit vector along a row (increasing column index) = NIfTI axis 0 of the grid given
    col_dir: np.ndarray  # LPS unit vector down a column (increasing row index) = NIfTI axis 1 of the grid given
    spacing: np.ndarray  # mm along NIfTI axes 0, 1, 2
    positions: np.ndarray  # (n_slices, 3) LPS position of the first voxel of each slice


SLICE_AXIS_TIE = 0.01  # spacings within 1 % of the largest count as the largest (isotropic data)


def slice_axis(affine: np.ndarray) -> int:
    """The voxel axis of a NIfTI grid that a DICOM series lists as its slices (the acquired slices).

    The axis with the largest spacing: a 2D MR acquisition's slice thickness exceeds its in-plane
    resolution, so this is the acquisition's slice direction however the NIfTI's axes were
    permuted (a sagittal image stored RAS has its slices along the first axis). When the third
    axis's spacing is within :data:`SLICE_AXIS_TIE` of the largest (isotropic 3D data, where the
    spacing cannot tell), the third axis: the one converters store the acquired slices along. Of
    two other axes tied for the largest, the later one.
    """
    spacing = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    tied = [a for a in range(3) if spacing[a] >= spacing.max() * (1 - SLICE_AXIS_TIE)]
    return 2 if 2 in tied else tied[-1]


def acquisition_ordered(volume: Volume) -> Volume:
    """The same image with its axes permuted (exactly, no resampling) so that the third is its
    :func:`slice_axis`; the two in-plane axes keep their order."""
    k = slice_axis(volume.affine)
    if k == 2:
        return volume
    order = [a for a in range(3) if a != k] + [k]
    aff = np.array(volume.affine, dtype=np.float64)
    aff[:, :3] = aff[:, order]
    return Volume(np.ascontiguousarray(np.asarray(volume.data).transpose(order)), aff, volume.path)


def reorient_like(volume: Volume, grid, where: str | None = None) -> Volume:
    """``volume`` with its voxel axes permuted and flipped (exactly, no resampling) onto ``grid``
    (a Volume, a nibabel image or a ``(shape, affine)`` pair) when both describe the same voxels in
    the world; :class:`InputError` naming ``where`` otherwise."""
    shape, affine = _grid(grid)
    if same_grid(volume, (shape, affine)):
        return volume
    ornt = nib.orientations.ornt_transform(nib.io_orientation(volume.affine), nib.io_orientation(affine))
    data = nib.orientations.apply_orientation(np.asarray(volume.data), ornt)
    aff = np.asarray(volume.affine, dtype=np.float64) @ nib.orientations.inv_ornt_aff(ornt, volume.shape)
    out = Volume(np.ascontiguousarray(data), aff, volume.path)
    if not same_grid(out, (shape, affine)):
        raise InputError(f"{where or volume.path}: grid {volume.shape} is not a reordering of the grid {shape} "
                         f"it should match ({grid_difference(out, SimpleNamespace(shape=shape, affine=affine))})")
    return out


def geometry_from_affine(affine: np.ndarray, shape, where: str = "image") -> SeriesGeometry:
    """DICOM plane geometry of a NIfTI grid; refuses sheared grids DICOM slices cannot describe."""
    lps = LPS @ np.asarray(affine, dtype=np.float64)
    cols = lps[:3, :3]
    spacing = np.linalg.norm(cols, axis=0)
    units = cols / spacing
    if abs(units[:, 0] @ units[:, 1]) > 1e-4:
        raise InputError(f"{where}: in-plane axes are not orthogonal (sheared affine); cannot write DICOM slices")
    normal = np.cross(units[:, 0], units[:, 1])
    if abs(abs(normal @ units[:, 2]) - 1.0) > 1e-4:
        raise InputError(f"{where}: slice axis is not perpendicular to the slices (sheared affine); cannot write DICOM slices")
    k = np.arange(int(shape[2]))
    positions = lps[:3, 3][None, :] + k[:, None] * cols[:, 2][None, :]
    return SeriesGeometry(units[:, 0], units[:, 1], spacing, positions)


# Radiological display directions (LPS) of the image rows (left to right on screen) and columns
# (top to bottom), by the axis the slice normal is closest to: sagittal, coronal, axial.
DISPLAY_DIRECTIONS = {
    0: (np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0])),  # sagittal: anterior left, head up
    1: (np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, -1.0])),  # coronal: patient right on the left, head up
    2: (np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])),   # axial: patient right on the left, anterior up
}


def display_oriented(volume: Volume) -> Volume:
    """The same image with its two in-plane axes swapped and/or reversed (exactly, no resampling) so
    that viewers, which draw DICOM pixels as stored, show it the radiological way (head up on
    sagittal and coronal slices). The slice axis is kept."""
    data = np.asarray(volume.data)
    aff = np.array(volume.affine, dtype=np.float64)
    lps = LPS @ aff
    units = lps[:3, :2] / np.linalg.norm(lps[:3, :2], axis=0)
    normal = np.cross(units[:, 0], units[:, 1])
    want_row, want_col = DISPLAY_DIRECTIONS[int(np.argmax(np.abs(normal)))]
    if abs(units[:, 1] @ want_row) > abs(units[:, 0] @ want_row):
        data = data.transpose(1, 0, 2)
        aff[:, [0, 1]] = aff[:, [1, 0]]
    for axis, want in ((0, want_row), (1, want_col)):
        if (LPS @ aff)[:3, axis] @ want < 0:
            data = np.flip(data, axis)
            aff[:3, 3] += aff[:3, axis] * (data.shape[axis] - 1)
            aff[:3, axis] *= -1
    return Volume(np.ascontiguousarray(data), aff, volume.path)


def series_ordered(volume: Volume) -> Volume:
    """The voxel order a series is written in (exactly the same image): slices along the
    :func:`slice_axis` as the third axis, in-plane axes as :func:`display_oriented`, and the
    slices stacked along the normal (row direction x column direction), so that InstanceNumber
    and SliceLocation increase together."""
    vol = display_oriented(acquisition_ordered(volume))
    lps = LPS @ vol.affine
    if np.cross(lps[:3, 0], lps[:3, 1]) @ lps[:3, 2] < 0:
        aff = np.array(vol.affine, dtype=np.float64)
        aff[:3, 3] += aff[:3, 2] * (vol.shape[2] - 1)
        aff[:3, 2] *= -1
        vol = Volume(np.ascontiguousarray(np.flip(np.asarray(vol.data), 2)), aff, vol.path)
    return vol


def _quantise(data: np.ndarray) -> tuple[np.ndarray, float, float]:
    """int16 pixel values and (slope, intercept) with value = stored * slope + intercept."""
    data = np.asarray(data, dtype=np.float64)
    lo, hi = float(data.min()), float(data.max())
    if np.allclose(data, np.round(data)) and lo >= -32768 and hi <= 32767:
        return np.round(data).astype(np.int16), 1.0, 0.0
    intercept = 0.0 if lo >= 0 else lo
    slope = max(hi - intercept, 1e-6) / 32000.0
    stored = np.round((data - intercept) / slope)
    return np.clip(stored, -32768, 32767).astype(np.int16), slope, intercept


def volume_to_series(
    volume: Volume,
    out_dir: str | os.PathLike,
    *,
    patient_id: str,
    series_description: str,
    series_number: int,
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    study_date: str = "20240101",
) -> list[Path]:
    """Write one 3D volume as an MR series into ``out_dir``: one file per acquired slice (along
    :func:`slice_axis`), in-plane axes ordered for display (:func:`display_oriented`), instance 1
    the first along the slice normal (:func:`series_ordered`)."""
    if np.asarray(volume.data).ndim != 3:
        raise InputError(f"{volume.path}: expected a 3D image, got shape {np.asarray(volume.data).shape}")
    volume = series_ordered(volume)
    data = volume.data
    geo = geometry_from_affine(volume.affine, data.shape, where=str(volume.path))
    stored, slope, intercept = _quantise(data)
    study_uid = study_uid or _uid(patient_id, "study")
    for_uid = frame_of_reference_uid or _uid(patient_id, "frame")
    series_uid = _uid(patient_id, study_uid, series_description, series_number)
    values = data[np.isfinite(data)]
    p1, p99 = np.percentile(values, [1, 99.5]) if values.size else (0.0, 1.0)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now()
    files = []
    for k in range(data.shape[2]):
        sop_uid = _uid(series_uid, k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MR_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = patient_id
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.StudyInstanceUID = study_uid
        ds.StudyID = "1"
        ds.StudyDate = study_date
        ds.StudyTime = "120000"
        ds.StudyDescription = "IMSCT spinal cord MRI"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = int(series_number)
        ds.SeriesDescription = series_description
        ds.SeriesDate = study_date
        ds.ContentDate = now.strftime("%Y%m%d")
        ds.ContentTime = now.strftime("%H%M%S")
        ds.Modality = "MR"
        ds.Manufacturer = "IMSCT"
        ds.BodyPartExamined = "SPINE"
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.EchoTime = None
        ds.RepetitionTime = None
        ds.EchoTrainLength = None
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = _ds(geo.positions[k])
        ds.ImageOrientationPatient = _ds(np.concatenate([geo.row_dir, geo.col_dir]))
        ds.PixelSpacing = _ds([geo.spacing[1], geo.spacing[0]])  # row spacing, column spacing
        ds.SliceThickness = _ds([geo.spacing[2]])[0]
        ds.SpacingBetweenSlices = _ds([geo.spacing[2]])[0]
        ds.SliceLocation = _ds([geo.positions[k] @ np.cross(geo.row_dir, geo.col_dir)])[0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = int(data.shape[1])
        ds.Columns = int(data.shape[0])
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = _ds([slope])[0]
        ds.RescaleIntercept = _ds([intercept])[0]
        ds.RescaleType = "US"
        ds.WindowCenter = _ds([(p1 + p99) / 2])[0]
        ds.WindowWidth = _ds([max(p99 - p1, 1e-3)])[0]
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        ds.is_little_endian, ds.is_implicit_VR = True, False
        path = out / f"{series_number:03d}-{k + 1:04d}.dcm"
        ds.save_as(path, write_like_original=False)
        files.append(path)
    return files


@dataclass
class StudyFiles:
    patient_id: str
    study_uid: str
    t2_series_uid: str
    t1_series_uid: str
    files: list[Path]


def write_study(t2: Volume | str | os.PathLike, t1: Volume | str | os.PathLike, out_dir: str | os.PathLike, patient_id: str,
                session: str | None = None) -> StudyFiles:
    """One subject (one session) as a DICOM study: ``out_dir/T2w/*.dcm`` and ``out_dir/T1w_Gd/*.dcm``."""
    t2v = t2 if isinstance(t2, Volume) else load_image(t2, "T2w image")
    t1v = t1 if isinstance(t1, Volume) else load_image(t1, "T1w image")
    key = f"study-{session}" if session else "study"
    study_uid, for_uid = _uid(patient_id, key), _uid(patient_id, key, "frame")
    out = Path(out_dir)
    f2 = volume_to_series(t2v, out / "T2w", patient_id=patient_id, series_description=T2W_DESCRIPTION,
                          series_number=1, study_uid=study_uid, frame_of_reference_uid=for_uid)
    f1 = volume_to_series(t1v, out / "T1w_Gd", patient_id=patient_id, series_description=T1W_DESCRIPTION,
                          series_number=2, study_uid=study_uid, frame_of_reference_uid=for_uid)
    uid = lambda f: str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID)  # noqa: E731
    return StudyFiles(patient_id, study_uid, uid(f2[0]), uid(f1[0]), f2 + f1)


def bids_to_dicom(bids_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[StudyFiles]:
    """Every ``sub-*/[ses-*/]anat/*_T2w.nii.gz`` with its ``*_T1w.nii.gz`` as one study per subject and
    session, written to ``out_dir/sub-XXX[/ses-YY]/{T2w,T1w_Gd}/``."""
    bids = Path(bids_dir)
    if not bids.is_dir():
        raise InputError(f"{bids}: not a folder")
    t2s = sorted(bids.glob("sub-*/anat/sub-*_T2w.nii.gz")) + sorted(bids.glob("sub-*/ses-*/anat/sub-*_T2w.nii.gz"))
    if not t2s:
        raise InputError(f"{bids}: no sub-*/[ses-*/]anat/sub-*_T2w.nii.gz found")
    pairs = []
    for t2 in t2s:  # check every pair before writing anything
        t1 = t2.with_name(t2.name[: -len("_T2w.nii.gz")] + "_T1w.nii.gz")
        if not t1.exists():
            raise InputError(f"{t1}: T1w image not found (needed beside {t2.name})")
        rel = t2.parent.parent.relative_to(bids)
        pairs.append((t2, t1, rel.parts[0], rel.parts[1] if len(rel.parts) > 1 else None))
    return [write_study(t2, t1, Path(out_dir).joinpath(sub, *([ses] if ses else [])), sub, session=ses)
            for t2, t1, sub, ses in pairs]


def _dicom_files(source) -> list[Path]:
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        files = sorted(p for p in Path(source).iterdir() if p.is_file())
    elif isinstance(source, (str, os.PathLike)):
        files = [Path(source)]
    else:
        files = [Path(p) for p in source]
    if not files:
        raise InputError(f"{source}: no DICOM files")
    return files


def read_series(source, like=None) -> Volume:
    """Read one single-frame DICOM series (a folder or a list of files) as a Volume (RAS+ affine).

    Slices are ordered by their position along the slice normal; the volume's first axis runs along
    the DICOM rows, the second down the columns, the third along the normal. The world geometry is
    that of the written image; the voxel order may differ from it by flips and swaps of axes
    (:func:`volume_to_series` writes the acquisition plane). ``like`` (a Volume, a nibabel image or
    a ``(shape, affine)`` pair, e.g. the NIfTI the series was written from): the volume reordered
    onto that grid (:func:`reorient_like`), so the round trip gives the same shape and affine.
    """
    files = _dicom_files(source)
    where = str(source if not isinstance(source, list) else files[0].parent)
    slices = []
    for f in files:
        try:
            ds = pydicom.dcmread(f)
        except Exception as exc:
            raise InputError(f"{f}: not a readable DICOM file ({exc})") from None
        if "PixelData" not in ds or "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            raise InputError(f"{f}: not an image slice with position and orientation")
        slices.append(ds)
    series = {str(ds.SeriesInstanceUID) for ds in slices}
    if len(series) != 1:
        raise InputError(f"{where}: holds {len(series)} series, expected one")
    iop = np.array(slices[0].ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    pos = np.array([np.array(ds.ImagePositionPatient, dtype=np.float64) for ds in slices])
    order = np.argsort(pos @ normal)
    slices, pos = [slices[i] for i in order], pos[order]
    if len(slices) > 1:
        steps = np.diff(pos, axis=0)
        step = steps.mean(axis=0)
        if np.linalg.norm(step) < 1e-6:
            raise InputError(f"{where}: several slices share one position")
        if np.abs(steps - step).max() > 1e-3 * max(1.0, np.linalg.norm(step)):
            raise InputError(f"{where}: slices are not evenly spaced")
    else:
        step = normal * float(getattr(slices[0], "SliceThickness", 1.0) or 1.0)
    dr, dc = (float(v) for v in slices[0].PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * dc
    lps[:3, 1] = col_dir * dr
    lps[:3, 2] = step
    lps[:3, 3] = pos[0]
    planes = []
    for ds in slices:
        arr = ds.pixel_array.astype(np.float64)
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
        planes.append((arr * slope + intercept).T)
    data = np.stack(planes, axis=2).astype(np.float32)
    vol = Volume(data=data, affine=LPS @ lps, path=where)
    return vol if like is None else reorient_like(vol, like, where=f"DICOM series {where}")


def series_to_nifti(source, out_path: str | os.PathLike, like=None) -> Path:
    """Read a DICOM series and write it as NIfTI (atomically); ``like`` as in :func:`read_series`."""
    from .io import save_volume

    vol = read_series(source, like=like)
    return save_volume(vol.data, vol.affine, out_path, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# DICOM SEG


def seg_template(names=None, creator: str = "IMSCT", algorithm: str = "IMSCT cascade") -> Dataset:
    """pydicom-seg template declaring one segment per IMSCT class (number = label index)."""
    import pydicom_seg

    names = list(names) if names is not None else list(LABELS)
    segments = []
    for name in names:
        if name not in LABELS:
            raise ValueError(f"unknown label {name!r}; known: {', '.join(LABELS)}")
        segments.append({
            "labelID": LABELS[name],
            "SegmentLabel": name,
            "SegmentDescription": SEGMENT_DESCRIPTIONS[name],
            "SegmentAlgorithmType": "AUTOMATIC" if algorithm else "MANUAL",
            "SegmentAlgorithmName": algorithm or "",
            "SegmentedPropertyCategoryCodeSequence": dict(_CATEGORY),
            "SegmentedPropertyTypeCodeSequence": dict(SEGMENT_TYPES[name]),
            "recommendedDisplayRGBValue": list(COLOURS[name]),
        })
    meta = {
        "ContentCreatorName": creator,
        "ClinicalTrialSeriesID": "IMSCT",
        "ClinicalTrialTimePointID": "1",
        "SeriesDescription": SEG_DESCRIPTION,
        "SeriesNumber": "300",
        "InstanceNumber": "1",
        "segmentAttributes": [segments],
        "ContentLabel": "SEGMENTATION",
        "ContentDescription": "IMSCT tumour, edema and cavity",
        "ClinicalTrialCoordinatingCenterName": "IMSCT",
        "BodyPartExamined": "SPINE",
    }
    return pydicom_seg.template.from_dcmqi_metainfo(meta)


def volume_to_sitk(volume: Volume, pixel_type=None):
    """SimpleITK image (LPS geometry) of a Volume."""
    import SimpleITK as sitk

    data = np.asarray(volume.data)
    img = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    lps = LPS @ np.asarray(volume.affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(v) for v in lps[:3, 3]])
    img.SetDirection([float(v) for v in (lps[:3, :3] / spacing).ravel()])
    if pixel_type is not None:
        img = sitk.Cast(img, pixel_type)
    return img


def write_seg(labelmap: Volume | str | os.PathLike, source, out_path: str | os.PathLike,
              algorithm: str = "IMSCT cascade") -> Path:
    """Write a label map (0 background, 1 tumor, 2 edema, 3 cavity) on the grid of the DICOM
    series ``source`` (folder or files) as a DICOM SEG file referencing that series: one frame per
    source slice and segment, each lying on and referencing its source instance. The label map may
    store its voxels in another order (e.g. that of the NIfTI the series was written from).

    Refuses a label map with values outside the IMSCT classes, one with no labelled voxel (DICOM
    SEG cannot hold an empty segmentation), or one whose grid differs from the source series.
    """
    import SimpleITK as sitk
    import pydicom_seg

    lab = labelmap if isinstance(labelmap, Volume) else load_volume(labelmap, "label map")
    values = np.unique(np.round(lab.data)).astype(int)
    unknown = sorted(set(values.tolist()) - {0, *LABELS.values()})
    if unknown:
        raise InputError(f"{lab.path}: label values {unknown} are not IMSCT classes {LABELS}")
    present = [n for n, i in LABELS.items() if i in values]
    if not present:
        raise InputError(f"{lab.path}: label map is empty; DICOM SEG needs at least one labelled voxel")
    files = _dicom_files(source)
    ref = read_series(files)
    # The label map may be on the NIfTI's voxel order; the SEG's frames must be the series' slices
    # (pydicom-seg references, for each frame along the third axis, the instance lying on it).
    try:
        on_ref = reorient_like(lab, ref)
    except InputError:
        canonical = [nib.as_closest_canonical(nib.Nifti1Image(np.zeros(v.shape, np.uint8), v.affine)) for v in (lab, ref)]
        raise InputError(f"{lab.path}: label map grid {lab.shape} does not match the DICOM series {ref.path} "
                         f"{ref.shape} (in RAS order: {grid_difference(*canonical)})") from None
    seg_img = volume_to_sitk(Volume(np.round(on_ref.data).astype(np.uint16), ref.affine, lab.path), sitk.sitkUInt16)
    writer = pydicom_seg.MultiClassWriter(template=seg_template(present, algorithm=algorithm),
                                          inplane_cropping=False, skip_empty_slices=False, skip_missing_segment=False)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    dcm = writer.write(seg_img, sources)
    out = Path(out_path)
    replace_atomically(out, dcm.save_as)
    return out


def scaled_cielab_to_rgb(lab) -> tuple[int, int, int]:
    """DICOM scaled CIELab (0..65535, D65) to 8-bit sRGB: the inverse of the encoding DICOM SEG
    writers (dcmqi, pydicom-seg) use for RecommendedDisplayCIELabValue."""
    L = float(lab[0]) * 100 / 65535
    a = float(lab[1]) * 255 / 65535 - 128
    b = float(lab[2]) * 255 / 65535 - 128
    fy = (L + 16) / 116
    f = (fy + a / 500, fy, fy - b / 200)
    xyz = [(t**3 if t**3 > 0.008856 else (t - 16 / 116) / 7.787) * w for t, w in zip(f, (95.047, 100.0, 108.883))]
    x, y, z = (v / 100 for v in xyz)
    lin = (3.2404542 * x - 1.5371385 * y - 0.4985314 * z,
           -0.9692660 * x + 1.8760108 * y + 0.0415560 * z,
           0.0556434 * x - 0.2040259 * y + 1.0572252 * z)
    srgb = [1.055 * c ** (1 / 2.4) - 0.055 if c > 0.0031308 else 12.92 * c for c in (max(v, 0.0) for v in lin)]
    return tuple(int(round(min(max(c, 0.0), 1.0) * 255)) for c in srgb)  # type: ignore[return-value]


@dataclass
class Segment:
    number: int
    label: str
    rgb: tuple[int, int, int]


def seg_segments(path: str | os.PathLike) -> list[Segment]:
    """Segments declared in a DICOM SEG file (number, label, display colour as RGB)."""
    ds = pydicom.dcmread(path)
    out = []
    for item in ds.SegmentSequence:
        lab = getattr(item, "RecommendedDisplayCIELabValue", None)
        rgb = scaled_cielab_to_rgb(lab) if lab is not None else (0, 0, 0)
        out.append(Segment(int(item.SegmentNumber), str(item.SegmentLabel), rgb))
    return out


def read_seg(path: str | os.PathLike) -> Volume:
    """Read a DICOM SEG file back as a label map Volume (segment number = voxel value)."""
    import SimpleITK as sitk
    import pydicom_seg

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise InputError(f"{path}: not a readable DICOM file ({exc})") from None
    if str(getattr(ds, "SOPClassUID", "")) != SEG_STORAGE:
        raise InputError(f"{path}: not a DICOM SEG (SOP class {getattr(ds, 'SOPClassUID', '?')})")
    img = pydicom_seg.MultiClassReader().read(ds).image
    data = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
    direction = np.array(img.GetDirection()).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.array(img.GetSpacing())[None, :]
    lps[:3, 3] = img.GetOrigin()
    return Volume(data=data.astype(np.uint8), affine=LPS @ lps, path=str(path))


if __name__ == "__main__":  # python -m imsct.dicom: the same as ``imsct dicom``
    import sys

    from .cli import main

    sys.exit(main(["dicom", *sys.argv[1:]]))
