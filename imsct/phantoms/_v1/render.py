"""Render a :class:`PhantomSpec` as sagittal T2w and Gd-T1w MRI with labels.

Tissue is evaluated on a supersampled copy of the acquisition grid and averaged per voxel, so
images carry partial volume; labels are the majority class of each voxel. Contrasts follow the
clinical appearance (T2w: CSF and cavity bright, edema moderately bright, tumour iso- to
hyperintense; Gd-T1w: CSF and cavity dark, enhancing tumour bright), then a smooth bias field and
Rician noise are applied.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np

from .anatomy import CAVITY, CORD, EDEMA, TISSUES, TUMOR, PhantomSpec, classify

# Mean intensity of each tissue (order of anatomy.TISSUES), arbitrary units.
T2_LUT = np.array([0.0, 0.78, 0.22, 0.33, 0.45, 0.66, 0.38, 0.08, 1.00, 0.40, 0.68, 0.60, 0.97], np.float32)
T1_LUT = np.array([0.0, 0.95, 0.40, 0.45, 0.62, 0.33, 0.55, 0.10, 0.10, 0.48, 0.50, 0.40, 0.12], np.float32)

ORIENTATIONS = [("P", "I", "R"), ("A", "S", "R"), ("S", "A", "R"), ("R", "A", "S"), ("L", "P", "S"), ("P", "I", "L"), ("I", "P", "L"), ("R", "P", "I")]
_WORLD = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}


@dataclass
class Acquisition:
    """A sagittal acquisition: in-plane (SI, AP) resolution, slice (RL) thickness, field of view,
    storage orientation and an optional small oblique tilt."""

    res_ip: float
    thickness: float
    fov_si: float
    fov_ap: float
    n_slices: int
    centre: np.ndarray
    axcodes: tuple[str, str, str]
    tilt_deg: float = 0.0

    def grid(self) -> tuple[tuple[int, int, int], np.ndarray]:
        """Shape and affine of the stored image."""
        sizes = {2: self.res_ip, 1: self.res_ip, 0: self.thickness}  # world axis -> spacing
        counts = {2: int(round(self.fov_si / self.res_ip)), 1: int(round(self.fov_ap / self.res_ip)), 0: self.n_slices}
        t = np.deg2rad(self.tilt_deg)  # rotation about the RL axis (sagittal oblique)
        rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
        direc = np.zeros((3, 3))
        shape = []
        for col, code in enumerate(self.axcodes):
            w, sign = _WORLD[code]
            direc[w, col] = sign * sizes[w]
            shape.append(counts[w])
        m = rot @ direc
        affine = np.eye(4)
        affine[:3, :3] = m
        affine[:3, 3] = self.centre - m @ ((np.array(shape) - 1) / 2.0)
        return tuple(shape), affine  # type: ignore[return-value]


def random_acquisition(rng: np.random.Generator, spec: PhantomSpec, around_z: float, max_voxels: int = 6_000_000) -> Acquisition:
    res = float(rng.uniform(0.3, 1.3))
    thick = float(rng.uniform(1.5, 5.2))
    want_si = float(rng.choice([rng.uniform(150, 260), rng.uniform(250, 420), rng.uniform(380, 500)], p=[0.45, 0.4, 0.15]))
    fov_si = min(want_si, 640 * res)
    fov_ap = min(float(rng.uniform(110, 200)), 640 * res, fov_si)
    n_sl = int(np.clip(round(rng.uniform(34, 70) / thick), 8, 40))
    n_ip = (fov_si / res) * (fov_ap / res)
    if n_ip * n_sl > max_voxels:  # keep matrices realistic: shrink the in-plane field
        f = np.sqrt(max_voxels / (n_ip * n_sl))
        fov_si, fov_ap = fov_si * f, fov_ap * f
    zc = float(np.clip(around_z + rng.uniform(-0.2, 0.2) * fov_si, -740 + fov_si / 2, 40 - fov_si / 2))
    centre = spec.centreline(np.array([zc]))[0].astype(np.float64)
    centre[1] += rng.uniform(-0.1, 0.15) * fov_ap
    centre[0] += rng.uniform(-3, 3)
    axcodes = ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))]
    tilt = float(rng.uniform(-8, 8)) if rng.random() < 0.3 else 0.0
    return Acquisition(res, thick, fov_si, fov_ap, n_sl, centre, axcodes, tilt)


def _supersample_factors(affine: np.ndarray, target=(0.9, 0.9, 1.8)) -> tuple[int, int, int]:
    sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    thick_axis = int(np.argmax(sizes))
    return tuple(int(np.ceil(s / (target[2] if a == thick_axis else target[0]))) for a, s in enumerate(sizes))  # type: ignore


def render_labels_and_tissue(spec: PhantomSpec, shape, affine, chunk_points: int = 3_000_000):
    """Per-voxel tissue fractions (partial volume) on a grid.

    Returns ``t2, t1`` noiseless images and a dict of label fractions (tumor, edema, cavity, cord,
    cylinder) on the grid.
    """
    f = _supersample_factors(affine)
    nsub = f[0] * f[1] * f[2]
    offs = [((np.arange(fi) + 0.5) / fi - 0.5) for fi in f]
    so = np.stack(np.meshgrid(*offs, indexing="ij"), -1).reshape(-1, 3)  # (nsub, 3)
    shape = tuple(int(s) for s in shape)
    t2 = np.zeros(shape, np.float32)
    t1 = np.zeros(shape, np.float32)
    fr = {k: np.zeros(shape, np.float32) for k in ("tumor", "edema", "cavity", "cord", "cylinder")}
    plane = shape[1] * shape[2]
    rows = max(1, chunk_points // (plane * nsub))
    j, k = np.meshgrid(np.arange(shape[1], dtype=np.float32), np.arange(shape[2], dtype=np.float32), indexing="ij")
    m = affine[:3, :3].astype(np.float32)
    t = affine[:3, 3].astype(np.float32)
    lut2 = T2_LUT * spec.intensity_jitter.get("t2", 1.0)
    lut1 = T1_LUT * spec.intensity_jitter.get("t1", 1.0)
    enh = np.array([les.enhancement for les in spec.lesions] or [0.0], np.float32)
    het = np.array([les.heterogeneity for les in spec.lesions] or [0.0], np.float32)
    for start in range(0, shape[0], rows):
        i = np.arange(start, min(shape[0], start + rows), dtype=np.float32)
        n = i.size
        idx = np.stack(np.broadcast_arrays(i[:, None, None], j[None], k[None]), -1).reshape(-1, 1, 3)
        pts = (idx + so[None].astype(np.float32)).reshape(-1, 3) @ m.T + t
        code, tex, cyl = classify(spec, pts[:, 0], pts[:, 1], pts[:, 2])
        v2 = lut2[code]
        v1 = lut1[code]
        tum = code == TUMOR
        if tum.any():
            # the tumour's texture drives heterogeneity; enhancement of the (first) lesion type
            e, h = float(enh.max()), float(het.max())
            v2[tum] *= 1.0 + 0.15 * h * tex[tum]
            gain = 0.48 + e * (0.85 + 0.35 * h * tex[tum]) if e > 0 else 0.5 + 0.05 * tex[tum]
            if 0 < e < 0.6:  # partial enhancement: only part of the tumour takes contrast
                gain = np.where(tex[tum] > 0.3, gain, 0.5 + 0.05 * tex[tum])
            v1[tum] = gain
        sl = slice(start, start + n)
        t2[sl] = v2.reshape(n, plane, -1).mean(-1).reshape(n, shape[1], shape[2])
        t1[sl] = v1.reshape(n, plane, -1).mean(-1).reshape(n, shape[1], shape[2])
        for key, val in (("tumor", tum), ("edema", code == EDEMA), ("cavity", code == CAVITY),
                         ("cord", (code >= CORD)), ("cylinder", cyl)):
            fr[key][sl] = val.reshape(n, plane, -1).mean(-1).reshape(n, shape[1], shape[2])
    return t2, t1, fr


def label_map(fr: dict[str, np.ndarray]) -> np.ndarray:
    """Exclusive map (0 background, 1 tumour, 2 edema, 3 cavity) from partial-volume fractions."""
    stack = np.stack([1.0 - fr["tumor"] - fr["edema"] - fr["cavity"], fr["tumor"], fr["edema"], fr["cavity"]])
    return stack.argmax(axis=0).astype(np.uint8)


def corrupt(image: np.ndarray, affine: np.ndarray, rng: np.random.Generator, snr: float, gain: float) -> np.ndarray:
    """Smooth multiplicative bias field (posterior coil sensitivity) and Rician noise."""
    shape = image.shape
    ii = [np.linspace(-1, 1, s, dtype=np.float32) for s in shape]
    grid = np.meshgrid(*ii, indexing="ij", sparse=True)
    field = np.zeros(shape, np.float32)
    for _ in range(3):
        c = rng.uniform(-0.15, 0.15, 3)
        fr = rng.uniform(0.3, 1.2, 3)
        field = field + c[0] * np.cos(np.pi * fr[0] * grid[0]) + c[1] * np.cos(np.pi * fr[1] * grid[1]) + c[2] * np.cos(np.pi * fr[2] * grid[2])
    img = image * np.exp(field)
    sigma = 0.42 / snr  # relative to the cord's T2 intensity
    noisy = np.sqrt((img + rng.normal(0, sigma, shape).astype(np.float32)) ** 2 + rng.normal(0, sigma, shape).astype(np.float32) ** 2)
    return np.clip(noisy * gain, 0, 32000).round().astype(np.int16)


def tissue_names() -> tuple[str, ...]:
    return TISSUES


def nifti(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img
