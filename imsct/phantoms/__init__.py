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
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ..io import voxel_volume_mm3
from ..labels import CORD_BOX_SUFFIX, CORD_SUFFIX, SEG_SUFFIXES
from .anatomy import PhantomSpec, random_spec
from .render import Acquisition, corrupt, label_map, nifti, random_acquisition, render_labels_and_tissue

__all__ = ["generate_case", "generate_dataset", "PhantomSpec", "Acquisition"]


@dataclass
class Case:
    subject: str
    t2: nib.Nifti1Image
    t1: nib.Nifti1Image
    labels: dict[str, nib.Nifti1Image]
    info: dict


def generate_case(seed: int, index: int, subject: str | None = None, max_voxels: int = 6_000_000) -> Case:
    """Draw and render one subject (deterministic in ``seed`` and ``index``)."""
    rng = np.random.default_rng([int(seed), int(index)])
    spec = random_spec(rng)
    lesion = spec.lesions[0]
    acq = random_acquisition(rng, spec, lesion.z, max_voxels=max_voxels)
    shape, affine = acq.grid()
    t2_clean, t1_clean, fr = render_labels_and_tissue(spec, shape, affine)
    same_grid = rng.random() >= 0.4
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
        _, t1_clean, _ = render_labels_and_tissue(spec, shape1, affine1)
    snr = float(rng.uniform(12, 35))
    t2 = corrupt(t2_clean, affine, rng, snr, gain=float(rng.uniform(400, 2000)))
    t1 = corrupt(t1_clean, affine1, rng, snr * rng.uniform(0.8, 1.2), gain=float(rng.uniform(400, 2000)))
    lab = label_map(fr)
    masks = {
        "tumor": lab == 1, "edema": lab == 2, "cavity": lab == 3, "whole-tumor": lab > 0,
    }
    labels = {SEG_SUFFIXES[k]: nifti(v.astype(np.uint8), affine) for k, v in masks.items()}
    labels[CORD_BOX_SUFFIX] = nifti((fr["cylinder"] >= 0.5).astype(np.uint8), affine)
    labels[CORD_SUFFIX] = nifti((fr["cord"] >= 0.5).astype(np.uint8), affine)
    vox = voxel_volume_mm3(affine)
    sub = subject or f"sub-{index + 1:03d}"
    info = {
        "participant_id": sub,
        "tumor_type": spec.tumour_type,
        "seed": int(seed), "index": int(index),
        "n_tumors": len(spec.lesions),
        "has_edema": bool(masks["edema"].any()), "has_cavity": bool(masks["cavity"].any()),
        "volumes_mm3": {k: float(v.sum() * vox) for k, v in masks.items()},
        "t2_shape": list(shape), "t2_voxel_mm": [round(float(s), 4) for s in np.sqrt((affine[:3, :3] ** 2).sum(0))],
        "t2_axcodes": "".join(nib.aff2axcodes(affine)), "t1_same_grid": bool(same_grid),
        "t1_shape": list(shape1),
        "coverage": _coverage(spec, acq),
        "lesions": [
            {"z_mm": les.z, "level": spec.level_at(les.z), "half_length_mm": les.half_length,
             "edema_mm": [les.edema_below, les.edema_above], "cavity_mm": [les.cavity_below, les.cavity_above],
             "enhancement": les.enhancement}
            for les in spec.lesions
        ],
        "vertebrae": [{"level": n, "z_top_mm": round(a, 2), "z_bottom_mm": round(b, 2)} for n, a, b in spec.levels],
        "conus_z_mm": spec.conus_z,
    }
    return Case(sub, nifti(t2, affine), nifti(t1, affine1), labels, info)


def _coverage(spec: PhantomSpec, acq: Acquisition) -> str:
    names = [spec.level_at(z) for z in (acq.centre[2] + acq.fov_si / 2, acq.centre[2] - acq.fov_si / 2)]
    return f"{names[0]}-{names[1]}"


def write_case(case: Case, out: str | Path) -> dict[str, Path]:
    out = Path(out)
    anat = out / case.subject / "anat"
    lab = out / "derivatives" / "labels" / case.subject / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    lab.mkdir(parents=True, exist_ok=True)
    paths = {"t2": anat / f"{case.subject}_T2w.nii.gz", "t1": anat / f"{case.subject}_T1w.nii.gz"}
    nib.save(case.t2, paths["t2"])
    nib.save(case.t1, paths["t1"])
    for suffix, img in case.labels.items():
        p = lab / f"{case.subject}_T2w{suffix}.nii.gz"
        nib.save(img, p)
        paths[suffix] = p
    (lab / f"{case.subject}_phantom.json").write_text(json.dumps(case.info, indent=1))
    return paths


PARTICIPANT_COLUMNS = ["participant_id", "tumor_type", "n_tumors", "has_edema", "has_cavity", "coverage", "t2_axcodes", "t1_same_grid", "seed", "index"]


def generate_dataset(out: str | Path, cases: int, seed: int, start: int = 0, progress: bool = False) -> list[dict]:
    """Write ``cases`` subjects (indices ``start`` .. ``start + cases - 1``) and participants.tsv."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    infos = []
    for i in range(start, start + cases):
        case = generate_case(seed, i)
        write_case(case, out)
        infos.append(case.info)
        if progress:
            print(f"[{i - start + 1}/{cases}] {case.subject}: {case.info['tumor_type']}, T2w {case.info['t2_shape']} {case.info['t2_axcodes']}", flush=True)
    with open(out / "participants.tsv", "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t")
        w.writerow(PARTICIPANT_COLUMNS)
        for info in infos:
            w.writerow([info[c] for c in PARTICIPANT_COLUMNS])
    (out / "dataset_description.json").write_text(json.dumps({"Name": "IMSCT phantoms", "BIDSVersion": "1.8.0", "DatasetType": "raw", "GeneratedBy": [{"Name": "imsct.phantoms", "Description": f"seed {seed}"}]}, indent=1))
    return infos
