"""Acquisition centres as transforms of generated phantoms: a domain shift for continual learning.

Centre A is the default generator. Another centre is a :class:`CentreShift` applied to a generated
:class:`~imsct.phantoms.Case`, the way a different scanner and protocol changes the same anatomy:

* resolution: both series are resampled onto a grid with a fixed in-plane voxel size (centre B:
  1.5 mm, coarser than any centre-A acquisition, which draws 0.3-1.3 mm) and the same field of
  view, orientation and slice thickness, after a Gaussian anti-aliasing blur;
* intensity profile: a different contrast mapping, ``I' = gain * p99 * (I / p99) ** gamma`` with
  its own gamma per contrast (centre B: T2w 0.45, which lifts cord, tumour and edema towards the
  CSF and cavity and so compresses their contrast; Gd-T1w 2.0, which darkens non-enhancing tissue
  and exaggerates enhancement), gain 0.8;
* noise: extra Rician noise of standard deviation ``noise * gain * p99`` (centre B: 6 % of the
  99th percentile), on top of the generator's own.

Labels (the four class masks, the stage-1 cylinder and the cord mask) are resampled onto the same
new T2w grid (per-class partial volume, majority class), so they stay aligned with the images.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from ..geometry import resample, to_working
from ..io import voxel_volume_mm3
from . import Case, generate_case, write_case
from .render import nifti


@dataclass(frozen=True)
class CentreShift:
    name: str
    inplane_mm: float  # in-plane voxel size of both series after the shift
    gamma_t2: float
    gamma_t1: float
    noise: float  # extra Rician noise, standard deviation relative to the image's 99th percentile
    gain: float = 1.0


CENTRE_A = CentreShift("A", inplane_mm=0.0, gamma_t2=1.0, gamma_t1=1.0, noise=0.0)  # identity
CENTRE_B = CentreShift("B", inplane_mm=1.5, gamma_t2=0.45, gamma_t1=2.0, noise=0.06, gain=0.8)
CENTRES = {"A": CENTRE_A, "B": CENTRE_B}


def shifted_grid(shape, affine: np.ndarray, inplane_mm: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """Grid with the same field of view, orientation and slice axis, but ``inplane_mm`` voxels on
    the two in-plane axes (the slice axis is the one with the largest spacing)."""
    affine = np.asarray(affine, float)
    sizes = np.sqrt((affine[:3, :3] ** 2).sum(0))
    slice_axis = int(np.argmax(sizes))
    new_sizes = np.array([sizes[a] if a == slice_axis else inplane_mm for a in range(3)])
    n = np.asarray(shape[:3], float)
    new_n = np.maximum(1, np.round(n * sizes / new_sizes)).astype(int)
    m = affine[:3, :3] / sizes * new_sizes
    centre = affine[:3, :3] @ ((n - 1) / 2) + affine[:3, 3]
    out = np.eye(4)
    out[:3, :3] = m
    out[:3, 3] = centre - m @ ((new_n - 1) / 2)
    return tuple(int(v) for v in new_n), out


def _resample_image(img: nib.Nifti1Image, inplane_mm: float) -> tuple[np.ndarray, np.ndarray]:
    data = np.asarray(img.dataobj, np.float32)
    if inplane_mm <= 0:
        return data, img.affine
    shape, aff = shifted_grid(data.shape, img.affine, inplane_mm)
    factor = np.asarray(data.shape) / np.asarray(shape)
    sigma = np.sqrt(np.maximum(factor**2 - 1, 0)) / 2.355  # anti-aliasing before downsampling
    if np.any(sigma > 0):
        data = ndimage.gaussian_filter(data, sigma)
    return resample(data, img.affine, shape, aff).numpy(), aff


def _intensity(data: np.ndarray, gamma: float, noise: float, gain: float, rng: np.random.Generator) -> np.ndarray:
    p99 = float(np.percentile(data, 99)) or 1.0
    out = p99 * np.clip(data / p99, 0, None) ** gamma * gain
    if noise > 0:
        s = noise * p99 * gain
        out = np.sqrt((out + rng.normal(0, s, out.shape)) ** 2 + rng.normal(0, s, out.shape) ** 2)
    return np.clip(out, 0, 32000).round().astype(np.int16)


def apply_centre(case: Case, shift: CentreShift, seed: int = 0) -> Case:
    """The same subject as acquired at centre ``shift`` (deterministic in ``seed`` and the case)."""
    rng = np.random.default_rng([int(seed), int(case.info.get("index", 0)), 7])
    t2, aff2 = _resample_image(case.t2, shift.inplane_mm)
    t1, aff1 = _resample_image(case.t1, shift.inplane_mm)
    t2 = _intensity(t2, shift.gamma_t2, shift.noise, shift.gain, rng)
    t1 = _intensity(t1, shift.gamma_t1, shift.noise, shift.gain, rng)
    labels = {}
    for suffix, img in case.labels.items():
        lab = np.asarray(img.dataobj).astype(np.uint8)
        if shift.inplane_mm > 0:
            lab = to_working(lab, img.affine, t2.shape, aff2, label=True)
        labels[suffix] = nifti(lab.astype(np.uint8), aff2)
    vox = voxel_volume_mm3(aff2)
    info = dict(case.info)
    info.update({
        "centre": shift.name, "centre_shift": asdict(shift), "t2_shape": list(t2.shape), "t1_shape": list(t1.shape), "storage": "int16",
        "t2_voxel_mm": [round(float(s), 4) for s in np.sqrt((aff2[:3, :3] ** 2).sum(0))],
    })
    if "volumes_mm3" in info:
        from ..labels import SEG_SUFFIXES

        info["volumes_mm3"] = {k: float(np.asarray(labels[s].dataobj).sum() * vox) for k, s in SEG_SUFFIXES.items() if s in labels}
    return replace(case, t2=nifti(t2, aff2), t1=nifti(t1, aff1), labels=labels, info=info)


def generate_centre_dataset(out: str | Path, cases: int, seed: int, centre: str = "B", start: int = 0) -> list[dict]:
    """Write ``cases`` subjects of ``centre`` (BIDS, as :func:`imsct.phantoms.generate_dataset`)."""
    shift = CENTRES[centre]
    infos = []
    for i in range(start, start + cases):
        case = apply_centre(generate_case(seed, i), shift, seed)
        write_case(case, out)
        infos.append(case.info)
    return infos


__all__ = ["CentreShift", "CENTRE_A", "CENTRE_B", "CENTRES", "apply_centre", "shifted_grid", "generate_centre_dataset"]
