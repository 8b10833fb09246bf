"""Realistic two-contrast phantoms of intramedullary spinal cord tumours, in a BIDS layout.

``python -m imsct.phantoms --out DIR --cases N --seed S`` writes, per subject ``sub-XXX``::

    DIR/sub-XXX/anat/sub-XXX_T2w.nii.gz, sub-XXX_T1w.nii.gz
    DIR/derivatives/labels/sub-XXX/anat/sub-XXX_T2w_seg-{tumor,edema,cavity,whole-tumor}.nii.gz
    DIR/derivatives/labels/sub-XXX/anat/sub-XXX_T2w_sc-mask.nii.gz   (30 mm cylinder, stage-1 target)
    DIR/derivatives/labels/sub-XXX/anat/sub-XXX_T2w_seg-cord.nii.gz  (tight cord mask)
    DIR/derivatives/labels/sub-XXX/anat/sub-XXX_phantom.json         (truth: type, lesions, levels)
    DIR/participants.tsv

Each subject is drawn from ``numpy.random.default_rng([seed, index])``: the same seed and index give
the same files whatever the number of cases.

Options (``imsct phantoms --help``): ``--followup YEARS`` writes two BIDS sessions per subject
(``sub-XXX/ses-01/anat``, ``ses-02/anat``; visit 1 has the images of the plain case) with lesions
grown, the patient moved and a new grid at visit 2, dates in sidecar JSONs and
``sub-XXX_sessions.tsv`` (:func:`generate_followup`); ``--misalign-t1 MM DEG`` renders the T1w of
a patient who moved between series while its header does not know (:func:`generate_case`). Their
draws come from separate streams, so the plain files do not change.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ..io import voxel_volume_mm3
from ..labels import CORD_BOX_SUFFIX, CORD_SUFFIX, DISC_LABELS_SUFFIX, DISCS_SUFFIX, LABELS, SEG_SUFFIXES
from ..levels import disc_label_of
from .anatomy import CORD, DISC, NUCLEUS, TISSUES, PhantomSpec, grown, healthy_version, lesion_volumes, random_spec
from .render import (ACQUISITIONS, ORIENTATIONS, STORAGES, Acquisition, Appearance, apply_texture, corrupt_float, encode,
                     label_map, nifti, random_acquisition, random_appearance, render_labels_and_tissue, texture_fields)

__all__ = ["generate_case", "generate_followup", "generate_dataset", "write_case", "rigid_motion", "is_healthy",
           "PhantomSpec", "Acquisition", "GENERATOR_VERSION", "ACQUISITIONS", "STORAGES", "GM_SUFFIX"]

GENERATOR_VERSION = "2.0"
GM_SUFFIX = "_seg-gm"  # optional grey-matter label (gm_mask=True)
DEFAULT_HEALTHY_FRACTION = 0.25
DEFAULT_RANDOM_INTENSITY_FRACTION = 0.2


# Independent random streams (third seed word) so that optional features never shift the draws
# of the base case: same seed and index give the same base files with or without them.
MISALIGN_STREAM = 7
FOLLOWUP_STREAM = 2
HEALTHY_STREAM = 3  # v2: which subjects are healthy
APPEARANCE_STREAM = 5  # v2: intensities, texture, gamma, storage


def is_healthy(seed: int, index: int, healthy_fraction: float = DEFAULT_HEALTHY_FRACTION) -> bool:
    """Whether subject ``(seed, index)`` is healthy (no lesion) at ``healthy_fraction``: one draw
    from its own stream, so the answer needs no rendering and a subject stays healthy as the
    fraction grows."""
    if healthy_fraction <= 0:
        return False
    return bool(np.random.default_rng([int(seed), int(index), HEALTHY_STREAM]).random() < healthy_fraction)


def subject_appearance(seed: int, index: int, random_intensity_fraction: float = DEFAULT_RANDOM_INTENSITY_FRACTION,
                       storage: str = "mixed") -> Appearance:
    """The subject's intensities, texture, gamma and storage (drawn without rendering)."""
    return random_appearance(np.random.default_rng([int(seed), int(index), APPEARANCE_STREAM]), random_intensity_fraction, storage)


@dataclass
class Case:
    subject: str
    t2: nib.Nifti1Image
    t1: nib.Nifti1Image
    labels: dict[str, nib.Nifti1Image]
    info: dict
    session: str | None = None  # BIDS session (ses-01, ...) of a longitudinal subject
    sidecar: dict | None = None  # BIDS sidecar JSON written beside both images (AcquisitionDateTime)

    @property
    def prefix(self) -> str:
        return f"{self.subject}_{self.session}" if self.session else self.subject


def rigid_motion(rng: np.random.Generator, mm: float, deg: float, centre: np.ndarray) -> dict:
    """A rigid world motion: rotation of ``deg`` degrees about a random axis through ``centre``,
    then a translation of ``mm`` in a random direction. ``motion_ras`` maps a point of the unmoved
    anatomy to where it is after the motion; ``correction_ras`` (its inverse) is what a
    registration of the moved image onto the unmoved one must return as ``moving_to_fixed``."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    t = np.deg2rad(deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k  # Rodrigues
    c = np.asarray(centre, np.float64)
    m = np.eye(4)
    m[:3, :3] = rot
    m[:3, 3] = c - rot @ c + mm * direction
    return {
        "translation_mm": float(mm), "rotation_deg": float(deg), "axis": axis.round(6).tolist(),
        "direction": direction.round(6).tolist(), "centre_ras": c.round(4).tolist(),
        "motion_ras": m.tolist(), "correction_ras": np.linalg.inv(m).tolist(),
    }


def generate_case(
    seed: int, index: int, subject: str | None = None, max_voxels: int = 6_000_000,
    misalign_t1: tuple[float, float] | None = None, *, healthy_fraction: float = DEFAULT_HEALTHY_FRACTION,
    random_intensity_fraction: float = DEFAULT_RANDOM_INTENSITY_FRACTION, acquisition: str = "mixed",
    storage: str = "mixed", gm_mask: bool = False, disc_labels: bool = False,
) -> Case:
    """Draw and render one subject (deterministic in ``seed`` and ``index``).

    ``misalign_t1=(mm, deg)``: the patient moved between the two series. The T1w shows the anatomy
    moved by a rigid transform (a translation of ``mm`` and a rotation of ``deg`` about the T2w's
    field centre, directions drawn from ``[seed, index, MISALIGN_STREAM]``) while its header keeps
    the unmoved position. ``info["t1_motion"]`` holds the truth (see :func:`rigid_motion`). The
    other draws, and the T2w and labels, are those of the aligned case.

    v2 options: ``healthy_fraction`` (share of subjects without lesion, :func:`is_healthy`; 0 gives
    a lesion to every subject), ``random_intensity_fraction`` (share with fully random tissue
    intensities), ``acquisition`` (``mixed`` or one of :data:`ACQUISITIONS`), ``storage``
    (``mixed`` or one of :data:`STORAGES`), ``gm_mask`` (add the ``_seg-gm`` label),
    ``disc_labels`` (add ``_seg-discs``, the intervertebral disc tissue, and ``_label-discs``, one
    voxel per disc on the cord centreline with the disc's number in the Spinal Cord Toolbox's
    convention, 3 = C2/C3: the truth of the cord-and-levels network).
    """
    healthy = is_healthy(seed, index, healthy_fraction)
    rng, spec, acq = _draw_subject(seed, index, max_voxels, healthy=healthy, acquisition=acquisition)
    app = subject_appearance(seed, index, random_intensity_fraction, storage)
    t1_motion = None
    if misalign_t1 is not None:
        mrng = np.random.default_rng([int(seed), int(index), MISALIGN_STREAM])
        t1_motion = rigid_motion(mrng, float(misalign_t1[0]), float(misalign_t1[1]), acq.centre)
    sub = subject or f"sub-{index + 1:03d}"
    return _render_visit(spec, acq, rng, sub, seed, index, t1_motion=t1_motion, app=app, gm_mask=gm_mask,
                         disc_labels=disc_labels)


def _draw_subject(seed: int, index: int, max_voxels: int, healthy: bool = False,
                  acquisition: str = "mixed") -> tuple[np.random.Generator, PhantomSpec, Acquisition]:
    """The subject's anatomy and first acquisition, and the generator positioned after them. A
    healthy subject is the same anatomy with its lesions removed (the field is placed where the
    lesion would have been)."""
    rng = np.random.default_rng([int(seed), int(index)])
    spec = random_spec(rng)
    around = spec.lesions[0].z
    if healthy:
        spec = healthy_version(spec)
    acq = random_acquisition(rng, spec, around, max_voxels=max_voxels, kind=acquisition)
    return rng, spec, acq


def cord_tilt_in_field(spec: PhantomSpec, shape, affine: np.ndarray) -> float:
    """Largest angle (degrees) between the cord centreline and the image axis closest to world S,
    over the part of the centreline inside the field of view (0 if none)."""
    z = np.arange(-850.0, 130.0, 1.0)
    c = spec.centreline(z).astype(np.float64)
    ijk = (c - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    inside = np.all((ijk > -0.5) & (ijk < np.asarray(shape) - 0.5), axis=1)
    if inside.sum() < 2:
        return 0.0
    tang = np.gradient(c, axis=0)
    tang /= np.linalg.norm(tang, axis=1, keepdims=True)
    dirs = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    axis = dirs[:, int(np.argmax(np.abs(dirs[2])))]
    cosang = np.abs(tang[inside] @ axis)
    return float(np.degrees(np.arccos(np.clip(cosang.min(), -1, 1))))


def _render_visit(
    spec: PhantomSpec, acq: Acquisition, rng: np.random.Generator, sub: str, seed: int, index: int,
    motion: dict | None = None, t1_motion: dict | None = None, t1_own_grid: bool | None = None,
    volume_truth: bool = False, app: Appearance | None = None, gm_mask: bool = False, disc_labels: bool = False,
) -> Case:
    """Render one visit of ``spec`` on ``acq`` (T2w grid) and a T1w grid drawn from ``rng``.

    ``motion``: the patient's rigid motion in world (both series and the labels show the anatomy
    moved; headers are true). ``t1_motion``: an extra motion seen by the T1w only (its header does
    not know). ``t1_own_grid``: force the T1w grid choice (None: drawn, 60 % share the T2w grid).
    ``volume_truth``: add ``true_volumes_mm3`` (continuous anatomy), ``true_volumes_in_field_mm3``
    (the part inside the T2w's field) and ``soft_volumes_mm3`` (sum of the partial-volume
    fractions on the grid), which tell the label map's binarisation error apart from coverage.
    """
    app = app or random_appearance(np.random.default_rng([int(seed), int(index), APPEARANCE_STREAM]))
    shape, affine = acq.grid()
    to_anatomy = np.linalg.inv(np.asarray(motion["motion_ras"])) if motion else np.eye(4)
    t2_clean, t1_clean, fr = render_labels_and_tissue(spec, shape, to_anatomy @ affine, appearance=app)
    fields = texture_fields(shape, affine, app)
    t2_clean = apply_texture(t2_clean, fr["code"], fields, app.tex2)
    code1, fields1 = fr["code"], fields
    same_grid = rng.random() >= 0.4
    if t1_own_grid is not None:
        same_grid = not t1_own_grid
    if same_grid:
        acq1, shape1, affine1 = acq, shape, affine
    else:  # T1w acquired on its own grid, as often happens in practice
        acq1 = Acquisition(
            res_ip=float(rng.uniform(0.5, 1.1)), thickness=float(rng.uniform(2.5, 4.0)),
            fov_si=acq.fov_si * rng.uniform(0.85, 1.0), fov_ap=acq.fov_ap * rng.uniform(0.85, 1.0),
            n_slices=int(np.clip(round(acq.n_slices * acq.thickness / 3.0), 8, 30)),
            centre=acq.centre + rng.uniform(-6, 6, 3) * np.array([1, 1, 1]),
            axcodes=acq.axcodes if rng.random() < 0.5 else ("P", "I", "R"), tilt_deg=acq.tilt_deg,
        )
        shape1, affine1 = acq1.grid()
    if t1_motion is not None:
        t1_anatomy = np.linalg.inv(np.asarray(t1_motion["motion_ras"])) @ to_anatomy
        _, t1_clean, fr1 = render_labels_and_tissue(spec, shape1, t1_anatomy @ affine1, appearance=app)
        code1 = fr1["code"]
    elif not same_grid:
        _, t1_clean, fr1 = render_labels_and_tissue(spec, shape1, to_anatomy @ affine1, appearance=app)
        code1 = fr1["code"]
    if not same_grid:
        fields1 = texture_fields(shape1, affine1, app)
    t1_clean = apply_texture(t1_clean, code1, fields1, app.tex1)
    snr = float(rng.uniform(12, 35))
    srng = np.random.default_rng([int(seed), int(index), APPEARANCE_STREAM, 1 + int(motion is not None)])  # storage scaling
    t2 = corrupt_float(t2_clean, affine, rng, snr, gain=float(rng.uniform(400, 2000)), gamma=app.gamma2, ref=float(app.lut2[CORD]))
    t1 = corrupt_float(t1_clean, affine1, rng, snr * rng.uniform(0.8, 1.2), gain=float(rng.uniform(400, 2000)), gamma=app.gamma1,
                       ref=float(app.lut1[CORD]))
    lab = label_map(fr)
    masks = {
        "tumor": lab == 1, "edema": lab == 2, "cavity": lab == 3, "whole-tumor": lab > 0,
    }
    labels = {SEG_SUFFIXES[k]: nifti(v.astype(np.uint8), affine) for k, v in masks.items()}
    labels[CORD_BOX_SUFFIX] = nifti((fr["cylinder"] >= 0.5).astype(np.uint8), affine)
    labels[CORD_SUFFIX] = nifti((fr["cord"] >= 0.5).astype(np.uint8), affine)
    if gm_mask:
        labels[GM_SUFFIX] = nifti(((fr["gm"] >= 0.5) & (fr["cord"] >= 0.5)).astype(np.uint8), affine)
    discs = disc_truth(spec, shape, affine, np.linalg.inv(to_anatomy))
    if disc_labels:
        labels[DISCS_SUFFIX] = nifti(np.isin(fr["code"], (DISC, NUCLEUS)).astype(np.uint8), affine)
        points = np.zeros(shape, np.uint8)
        for d in discs:
            if d["in_field"]:
                points[tuple(d["voxel"])] = d["label"]
        labels[DISC_LABELS_SUFFIX] = nifti(points, affine)
    vox = voxel_volume_mm3(affine)
    info = {
        "participant_id": sub,
        "tumor_type": spec.tumour_type,
        "generator_version": GENERATOR_VERSION,
        "healthy": bool(spec.healthy),
        "seed": int(seed), "index": int(index),
        "n_tumors": len(spec.lesions),
        "has_edema": bool(masks["edema"].any()), "has_cavity": bool(masks["cavity"].any()),
        "volumes_mm3": {k: float(v.sum() * vox) for k, v in masks.items()},
        "t2_shape": list(shape), "t2_voxel_mm": [round(float(s), 4) for s in np.sqrt((affine[:3, :3] ** 2).sum(0))],
        "t2_axcodes": "".join(nib.aff2axcodes(affine)), "t1_same_grid": bool(same_grid),
        "t1_shape": list(shape1),
        "coverage": _coverage(spec, acq, to_anatomy),
        "lesions": [
            {"z_mm": les.z, "level": spec.level_at(les.z), "half_length_mm": les.half_length,
             "edema_mm": [les.edema_below, les.edema_above], "cavity_mm": [les.cavity_below, les.cavity_above],
             "enhancement": les.enhancement}
            for les in spec.lesions
        ],
        "vertebrae": [{"level": n, "z_top_mm": round(a, 2), "z_bottom_mm": round(b, 2)} for n, a, b in spec.levels],
        "discs": discs,
        "conus_z_mm": spec.conus_z,
        "acquisition": acq.kind, "plane": acq.plane, "storage": app.storage, "intensity_mode": app.mode,
        "gamma": [round(app.gamma2, 4), round(app.gamma1, 4)], "flow_voids": bool(spec.flow_voids > 0),
        "flexion_deg": round(float(spec.flexion_deg), 2),
        "cord_tilt_max_deg": round(cord_tilt_in_field(spec, shape, to_anatomy @ affine), 2),
        "tissue_means": {"t2": dict(zip(TISSUES, app.lut2.round(4).tolist())), "t1": dict(zip(TISSUES, app.lut1.round(4).tolist()))},
    }
    if volume_truth:
        soft = {k: float(fr[k].sum() * vox) for k in LABELS}
        soft["whole-tumor"] = sum(soft.values())
        info["true_volumes_mm3"] = lesion_volumes(spec)
        info["true_volumes_in_field_mm3"] = lesion_volumes(spec, field=(shape, to_anatomy @ affine))
        info["soft_volumes_mm3"] = soft
    if motion is not None:
        info["motion"] = motion
    if t1_motion is not None:
        info["t1_motion"] = t1_motion
    return Case(sub, encode(t2, affine, app.storage, srng), encode(t1, affine1, app.storage, srng), labels, info)


def generate_followup(
    seed: int, index: int, years: float, growth: float = 1.5, motion: tuple[float, float] = (5.0, 4.0),
    subject: str | None = None, max_voxels: int = 6_000_000, *,
    random_intensity_fraction: float = DEFAULT_RANDOM_INTENSITY_FRACTION, acquisition: str = "mixed",
    storage: str = "mixed", gm_mask: bool = False, disc_labels: bool = False,
) -> tuple[Case, Case]:
    """Two visits of one subject, ``years`` apart, as BIDS sessions ``ses-01`` and ``ses-02``.

    Visit 1 is :func:`generate_case` ``(seed, index)`` (same images). At visit 2 every lesion has
    grown (:func:`imsct.phantoms.anatomy.grown`, tumour volume x ``growth``), the patient lies
    moved by a rigid ``motion=(mm, deg)`` and the series is acquired on a new grid (resolution,
    slice thickness, field of view, centre and storage orientation redrawn). Draws for visit 2 come
    from ``[seed, index, FOLLOWUP_STREAM]``. Truth in each visit's info: ``true_volumes_mm3``
    (continuous anatomy), ``true_volumes_in_field_mm3``, ``soft_volumes_mm3`` (see
    :func:`_render_visit`), ``visit``, ``acquisition_datetime``; visit 2 also carries ``motion``
    (``correction_ras`` is the visit-2 to visit-1 world transform) and ``followup`` (growth
    factor, years, true volume ratios).

    A follow-up subject always has lesions (there is no healthy follow-up: growth needs a lesion),
    so there is no ``healthy_fraction`` here. Visit 1 is drawn like :func:`generate_case` with
    ``acquisition``; visit 2 is a 2D sagittal series whatever visit 1's kind (the follow-up
    protocol of a clinic).
    """
    if years <= 0:
        raise ValueError(f"years must be positive, not {years}")
    if growth <= 0:
        raise ValueError(f"growth must be positive, not {growth}")
    sub = subject or f"sub-{index + 1:03d}"
    rng1, spec, acq = _draw_subject(seed, index, max_voxels, acquisition=acquisition)
    app = subject_appearance(seed, index, random_intensity_fraction, storage)
    # generate_case's images (with healthy_fraction=0)
    v1 = _render_visit(spec, acq, rng1, sub, seed, index, volume_truth=True, app=app, gm_mask=gm_mask, disc_labels=disc_labels)
    rng = np.random.default_rng([int(seed), int(index), FOLLOWUP_STREAM])
    move = rigid_motion(rng, float(motion[0]), float(motion[1]), acq.centre)
    m = np.asarray(move["motion_ras"])
    thick = float(np.clip(acq.thickness * rng.uniform(0.8, 1.25), 1.5, 5.2))
    res = float(np.clip(acq.res_ip * rng.uniform(0.8, 1.25), 0.3, 1.3))
    fov_si, fov_ap = acq.fov_si * rng.uniform(0.9, 1.15), acq.fov_ap * rng.uniform(0.9, 1.1)
    n_sl = int(np.clip(round(acq.n_slices * acq.thickness / thick), 8, 40))
    if acq.plane == "axial" or acq.kind in ("iso3d", "crop"):  # visit 2: a clinical 2D sagittal series
        thick = float(rng.uniform(2.5, 4.0))
        n_sl = int(np.clip(round(max(acq.fov_rl, 30.0) / thick), 8, 40))
        fov_si, fov_ap = max(fov_si, 150.0), max(fov_ap, 110.0)
    n_vox = (fov_si / res) * (fov_ap / res) * n_sl
    if n_vox > max_voxels:
        f = np.sqrt(max_voxels / n_vox)
        fov_si, fov_ap = fov_si * f, fov_ap * f
    centre = m[:3, :3] @ acq.centre + m[:3, 3] + rng.uniform(-1, 1, 3) * np.array([2.0, 4.0, 0.1 * fov_si])
    acq2 = Acquisition(res, thick, fov_si, fov_ap, n_sl, centre, ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))],
                       float(rng.uniform(-6, 6)) if rng.random() < 0.3 else 0.0)
    day1 = np.datetime64("2019-01-07") + int(rng.integers(0, 1000))
    day2 = day1 + int(round(years * 365.25))
    spec2 = grown(spec, growth)
    v2 = _render_visit(spec2, acq2, rng, sub, seed, index, motion=move, t1_own_grid=False, volume_truth=True, app=app,
                       gm_mask=gm_mask, disc_labels=disc_labels)
    true1, true2 = v1.info["true_volumes_mm3"], v2.info["true_volumes_mm3"]
    elapsed = float((day2 - day1) / np.timedelta64(1, "D")) / 365.25
    for case, ses, day in ((v1, "ses-01", day1), (v2, "ses-02", day2)):
        stamp = f"{day}T09:30:00"
        case.session = ses
        case.sidecar = {"AcquisitionDateTime": stamp}
        case.info.update({"visit": ses, "acquisition_datetime": stamp})
    v2.info["followup"] = {
        "growth_factor": float(growth), "years": elapsed, "days": int((day2 - day1) / np.timedelta64(1, "D")),
        "true_volume_ratio": {k: (true2[k] / true1[k] if true1[k] > 0 else None) for k in true1},
    }
    return v1, v2


def disc_truth(spec: PhantomSpec, shape, affine: np.ndarray, to_world: np.ndarray) -> list[dict]:
    """Every intervertebral disc of ``spec`` as the Spinal Cord Toolbox labels it: its number
    (3 = C2/C3, :func:`imsct.levels.disc_label_of`), the world point of the cord centreline at the
    disc's mid-height (``to_world``: anatomy to world, the patient's motion), and that point's
    voxel on the grid ``(shape, affine)`` with whether it lies inside the field."""
    out = []
    inv = np.linalg.inv(affine)
    for (name, _, _), (top, bottom) in zip(spec.levels, spec.discs):
        p = spec.centreline(np.array([(top + bottom) / 2]))[0].astype(np.float64)
        world = to_world[:3, :3] @ p + to_world[:3, 3]
        ijk = np.rint(inv[:3, :3] @ world + inv[:3, 3]).astype(int)
        inside = bool(((ijk >= 0) & (ijk < np.asarray(shape[:3]))).all())
        out.append({"label": disc_label_of(name), "above": name, "world_mm": [round(float(v), 3) for v in world],
                    "voxel": [int(v) for v in ijk], "in_field": inside})
    return out


def _coverage(spec: PhantomSpec, acq: Acquisition, to_anatomy: np.ndarray | None = None) -> str:
    centre = acq.centre if to_anatomy is None else to_anatomy[:3, :3] @ acq.centre + to_anatomy[:3, 3]
    names = [spec.level_at(z) for z in (centre[2] + acq.fov_si / 2, centre[2] - acq.fov_si / 2)]
    return f"{names[0]}-{names[1]}"


def write_case(case: Case, out: str | Path) -> dict[str, Path]:
    """Write a case in BIDS (``sub-XXX/[ses-YY/]anat``; labels under ``derivatives/labels``)."""
    out = Path(out)
    rel = Path(case.subject, case.session) if case.session else Path(case.subject)
    anat = out / rel / "anat"
    lab = out / "derivatives" / "labels" / rel / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    lab.mkdir(parents=True, exist_ok=True)
    pre = case.prefix
    paths = {"t2": anat / f"{pre}_T2w.nii.gz", "t1": anat / f"{pre}_T1w.nii.gz"}
    nib.save(case.t2, paths["t2"])
    nib.save(case.t1, paths["t1"])
    if case.sidecar is not None:
        for key in ("t2", "t1"):
            Path(str(paths[key])[: -len(".nii.gz")] + ".json").write_text(json.dumps(case.sidecar, indent=1))
    for suffix, img in case.labels.items():
        p = lab / f"{pre}_T2w{suffix}.nii.gz"
        nib.save(img, p)
        paths[suffix] = p
    (lab / f"{pre}_phantom.json").write_text(json.dumps(case.info, indent=1))
    return paths


def write_sessions(cases: list[Case], out: str | Path) -> Path:
    """``sub-XXX/sub-XXX_sessions.tsv`` (session_id, acq_time) for the visits of one subject."""
    path = Path(out) / cases[0].subject / f"{cases[0].subject}_sessions.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t")
        w.writerow(["session_id", "acq_time"])
        for c in cases:
            w.writerow([c.session, (c.sidecar or {}).get("AcquisitionDateTime", "n/a")])
    return path


PARTICIPANT_COLUMNS = ["participant_id", "tumor_type", "n_tumors", "has_edema", "has_cavity", "coverage", "t2_axcodes", "t1_same_grid", "seed", "index",
                       "generator_version", "acquisition", "intensity_mode"]


def generate_dataset(
    out: str | Path, cases: int, seed: int, start: int = 0, progress: bool = False, max_voxels: int = 6_000_000,
    misalign_t1: tuple[float, float] | None = None, followup_years: float | None = None, growth: float = 1.5,
    motion: tuple[float, float] = (5.0, 4.0), *, healthy_fraction: float = DEFAULT_HEALTHY_FRACTION,
    random_intensity_fraction: float = DEFAULT_RANDOM_INTENSITY_FRACTION, acquisition: str = "mixed",
    storage: str = "mixed", gm_mask: bool = False, disc_labels: bool = False,
) -> list[dict]:
    """Write ``cases`` subjects (indices ``start`` .. ``start + cases - 1``) and participants.tsv.

    ``misalign_t1=(mm, deg)``: every T1w is rigidly misaligned (see :func:`generate_case`).
    ``followup_years``: every subject gets two sessions that many years apart (see
    :func:`generate_followup`, with ``growth`` and ``motion``) and a sessions.tsv; follow-up
    subjects always have lesions (``healthy_fraction`` is ignored). The v2 options are those of
    :func:`generate_case`; ``healthy_fraction=0`` gives every subject a lesion.
    """
    v2 = {"random_intensity_fraction": random_intensity_fraction, "acquisition": acquisition, "storage": storage,
          "gm_mask": gm_mask, "disc_labels": disc_labels}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    infos = []
    for i in range(start, start + cases):
        if followup_years is not None:
            visits = generate_followup(seed, i, followup_years, growth=growth, motion=motion, max_voxels=max_voxels, **v2)
            for visit in visits:
                write_case(visit, out)
            write_sessions(list(visits), out)
            case = visits[0]
        else:
            case = generate_case(seed, i, max_voxels=max_voxels, misalign_t1=misalign_t1, healthy_fraction=healthy_fraction, **v2)
            write_case(case, out)
        infos.append(case.info)
        if progress:
            extra = f", follow-up {followup_years} y" if followup_years is not None else ""
            print(f"[{i - start + 1}/{cases}] {case.subject}: {case.info['tumor_type']}, T2w {case.info['t2_shape']} {case.info['t2_axcodes']}{extra}", flush=True)
    with open(out / "participants.tsv", "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t")
        w.writerow(PARTICIPANT_COLUMNS)
        for info in infos:
            w.writerow([info.get(c, "n/a") for c in PARTICIPANT_COLUMNS])
    (out / "dataset_description.json").write_text(json.dumps({"Name": "IMSCT phantoms", "BIDSVersion": "1.8.0", "DatasetType": "raw", "GeneratedBy": [{"Name": "imsct.phantoms", "Version": GENERATOR_VERSION, "Description": f"seed {seed}"}]}, indent=1))
    return infos
