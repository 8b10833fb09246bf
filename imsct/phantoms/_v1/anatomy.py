"""Analytic model of a spine with an intramedullary tumour, in world (RAS+, mm) coordinates.

A :class:`PhantomSpec` holds every random choice of one subject; :func:`classify` turns world
points into tissue codes. Rendering onto an MRI grid (partial volume, contrasts, noise, bias field)
is done in :mod:`imsct.phantoms.render`. Splitting the two keeps a subject's anatomy fixed while its
acquisition changes (a second contrast on another grid, a follow-up visit).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.interpolate import CubicSpline

# Tissue codes
AIR, FAT, MUSCLE, ORGAN, BODY, DISC, POSTERIOR, LIGAMENT, CSF, CORD, TUMOR, EDEMA, CAVITY = range(13)
TISSUES = ("air", "fat", "muscle", "organ", "body", "disc", "posterior", "ligament", "csf", "cord", "tumor", "edema", "cavity")

TUMOUR_TYPES = ("astrocytoma", "ependymoma", "hemangioblastoma")
TYPE_PROBS = (101 / 343, 122 / 343, 120 / 343)  # Lemay et al. 2021 cohort
# Probability of edema / cavity per type, chosen so that ~51 % / ~67 % of subjects have them.
EDEMA_PROB = {"astrocytoma": 0.40, "ependymoma": 0.40, "hemangioblastoma": 0.72}
CAVITY_PROB = {"astrocytoma": 0.50, "ependymoma": 0.70, "hemangioblastoma": 0.80}
SECOND_TUMOUR_PROB = {"astrocytoma": 0.05, "ependymoma": 0.10, "hemangioblastoma": 0.30}

# name, body height (mm), disc height below (mm), body AP depth (mm), body RL width (mm)
_VERTEBRAE = (
    [("C2", 16, 5, 15, 18)]
    + [(f"C{i}", 13, 5, 16, 22) for i in range(3, 8)]
    + [(f"T{i}", 17 + 0.7 * i, 5 + 0.2 * i, 20 + i, 26 + 1.2 * i) for i in range(1, 13)]
    + [(f"L{i}", 27, 10, 33, 44) for i in range(1, 6)]
    + [("S1", 30, 0, 35, 50)]
)


@dataclass
class Lesion:
    """One tumour with its own edema and cavity, in cord-centred coordinates."""

    z: float  # centre, world S (mm)
    half_length: float  # SI half-length of the tumour (mm)
    r_ap: float
    r_rl: float
    u0: float = 0.0  # RL offset from the centreline (mm)
    v0: float = 0.0  # AP offset
    roughness: float = 0.0  # boundary irregularity (0 = smooth ellipsoid)
    edema_above: float = 0.0  # SI extent of edema beyond the tumour (mm), 0 = none
    edema_below: float = 0.0
    cavity_above: float = 0.0  # SI length of syrinx above the tumour (mm), 0 = none
    cavity_below: float = 0.0
    cavity_frac: float = 0.6  # syrinx radius as a fraction of the cord radius
    enhancement: float = 1.0  # T1w-Gd relative enhancement (0 none, 1 intense)
    heterogeneity: float = 0.0
    wave: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))  # texture plane waves

    def extent(self) -> tuple[float, float]:
        lo = self.z - self.half_length - max(self.edema_below, self.cavity_below)
        hi = self.z + self.half_length + max(self.edema_above, self.cavity_above)
        return lo, hi


@dataclass
class PhantomSpec:
    """Every random choice that defines one subject's anatomy and pathology."""

    tumour_type: str
    scale: float
    curve_z: np.ndarray
    curve_y: np.ndarray
    scoliosis: tuple[float, float, float]  # amplitude (mm), period (mm), phase
    conus_z: float
    levels: list[tuple[str, float, float]]  # (name, z_top, z_bottom) of each vertebral body
    discs: list[tuple[float, float]]
    body_dims: list[tuple[float, float]]  # (AP depth, RL width) per vertebra
    cord_ap: float
    cord_rl: float
    csf_ap: float
    csf_rl: float
    lesions: list[Lesion]
    intensity_jitter: dict[str, np.ndarray]
    _table: dict = field(default_factory=dict, repr=False)

    # ---- z-indexed lookup table, built once --------------------------------------------------
    def table(self) -> dict[str, np.ndarray]:
        if self._table:
            return self._table
        z = np.arange(60.0, -760.0, -0.5)
        y_c = CubicSpline(self.curve_z[::-1], self.curve_y[::-1])(z)
        amp, period, phase = self.scoliosis
        x_c = amp * np.sin(2 * np.pi * z / period + phase)
        # Cord radii: cervical and lumbar enlargements, thoracic narrowing, conus taper.
        prof = 1.0 + 0.18 * np.exp(-(((z + 90) / 45) ** 2)) + 0.12 * np.exp(-(((z - self.conus_z - 60) / 35) ** 2))
        taper = np.clip((z - self.conus_z) / 25.0, 0.0, 1.0) ** 0.5
        cord_ap = self.cord_ap * (0.85 + 0.15 * prof) * taper * self.scale
        cord_rl = self.cord_rl * prof * taper * self.scale
        # Lesions widen the cord smoothly over their whole extent.
        widen = np.zeros_like(z)
        for les in self.lesions:
            lo, hi = les.extent()
            need = max(les.r_ap / 0.85, les.r_rl / 0.85) if les.half_length else 0.0
            target = np.clip(need / max(self.cord_rl, 1e-3), 1.0, 2.2)
            bump = np.clip(np.minimum(z - lo + 8, hi + 8 - z) / 10.0, 0.0, 1.0)
            widen = np.maximum(widen, (target - 1.0) * bump)
        cord_ap = cord_ap * (1 + widen * 1.1)
        cord_rl = cord_rl * (1 + widen)
        sac = z < self.conus_z + 30  # thecal sac below the conus
        can_ap = np.maximum(cord_ap + self.csf_ap, np.where(sac, 6.5 * self.scale, 0.0))
        can_rl = np.maximum(cord_rl + self.csf_rl, np.where(sac, 8.0 * self.scale, 0.0))
        self._table = {"z": z[::-1].copy(), "y_c": y_c[::-1].copy(), "x_c": x_c[::-1].copy(),
                       "cord_ap": cord_ap[::-1].copy(), "cord_rl": cord_rl[::-1].copy(),
                       "can_ap": can_ap[::-1].copy(), "can_rl": can_rl[::-1].copy()}
        return self._table

    def lookup(self, name: str, z: np.ndarray) -> np.ndarray:
        t = self.table()
        return np.interp(z, t["z"], t[name]).astype(np.float32)

    def lookup_many(self, names: tuple[str, ...], z: np.ndarray) -> list[np.ndarray]:
        """Nearest entry of the 0.5 mm table (fast path for millions of points)."""
        t = self.table()
        zt = t["z"]
        i = np.clip(np.rint((z - zt[0]) / (zt[1] - zt[0])).astype(np.int32), 0, zt.size - 1)
        return [t[n].astype(np.float32).take(i) for n in names]

    def centreline(self, z: np.ndarray) -> np.ndarray:
        """World (x, y, z) of the cord centreline at heights ``z``."""
        return np.stack([self.lookup("x_c", z), self.lookup("y_c", z), np.asarray(z, np.float32)], axis=-1)

    def level_at(self, z: float) -> str:
        """Vertebral level (body or the disc below it) at height ``z``."""
        for (name, top, _), (_, dbot) in zip(self.levels, self.discs):
            if dbot <= z:
                return name
        return self.levels[-1][0]


def random_spec(rng: np.random.Generator, tumour_type: str | None = None) -> PhantomSpec:
    """Draw one subject: spine shape, cord size, tumour type and lesions."""
    ttype = tumour_type or str(rng.choice(TUMOUR_TYPES, p=TYPE_PROBS))
    scale = float(rng.uniform(0.92, 1.08))
    # Vertebral column from C2 downwards.
    levels, discs, dims = [], [], []
    ztop = -12.0 * scale
    for name, h, d, depth, width in _VERTEBRAE:
        h, d = h * scale, d * scale
        levels.append((name, ztop, ztop - h))
        discs.append((ztop - h, ztop - h - d))
        dims.append((depth * scale, width * scale))
        ztop = ztop - h - d
    l1 = next(lv for lv in levels if lv[0] == "L1")
    conus_z = float(rng.uniform(l1[2] - 8, l1[1] + 5))  # conus between T12/L1 and L1/L2
    a_c, a_t, a_l = rng.uniform(3, 10), rng.uniform(8, 22), rng.uniform(6, 18)
    curve_z = np.array([60.0, 0.0, -70.0, -140.0, -300.0, -470.0, -580.0, -700.0, -760.0])
    curve_y = np.array([0.0, 0.0, a_c, 0.0, -a_t, 0.0, a_l, 0.0, -5.0]) * scale
    scol = (float(rng.uniform(0, 4)), float(rng.uniform(300, 600)), float(rng.uniform(0, 2 * np.pi)))
    spec = PhantomSpec(
        tumour_type=ttype, scale=scale, curve_z=curve_z, curve_y=curve_y, scoliosis=scol,
        conus_z=conus_z, levels=levels, discs=discs, body_dims=dims,
        cord_ap=float(rng.uniform(3.3, 4.2)), cord_rl=float(rng.uniform(4.8, 6.0)),
        csf_ap=float(rng.uniform(2.5, 4.5)), csf_rl=float(rng.uniform(3.0, 4.5)),
        lesions=[], intensity_jitter={},
    )
    n = 2 if rng.random() < SECOND_TUMOUR_PROB[ttype] else 1
    has_edema = rng.random() < EDEMA_PROB[ttype]
    has_cavity = rng.random() < CAVITY_PROB[ttype]
    z_lo, z_hi = conus_z + 45, -25.0
    first = _random_lesion(rng, ttype, z_lo, z_hi, has_edema, has_cavity, primary=True)
    spec.lesions.append(first)
    for _ in range(n - 1):
        for _try in range(20):
            other = _random_lesion(rng, ttype, z_lo, z_hi, has_edema and rng.random() < 0.5, False, primary=False)
            lo, hi = other.extent()
            if all(hi + 10 < les.extent()[0] or lo - 10 > les.extent()[1] for les in spec.lesions):
                spec.lesions.append(other)
                break
    spec.intensity_jitter = {"t2": rng.uniform(0.9, 1.1, len(TISSUES)), "t1": rng.uniform(0.9, 1.1, len(TISSUES))}
    return spec


def _random_lesion(rng, ttype, z_lo, z_hi, edema, cavity, primary) -> Lesion:
    if ttype == "hemangioblastoma":
        hl, r = rng.uniform(5, 12), rng.uniform(3.5, 6.0)
        offset, rough, enh, het = rng.uniform(0.0, 0.35), rng.uniform(0.0, 0.08), rng.uniform(0.9, 1.0), 0.1
    elif ttype == "ependymoma":
        hl, r = rng.uniform(12, 35), rng.uniform(5.0, 8.0)
        offset, rough, enh, het = rng.uniform(0.0, 0.1), rng.uniform(0.03, 0.12), rng.uniform(0.55, 0.9), 0.45
    else:  # astrocytoma: eccentric, ill-defined, partial or no enhancement
        hl, r = rng.uniform(12, 40), rng.uniform(4.5, 7.5)
        offset, rough = rng.uniform(0.1, 0.35), rng.uniform(0.15, 0.3)
        enh, het = (0.0 if rng.random() < 0.4 else rng.uniform(0.2, 0.55)), 0.5
    if not primary:
        hl, r = hl * 0.6, r * 0.8
    angle = rng.uniform(0, 2 * np.pi)
    les = Lesion(
        z=float(rng.uniform(z_lo, z_hi)), half_length=float(hl), r_ap=float(r * rng.uniform(0.8, 1.0)),
        r_rl=float(r), u0=float(offset * r * np.cos(angle)), v0=float(offset * r * np.sin(angle)),
        roughness=float(rough), enhancement=float(enh), heterogeneity=float(het),
    )
    if edema:
        big = 1.6 if ttype == "hemangioblastoma" else 1.0
        les.edema_above = float(rng.uniform(12, 45) * big) if rng.random() < 0.85 else 0.0
        les.edema_below = float(rng.uniform(12, 45) * big) if rng.random() < 0.85 or not les.edema_above else 0.0
    if cavity:
        big = 1.5 if ttype == "hemangioblastoma" else 1.0
        les.cavity_above = float(rng.uniform(20, 110) * big) if rng.random() < 0.8 else 0.0
        les.cavity_below = float(rng.uniform(20, 110) * big) if rng.random() < 0.6 or not les.cavity_above else 0.0
        les.cavity_frac = float(rng.uniform(0.5, 0.75))
    k = rng.normal(size=(6, 3))
    k = k / np.linalg.norm(k, axis=1, keepdims=True) * rng.uniform(2 * np.pi / 14, 2 * np.pi / 5, (6, 1))
    les.wave = np.concatenate([k, rng.uniform(0, 2 * np.pi, (6, 1))], axis=1)
    return les


def classify(spec: PhantomSpec, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tissue code of each world point, the texture value used for lesion heterogeneity, and a
    mask of points inside the stage-1 target (30 mm cylinder around the centreline)."""
    x = x.astype(np.float32, copy=False)
    y = y.astype(np.float32, copy=False)
    z = z.astype(np.float32, copy=False)
    x_c, y_c, cord_ap, cord_rl, can_ap, can_rl = spec.lookup_many(("x_c", "y_c", "cord_ap", "cord_rl", "can_ap", "can_rl"), z)
    u = x - x_c
    v = y - y_c
    code = np.full(x.shape, ORGAN, dtype=np.uint8)
    texture = np.zeros(x.shape, dtype=np.float32)
    # Body outline, back muscles and subcutaneous fat.
    code[v < 0] = MUSCLE
    code[(v < -48 * spec.scale) | (np.abs(u) > 48)] = FAT
    code[v < -62 * spec.scale] = AIR
    code[(v > 0) & (np.abs(u) > 40)] = FAT
    # Vertebral bodies, discs and posterior elements, indexed by height.
    tops = np.array([lv[1] for lv in spec.levels], np.float32)
    idx = np.clip(np.searchsorted(-tops, -z, side="right") - 1, 0, len(tops) - 1)
    bottoms = np.array([lv[2] for lv in spec.levels], np.float32)[idx]
    disc_bot = np.array([d[1] for d in spec.discs], np.float32)[idx]
    depth = np.array([d[0] for d in spec.body_dims], np.float32)[idx]
    width = np.array([d[1] for d in spec.body_dims], np.float32)[idx]
    inside_col = z <= tops[0]
    front = can_ap + 1.5
    sq = np.square((v - front - depth / 2) / (depth / 2))
    in_front = (v > front) & (v < front + depth) & (np.square(u / (width / 2)) + np.square(np.square(sq)) < 1)
    is_body = in_front & (z > bottoms) & inside_col
    is_disc = in_front & (z <= bottoms) & (z > disc_bot) & inside_col
    code[is_body] = BODY
    code[is_disc] = DISC
    rel = (tops[idx] - z) / np.maximum(tops[idx] - disc_bot, 1)
    post = (v < -can_ap - 1.0) & (v > -can_ap - 1.0 - 28 * spec.scale) & (np.abs(u) < 9 + 6 * (v > -can_ap - 9)) & (rel > 0.25) & (rel < 0.95) & inside_col
    code[post] = POSTERIOR
    # Thecal sac: ligament rim, CSF, cord.
    r_can = np.square(u / can_rl) + np.square(v / can_ap)
    r_lig = np.square(u / (can_rl + 1.2)) + np.square(v / (can_ap + 1.2))
    code[(r_lig < 1) & (r_can >= 1)] = LIGAMENT
    code[r_can < 1] = CSF
    with np.errstate(divide="ignore", invalid="ignore"):
        r_cord = np.square(u / cord_rl) + np.square(v / cord_ap)
    in_cord = (r_cord < 1) & (cord_ap > 0.05)
    code[in_cord] = CORD
    for les in spec.lesions:
        lo, hi = les.extent()
        near = in_cord & (z > lo - 1) & (z < hi + 1)
        if not near.any():
            continue
        zi, ui, vi = z[near], u[near], v[near]
        ca, cr = cord_ap[near], cord_rl[near]
        sub = code[near]
        tex = np.zeros(zi.shape, np.float32)
        for kx, ky, kz, ph in les.wave:
            tex += np.cos(kx * x[near] + ky * y[near] + kz * zi + ph)
        tex /= np.sqrt(len(les.wave) / 2.0) if len(les.wave) else 1.0
        rc = (ui / cr) ** 2 + (vi / ca) ** 2
        dz = zi - les.z
        if les.edema_above or les.edema_below:
            ext = np.where(dz > 0, les.half_length + les.edema_above, les.half_length + les.edema_below)
            ed = ((dz / np.maximum(ext, 1e-3)) ** 2 + 0.35 * rc < 1) & (rc < 0.92)
            sub[ed] = EDEMA
        cav_r = les.cavity_frac
        for length, sign in ((les.cavity_above, 1), (les.cavity_below, -1)):
            if length <= 0:
                continue
            t = (sign * dz - les.half_length * 0.6) / length  # 0..1 along the syrinx
            taper = np.sqrt(np.clip(1 - (2 * t - 1) ** 8, 0, 1))
            cav = (t > 0) & (t < 1) & (rc < (cav_r * taper) ** 2)
            sub[cav] = CAVITY
        rt = (dz / les.half_length) ** 2 + ((ui - les.u0) / les.r_rl) ** 2 + ((vi - les.v0) / les.r_ap) ** 2
        sub[(rt < 1 + les.roughness * tex) & (rc < 0.95)] = TUMOR
        code[near] = sub
        texture[near] = np.where(sub == TUMOR, tex, texture[near])
    in_cyl = ((np.square(u) + np.square(v)) < 15.0**2) & (z > spec.conus_z) & (z < 40)
    return code, texture, in_cyl


def grown(spec: PhantomSpec, factor: float) -> PhantomSpec:
    """The same subject with every lesion grown: tumour dimensions (and offsets from the
    centreline), edema and cavity extents scaled by ``factor ** (1/3)``, so an unconstrained
    tumour's volume is multiplied by ``factor``. The cord widens around bigger lesions as it does
    at the first visit, and edema and cavity stay inside the cord, so the rendered volumes of edema
    and cavity (and a tumour that fills the cord) change by less or more than ``factor``; measure
    them with :func:`lesion_volumes`."""
    from dataclasses import replace

    s = float(factor) ** (1.0 / 3.0)
    lesions = [
        replace(les, half_length=les.half_length * s, r_ap=les.r_ap * s, r_rl=les.r_rl * s, u0=les.u0 * s, v0=les.v0 * s,
                edema_above=les.edema_above * s, edema_below=les.edema_below * s,
                cavity_above=les.cavity_above * s, cavity_below=les.cavity_below * s)
        for les in spec.lesions
    ]
    return replace(spec, lesions=lesions, _table={})


def lesion_volumes(spec: PhantomSpec, step_mm: float = 0.25, field: tuple | None = None) -> dict[str, float]:
    """Volumes (mm3) of tumour, edema, cavity and their union in the continuous anatomy, free of any
    acquisition grid: :func:`classify` integrated on a fine grid in cord-centred coordinates
    ``(x_c(z) + u, y_c(z) + v, z)``, a shear of unit Jacobian, with ``step_mm`` across the cord and
    twice that along it. ``field=(shape, affine)`` (affine from voxels to *anatomy* coordinates)
    counts only the part inside that grid's field of view (voxel edges)."""
    vols = {"tumor": 0.0, "edema": 0.0, "cavity": 0.0}
    to_vox = np.linalg.inv(np.asarray(field[1], np.float64)) if field is not None else None
    spans = sorted(les.extent() for les in spec.lesions)
    merged: list[list[float]] = []
    for lo, hi in spans:
        if merged and lo - 2 <= merged[-1][1] + 2:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    dz = 2 * step_mm
    for lo, hi in merged:
        z = np.arange(lo - 2, hi + 2, dz) + dz / 2
        x_c, y_c, c_ap, c_rl = spec.lookup_many(("x_c", "y_c", "cord_ap", "cord_rl"), z.astype(np.float32))
        r = float(max(c_ap.max(), c_rl.max())) + 1.0
        uv = np.arange(-r, r, step_mm) + step_mm / 2
        u, v = np.meshgrid(uv, uv, indexing="ij")
        u, v = u.ravel().astype(np.float32), v.ravel().astype(np.float32)
        rows = max(1, 2_000_000 // u.size)
        for i in range(0, z.size, rows):
            zz = np.repeat(z[i:i + rows].astype(np.float32), u.size)
            xx = np.repeat(x_c[i:i + rows], u.size) + np.tile(u, min(rows, z.size - i))
            yy = np.repeat(y_c[i:i + rows], u.size) + np.tile(v, min(rows, z.size - i))
            code, _, _ = classify(spec, xx, yy, zz)
            if to_vox is not None:
                ijk = np.stack([xx, yy, zz], -1).astype(np.float64) @ to_vox[:3, :3].T + to_vox[:3, 3]
                inside = np.all((ijk > -0.5) & (ijk < np.asarray(field[0][:3]) - 0.5), axis=1)
                code = np.where(inside, code, 0)
            for name, c in (("tumor", TUMOR), ("edema", EDEMA), ("cavity", CAVITY)):
                vols[name] += float(np.count_nonzero(code == c)) * step_mm * step_mm * dz
    vols["whole-tumor"] = vols["tumor"] + vols["edema"] + vols["cavity"]
    return vols
