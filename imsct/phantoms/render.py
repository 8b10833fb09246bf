"""Render a :class:`PhantomSpec` as T2w and Gd-T1w MRI with labels (generator v2).

Tissue is evaluated at every voxel centre; voxels on a tissue boundary (or the stage-1 cylinder's)
are evaluated again on a supersampled copy and averaged, so images carry partial volume where it
matters at a fraction of the cost; labels are the majority class of each voxel.

Appearance (:class:`Appearance`, SynthSeg-style domain randomisation, Billot et al. 2023): each
subject draws its own tissue means. In the "paper" share they are drawn in a wide range around
each contrast's clinical appearance while the lesion rules of Lemay et al. 2021 hold (T2w: CSF
and cavity bright, edema moderately bright, tumour iso- to hyperintense; Gd-T1w: CSF and cavity
dark, enhancement by tumour type). In the "random" share every tissue's mean is independent and
uniform, so no intensity ordering can be learned. Then intra-tissue texture (smooth multiplicative
random fields at several scales, striation in muscle, marrow texture in bone), a smooth bias
field, random gamma, Rician noise, and storage as int16, int16 with scl_slope, uint8 or float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import nibabel as nib
import numpy as np

from . import anatomy as A
from .anatomy import CAVITY, CORD, CORD_CODES, EDEMA, GM, TISSUES, TUMOR, PhantomSpec, classify

N_TISSUES = len(TISSUES)


def _lut(values: dict[str, float]) -> np.ndarray:
    out = np.zeros(N_TISSUES, np.float32)
    for k, v in values.items():
        out[TISSUES.index(k)] = v
    return out


# Clinical mean intensity of each tissue, arbitrary units (v1's values for the v1 tissues).
T2_LUT = _lut({"air": 0.0, "fat": 0.78, "muscle": 0.22, "organ": 0.33, "body": 0.45, "disc": 0.30, "posterior": 0.38,
               "ligament": 0.08, "csf": 1.00, "cord": 0.40, "tumor": 0.68, "edema": 0.60, "cavity": 0.97, "gm": 0.42,
               "nucleus": 0.80, "endplate": 0.07, "epidural_fat": 0.78, "brainstem": 0.42, "cerebellum": 0.52,
               "nerve": 0.40, "flow_void": 0.30})
T1_LUT = _lut({"air": 0.0, "fat": 0.95, "muscle": 0.40, "organ": 0.45, "body": 0.62, "disc": 0.30, "posterior": 0.55,
               "ligament": 0.10, "csf": 0.10, "cord": 0.48, "tumor": 0.50, "edema": 0.40, "cavity": 0.12, "gm": 0.47,
               "nucleus": 0.36, "endplate": 0.08, "epidural_fat": 0.95, "brainstem": 0.47, "cerebellum": 0.42,
               "nerve": 0.48, "flow_void": 0.10})

ORIENTATIONS = [("P", "I", "R"), ("A", "S", "R"), ("S", "A", "R"), ("R", "A", "S"), ("L", "P", "S"), ("P", "I", "L"), ("I", "P", "L"), ("R", "P", "I")]
AXIAL_ORIENTATIONS = [("L", "P", "S"), ("R", "A", "S"), ("L", "A", "S"), ("R", "P", "I"), ("P", "L", "S")]
_WORLD = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
ACQUISITIONS = ("sagittal", "iso3d", "crop", "axial", "wholespine")
MIXED_PROBS = {"sagittal": 0.45, "iso3d": 0.2, "crop": 0.15, "axial": 0.1, "wholespine": 0.1}
STORAGES = ("int16", "int16-scaled", "uint8", "float32")
MIXED_STORAGE_PROBS = (0.45, 0.25, 0.1, 0.2)


@dataclass
class Acquisition:
    """An acquisition: in-plane resolution, slice thickness, field of view, storage orientation and
    an optional oblique tilt about the RL axis. ``plane="sagittal"``: slices along RL (a 3D
    isotropic or crop acquisition is a sagittal one with ``thickness == res_ip``);
    ``plane="axial"``: slices along SI (tilted with the cord), in-plane RL x AP with ``fov_rl``."""

    res_ip: float
    thickness: float
    fov_si: float
    fov_ap: float
    n_slices: int
    centre: np.ndarray
    axcodes: tuple[str, str, str]
    tilt_deg: float = 0.0
    plane: str = "sagittal"
    fov_rl: float = 0.0
    kind: str = "sagittal"

    def grid(self) -> tuple[tuple[int, int, int], np.ndarray]:
        """Shape and affine of the stored image."""
        if self.plane == "axial":
            sizes = {0: self.res_ip, 1: self.res_ip, 2: self.thickness}  # world axis -> spacing
            counts = {0: int(round(self.fov_rl / self.res_ip)), 1: int(round(self.fov_ap / self.res_ip)), 2: self.n_slices}
        else:
            sizes = {2: self.res_ip, 1: self.res_ip, 0: self.thickness}
            counts = {2: int(round(self.fov_si / self.res_ip)), 1: int(round(self.fov_ap / self.res_ip)), 0: self.n_slices}
        t = np.deg2rad(self.tilt_deg)  # rotation about the RL axis (sagittal oblique)
        rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
        direc = np.zeros((3, 3))
        shape = []
        for col, code in enumerate(self.axcodes):
            w, sign = _WORLD[code]
            direc[w, col] = sign * sizes[w]
            shape.append(max(1, counts[w]))
        m = rot @ direc
        affine = np.eye(4)
        affine[:3, :3] = m
        affine[:3, 3] = self.centre - m @ ((np.array(shape) - 1) / 2.0)
        return tuple(shape), affine  # type: ignore[return-value]


def random_acquisition(rng: np.random.Generator, spec: PhantomSpec, around_z: float, max_voxels: int = 6_000_000,
                       kind: str = "mixed") -> Acquisition:
    """Draw an acquisition of ``kind`` (one of :data:`ACQUISITIONS`, or ``mixed``: drawn with
    :data:`MIXED_PROBS`) around height ``around_z``; ``max_voxels`` shrinks the field of view."""
    if kind == "mixed":
        names = list(MIXED_PROBS)
        kind = names[int(rng.choice(len(names), p=list(MIXED_PROBS.values())))]
    if kind not in ACQUISITIONS:
        raise ValueError(f"acquisition {kind!r}: choose from mixed, {', '.join(ACQUISITIONS)}")
    plane, fov_rl, tilt = "sagittal", 0.0, 0.0
    axcodes = ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))]
    if kind == "sagittal":  # 2D clinical sagittal (v1)
        res, thick = float(rng.uniform(0.3, 1.3)), float(rng.uniform(1.5, 5.2))
        want_si = float(rng.choice([rng.uniform(150, 260), rng.uniform(250, 420), rng.uniform(380, 500)], p=[0.45, 0.4, 0.15]))
        fov_si = min(want_si, 640 * res)
        fov_ap = min(float(rng.uniform(110, 200)), 640 * res, fov_si)
        n_sl = int(np.clip(round(rng.uniform(34, 70) / thick), 8, 40))
        tilt = float(rng.uniform(-8, 8)) if rng.random() < 0.3 else 0.0
    elif kind in ("iso3d", "crop"):
        res = float(rng.uniform(0.8, 1.2))
        thick = res
        if kind == "iso3d":
            fov_si, fov_ap, fov_rl = float(rng.uniform(150, 320)), float(rng.uniform(100, 200)), float(rng.uniform(36, 80))
        else:  # research-style crop around the cord
            fov_si, fov_ap, fov_rl = float(rng.uniform(50, 120)), float(rng.uniform(40, 80)), float(rng.uniform(20, 55))
        n_sl = max(8, int(round(fov_rl / res)))
        tilt = float(rng.uniform(-5, 5)) if rng.random() < 0.2 else 0.0
    elif kind == "wholespine":
        res, thick = float(rng.uniform(0.8, 1.3)), float(rng.uniform(2.5, 4.5))
        fov_si, fov_ap = float(rng.uniform(600, 900)), float(rng.uniform(200, 320))
        n_sl = int(np.clip(round(rng.uniform(36, 60) / thick), 9, 20))
    else:  # axial: slices along the cord
        plane = "axial"
        res, thick = float(rng.uniform(0.3, 0.8)), float(rng.uniform(2.5, 5.0))
        fov_rl = float(rng.uniform(40, 180))
        fov_ap = float(min(rng.uniform(40, 180), fov_rl * 1.2))
        n_sl = int(rng.integers(10, 41))
        fov_si = n_sl * thick
        axcodes = AXIAL_ORIENTATIONS[int(rng.integers(len(AXIAL_ORIENTATIONS)))]
    n_vox = (fov_si / (thick if plane == "axial" else res)) * (fov_ap / res) * (fov_rl / res if plane == "axial" else n_sl)
    if n_vox > max_voxels:  # keep matrices realistic: shrink the field
        if kind == "sagittal" or kind == "wholespine":
            f = np.sqrt(max_voxels / n_vox)
            fov_si, fov_ap = fov_si * f, fov_ap * f
        elif plane == "axial":
            f = np.sqrt(max_voxels / n_vox)
            fov_rl, fov_ap = fov_rl * f, fov_ap * f
        else:
            f = (max_voxels / n_vox) ** (1 / 3)
            fov_si, fov_ap, fov_rl = fov_si * f, fov_ap * f, fov_rl * f
            n_sl = max(4, int(round(fov_rl / res)))
    if kind == "wholespine":
        top = float(rng.uniform(60, 115))
        zc = top - fov_si / 2
    else:
        zc = float(around_z + rng.uniform(-0.2, 0.2) * fov_si)
    zc = float(np.clip(zc, A.Z_BOTTOM + 20 + fov_si / 2, A.Z_TOP - 20 - fov_si / 2)) if fov_si < 900 else zc
    centre = spec.centreline(np.array([zc]))[0].astype(np.float64)
    if kind == "crop":
        centre += rng.uniform(-3, 3, 3) * np.array([1.0, 1.0, 2.0])
    elif plane == "axial":
        centre[:2] += rng.uniform(-2, 2, 2)
        tilt = -float(spec.tilt_deg(np.array([zc], np.float32))[0]) + float(rng.uniform(-4, 4))
    else:
        centre[1] += rng.uniform(-0.1, 0.15) * fov_ap
        centre[0] += rng.uniform(-3, 3)
    return Acquisition(res, thick, fov_si, fov_ap, n_sl, centre, axcodes, tilt, plane, fov_rl, kind)


# ---- appearance ------------------------------------------------------------------------------------------
@dataclass
class Appearance:
    """One subject's intensities: per-tissue means for T2w and T1w, the tumour's enhancement
    rule (``paper`` mode only), texture amplitudes (per tissue, 4 fields), gamma, SNR, storage."""

    mode: str  # "paper" or "random"
    lut2: np.ndarray
    lut1: np.ndarray
    tex2: np.ndarray  # (4, N_TISSUES) log-amplitude of the coarse, medium, fine and striation fields
    tex1: np.ndarray
    gamma2: float = 1.0
    gamma1: float = 1.0
    storage: str = "int16"
    field_seed: int = 0
    scales: tuple[float, float, float] = (40.0, 9.0, 2.0)
    extra: dict = field(default_factory=dict)


def default_appearance() -> Appearance:
    """The fixed clinical means, no texture (v1-like rendering; used by benchmarks)."""
    z = np.zeros((4, N_TISSUES), np.float32)
    return Appearance("paper", T2_LUT.copy(), T1_LUT.copy(), z, z.copy())


def _t(name: str) -> int:
    return TISSUES.index(name)


def random_appearance(rng: np.random.Generator, random_fraction: float = 0.2, storage: str = "mixed") -> Appearance:
    """Draw a subject's appearance; ``random_fraction`` of subjects get fully random intensities."""
    mode = "random" if rng.random() < random_fraction else "paper"
    if mode == "random":
        lut2 = rng.uniform(0.03, 1.0, N_TISSUES).astype(np.float32)
        lut1 = rng.uniform(0.03, 1.0, N_TISSUES).astype(np.float32)
        for lut in (lut2, lut1):
            lut[_t("air")] = rng.uniform(0.0, 0.08)
            lut[_t("gm")] = lut[CORD] * rng.uniform(0.95, 1.05)  # GM does not show in the tumour contrasts
        g2, g1 = float(np.exp(rng.normal(0, 0.3))), float(np.exp(rng.normal(0, 0.3)))
    else:
        lut2 = (T2_LUT * np.exp(rng.normal(0, 0.25, N_TISSUES))).astype(np.float32)
        lut1 = (T1_LUT * np.exp(rng.normal(0, 0.25, N_TISSUES))).astype(np.float32)
        for lut in (lut2, lut1):
            lut[_t("air")] = rng.uniform(0.0, 0.02)
            lut[CORD] = lut[CORD] * 1.0
        if rng.random() < 0.1:  # fat-suppressed T2w
            lut2[[_t("fat"), _t("epidural_fat")]] *= rng.uniform(0.2, 0.4)
        lut2[_t("epidural_fat")] = lut2[_t("fat")] * rng.uniform(0.85, 1.05)
        lut1[_t("epidural_fat")] = lut1[_t("fat")] * rng.uniform(0.85, 1.05)
        cord2, cord1 = lut2[CORD], lut1[CORD]
        # T2w rules: CSF and cavity bright, edema moderately bright, tumour iso- to hyperintense
        lut2[_t("csf")] = max(lut2[_t("csf")], cord2 * rng.uniform(1.9, 2.8))
        csf2 = lut2[_t("csf")]
        lut2[_t("cavity")] = csf2 * rng.uniform(0.9, 1.0)
        lut2[_t("edema")] = cord2 + rng.uniform(0.35, 0.65) * (csf2 - cord2)
        lut2[TUMOR] = cord2 * rng.uniform(1.05, 1.7)
        lut2[GM] = cord2 * rng.uniform(1.0, 1.08)
        lut2[_t("brainstem")] = cord2 * rng.uniform(0.95, 1.1)
        lut2[_t("nerve")] = cord2 * rng.uniform(0.9, 1.1)
        lut2[_t("flow_void")] = csf2 * rng.uniform(0.15, 0.5)
        # Gd-T1w rules: CSF and cavity dark; the tumour's enhancement is applied per point
        lut1[_t("csf")] = min(lut1[_t("csf")], cord1 * rng.uniform(0.15, 0.33))
        lut1[_t("cavity")] = lut1[_t("csf")] * rng.uniform(1.0, 1.2)
        lut1[_t("flow_void")] = lut1[_t("csf")]
        lut1[_t("edema")] = cord1 * rng.uniform(0.78, 0.95)
        lut1[TUMOR] = cord1 * rng.uniform(0.95, 1.1)
        lut1[GM] = cord1 * rng.uniform(0.97, 1.0)
        lut1[_t("brainstem")] = cord1 * rng.uniform(0.95, 1.05)
        lut1[_t("nerve")] = cord1 * rng.uniform(0.9, 1.1)
        g2, g1 = float(np.exp(rng.normal(0, 0.12))), float(np.exp(rng.normal(0, 0.12)))
    # texture: coarse / medium / fine / striation, per tissue (log-amplitudes)
    tex = np.zeros((2, 4, N_TISSUES), np.float32)
    for c in range(2):
        tex[c, 0] = rng.uniform(0.02, 0.07, N_TISSUES)
        tex[c, 1] = rng.uniform(0.0, 0.04, N_TISSUES)
        for name, lo, hi in (("fat", 0.05, 0.15), ("epidural_fat", 0.04, 0.12), ("muscle", 0.04, 0.1), ("organ", 0.08, 0.2),
                             ("cerebellum", 0.03, 0.08), ("body", 0.05, 0.12), ("posterior", 0.05, 0.12)):
            tex[c, 1, _t(name)] = rng.uniform(lo, hi)
        for name, lo, hi in (("body", 0.08, 0.22), ("posterior", 0.08, 0.2), ("fat", 0.03, 0.08), ("organ", 0.04, 0.1),
                             ("muscle", 0.02, 0.05), ("nucleus", 0.03, 0.08), ("disc", 0.03, 0.08)):
            tex[c, 2, _t(name)] = rng.uniform(lo, hi)
        tex[c, 3, _t("muscle")] = rng.uniform(0.06, 0.18)
        for name in ("cord", "gm", "csf", "tumor", "edema", "cavity", "brainstem", "nerve"):
            tex[c, :, _t(name)] *= 0.4  # fluid and cord: little texture (lesion texture is its own)
        tex[c, :, _t("air")] = 0.0
    if storage == "mixed":
        storage = STORAGES[int(rng.choice(len(STORAGES), p=MIXED_STORAGE_PROBS))]
    if storage not in STORAGES:
        raise ValueError(f"storage {storage!r}: choose from mixed, {', '.join(STORAGES)}")
    scales = (float(rng.uniform(30, 60)), float(rng.uniform(6, 12)), float(rng.uniform(1.5, 2.6)))
    return Appearance(mode, lut2, lut1, tex[0], tex[1], g2, g1, storage, int(rng.integers(2**31)), scales)


def _point_values(code: np.ndarray, tex: np.ndarray, app: Appearance, spec: PhantomSpec) -> tuple[np.ndarray, np.ndarray]:
    v2 = app.lut2[code]
    v1 = app.lut1[code]
    tum = code == TUMOR
    if tum.any():
        e = float(max([les.enhancement for les in spec.lesions] or [0.0]))
        h = float(max([les.heterogeneity for les in spec.lesions] or [0.0]))
        tt = tex[tum]
        v2[tum] *= 1.0 + 0.15 * h * tt
        if app.mode == "random":
            v1[tum] *= 1.0 + 0.3 * h * tt
        else:  # enhancement by tumour type, relative to the cord (v1 rule: cord 0.48)
            gain = 0.48 + e * (0.85 + 0.35 * h * tt) if e > 0 else 0.5 + 0.05 * tt
            if 0 < e < 0.6:  # partial enhancement: only part of the tumour takes contrast
                gain = np.where(tt > 0.3, gain, 0.5 + 0.05 * tt)
            v1[tum] = app.lut1[CORD] * gain / 0.48
    return v2, v1


def _supersample_factors(affine: np.ndarray, target=(0.9, 0.9, 1.8)) -> tuple[int, int, int]:
    sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    thick_axis = int(np.argmax(sizes))
    return tuple(int(np.ceil(s / (target[2] if a == thick_axis and s > 1.6 * sizes.min() else target[0]))) for a, s in enumerate(sizes))  # type: ignore


_LABELS = ("tumor", "edema", "cavity", "cord", "gm", "cylinder")


def _label_values(code: np.ndarray, cyl: np.ndarray) -> dict[str, np.ndarray]:
    return {"tumor": code == TUMOR, "edema": code == EDEMA, "cavity": code == CAVITY,
            "cord": np.isin(code, CORD_CODES), "gm": code == GM, "cylinder": cyl}


def render_labels_and_tissue(spec: PhantomSpec, shape, affine, chunk_points: int = 2_000_000, appearance: Appearance | None = None):
    """Per-voxel tissue fractions (partial volume) on a grid.

    Returns ``t2, t1`` noiseless images (no texture) and a dict of label fractions (tumor, edema,
    cavity, cord, gm, cylinder) on the grid, plus ``code``: the tissue at each voxel centre.
    """
    app = appearance or default_appearance()
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape))
    m = affine[:3, :3].astype(np.float32)
    t = affine[:3, 3].astype(np.float32)
    t2 = np.empty(n, np.float32)
    t1 = np.empty(n, np.float32)
    code_c = np.empty(n, np.uint8)
    cyl_c = np.empty(n, bool)
    step = max(1, chunk_points)
    for s0 in range(0, n, step):
        idx = np.arange(s0, min(n, s0 + step))
        ijk = np.stack(np.unravel_index(idx, shape), -1).astype(np.float32)
        pts = ijk @ m.T + t
        c, tex, cyl = classify(spec, pts[:, 0], pts[:, 1], pts[:, 2])
        v2, v1 = _point_values(c, tex, app, spec)
        t2[idx], t1[idx], code_c[idx], cyl_c[idx] = v2, v1, c, cyl
    fr = {k: v.astype(np.float32) for k, v in _label_values(code_c, cyl_c).items()}
    # refine voxels on a boundary (tissue or cylinder) with supersampling
    key = (code_c.astype(np.int16) * 2 + cyl_c).reshape(shape)
    edge = np.zeros(shape, bool)
    for ax in range(3):
        if shape[ax] < 2:
            continue
        d = np.diff(key, axis=ax) != 0
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[ax], hi[ax] = slice(0, -1), slice(1, None)
        edge[tuple(lo)] |= d
        edge[tuple(hi)] |= d
    f = _supersample_factors(affine)
    nsub = f[0] * f[1] * f[2]
    if nsub > 1:
        offs = [((np.arange(fi) + 0.5) / fi - 0.5) for fi in f]
        so = np.stack(np.meshgrid(*offs, indexing="ij"), -1).reshape(-1, 3).astype(np.float32)
        ref = np.flatnonzero(edge.ravel())
        rows = max(1, chunk_points // nsub)
        for s0 in range(0, ref.size, rows):
            idx = ref[s0:s0 + rows]
            ijk = np.stack(np.unravel_index(idx, shape), -1).astype(np.float32)
            pts = ((ijk[:, None, :] + so[None]).reshape(-1, 3)) @ m.T + t
            c, tex, cyl = classify(spec, pts[:, 0], pts[:, 1], pts[:, 2])
            v2, v1 = _point_values(c, tex, app, spec)
            t2[idx] = v2.reshape(-1, nsub).mean(1)
            t1[idx] = v1.reshape(-1, nsub).mean(1)
            for k, val in _label_values(c, cyl).items():
                fr[k][idx] = val.reshape(-1, nsub).mean(1)
    out = {k: v.reshape(shape) for k, v in fr.items()}
    out["code"] = code_c.reshape(shape)
    return t2.reshape(shape), t1.reshape(shape), out


def _smooth_field(shape, spacing: np.ndarray, scale_mm: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-variance smooth random field: Gaussian noise on a coarse grid (one node
    per ``scale_mm`` along each axis) interpolated trilinearly onto the grid."""
    import torch

    ext = np.asarray(shape) * spacing
    coarse = np.maximum(2, np.ceil(ext / scale_mm).astype(int) + 1)
    noise = torch.from_numpy(rng.normal(size=tuple(coarse)).astype(np.float32))[None, None]
    up = torch.nn.functional.interpolate(noise, size=tuple(int(s) for s in shape), mode="trilinear", align_corners=True)[0, 0].numpy()
    sd = float(up[::3, ::3, ::3].std()) or 1.0
    return up / sd


def texture_fields(shape, affine: np.ndarray, app: Appearance) -> list[np.ndarray]:
    """The four texture fields of a grid: coarse, medium, fine (isotropic, ``app.scales`` mm) and
    striation (long along the world S axis, fine across: muscle fibres)."""
    rng = np.random.default_rng([app.field_seed, *[int(s) for s in shape]])
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    si_axis = int(np.argmax(np.abs(affine[2, :3]) / spacing))
    fields = [_smooth_field(shape, spacing, np.full(3, s), rng) for s in app.scales]
    stri = np.full(3, 1.6)
    stri[si_axis] = 25.0
    fields.append(_smooth_field(shape, spacing, stri, rng))
    return fields


def apply_texture(image: np.ndarray, code: np.ndarray, fields: list[np.ndarray], amp: np.ndarray) -> np.ndarray:
    """``image * exp(sum_k amp[k, tissue] * field_k)``, tissue = the voxel centre's."""
    logm = np.zeros(image.shape, np.float32)
    for k, fk in enumerate(fields):
        a = amp[k][code]
        logm += a * fk
    return image * np.exp(logm)


def label_map(fr: dict[str, np.ndarray]) -> np.ndarray:
    """Exclusive map (0 background, 1 tumour, 2 edema, 3 cavity) from partial-volume fractions."""
    stack = np.stack([1.0 - fr["tumor"] - fr["edema"] - fr["cavity"], fr["tumor"], fr["edema"], fr["cavity"]])
    return stack.argmax(axis=0).astype(np.uint8)


def corrupt_float(image: np.ndarray, affine: np.ndarray, rng: np.random.Generator, snr: float, gain: float,
                  gamma: float = 1.0, ref: float = 0.40) -> np.ndarray:
    """Smooth multiplicative bias field (posterior coil sensitivity), gamma, and Rician noise of
    standard deviation ``0.42 * ref / snr`` (``ref``: the cord's clean intensity); float result."""
    shape = image.shape
    ii = [np.linspace(-1, 1, s, dtype=np.float32) for s in shape]
    grid = np.meshgrid(*ii, indexing="ij", sparse=True)
    field_ = np.zeros(shape, np.float32)
    for _ in range(3):
        c = rng.uniform(-0.15, 0.15, 3)
        fr = rng.uniform(0.3, 1.2, 3)
        field_ = field_ + c[0] * np.cos(np.pi * fr[0] * grid[0]) + c[1] * np.cos(np.pi * fr[1] * grid[1]) + c[2] * np.cos(np.pi * fr[2] * grid[2])
    img = image * np.exp(field_)
    if gamma != 1.0:
        top = float(np.percentile(img[::3, ::3, ::3], 99.5)) or 1.0
        img = top * np.power(np.clip(img / top, 0, None), gamma)
        ref = top * (ref / top) ** gamma if ref > 0 else ref
    sigma = 0.42 * (ref / 0.40) / snr
    noisy = np.sqrt((img + rng.normal(0, sigma, shape).astype(np.float32)) ** 2 + rng.normal(0, sigma, shape).astype(np.float32) ** 2)
    return noisy * gain


def corrupt(image: np.ndarray, affine: np.ndarray, rng: np.random.Generator, snr: float, gain: float) -> np.ndarray:
    """v1 interface: bias field and Rician noise, stored as int16."""
    return np.clip(corrupt_float(image, affine, rng, snr, gain), 0, 32000).round().astype(np.int16)


def encode(data: np.ndarray, affine: np.ndarray, storage: str, rng: np.random.Generator) -> nib.Nifti1Image:
    """Store as ``int16`` (rounded), ``int16-scaled`` (int16 with a scl_slope/scl_inter that
    nibabel applies on reading), ``uint8`` (0-255, no scaling) or ``float32`` (with an offset)."""
    if storage == "int16":
        return nifti(np.clip(data, 0, 32000).round().astype(np.int16), affine)
    if storage == "int16-scaled":  # float data, int16 on disk: nibabel picks scl_slope / scl_inter on save
        # a range beyond int16 (as scanners' float reconstructions have), so that scaling is needed
        top = float(np.percentile(data[::3, ::3, ::3], 99.9)) or 1.0
        off = float(rng.uniform(-2000, 2000)) if rng.random() < 0.5 else 0.0
        img = nifti((data * float(np.exp(rng.uniform(np.log(5e4), np.log(5e6)))) / top + off).astype(np.float32), affine)
        img.set_data_dtype(np.int16)
        return nib.Nifti1Image.from_bytes(img.to_bytes())  # in memory exactly what is written
    if storage == "uint8":
        top = float(np.percentile(data, 99.9)) or 1.0
        return nifti(np.clip(np.round(data / top * 255), 0, 255).astype(np.uint8), affine)
    if storage == "float32":
        off = float(rng.uniform(-100, 100)) if rng.random() < 0.3 else 0.0
        return nifti((data * float(rng.uniform(0.001, 2.0)) + off).astype(np.float32), affine)
    raise ValueError(f"storage {storage!r}")


def tissue_names() -> tuple[str, ...]:
    return TISSUES


def nifti(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img
