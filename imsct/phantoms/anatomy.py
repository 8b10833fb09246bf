"""Analytic model of a spine with an intramedullary tumour, in world (RAS+, mm) coordinates (generator v2).

A :class:`PhantomSpec` holds every random choice of one subject; :func:`classify` turns world
points into tissue codes. Rendering onto an MRI grid (partial volume, contrasts, texture, noise,
bias field) is done in :mod:`imsct.phantoms.render`. Splitting the two keeps a subject's anatomy
fixed while its acquisition changes (a second contrast on another grid, a follow-up visit).

Geometry (v2). The cord centreline is ``(x_c(z), y_c(z), z)``; its sagittal angle ``theta(z)``
(cervical and lumbar lordosis, thoracic kyphosis, head/neck flexion) reaches 30 degrees and more
in some subjects. A world point is expressed in the cord's local frame: ``u`` (right-left from
the centreline), ``v`` (anterior-posterior, perpendicular to the cord) and the arc length ``a``
along the cord (0 near the foramen magnum, negative downwards), so vertebrae, discs and the cord
cross-section follow the curve. Tissues: vertebral bodies with rounded corners, cortical endplates
and marrow; discs with annulus and nucleus (some degenerated); posterior elements sloping
caudally; epidural fat; CSF with flow voids (some subjects); cord white matter and a grey-matter
butterfly whose size varies by level; brainstem, cerebellum and skull base above C1; conus at
L1-L2 and cauda equina roots below; paraspinal and posterior neck muscles in layers with fat
planes; airway in the neck; lungs beside the thoracic spine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np
from scipy.interpolate import CubicSpline

# Tissue codes. "cord" is the cord's white matter; the cord mask is CORD_CODES.
(AIR, FAT, MUSCLE, ORGAN, BODY, DISC, POSTERIOR, LIGAMENT, CSF, CORD, TUMOR, EDEMA, CAVITY,
 GM, NUCLEUS, ENDPLATE, EPIFAT, BRAINSTEM, CEREBELLUM, NERVE, FLOWVOID) = range(21)
WM = CORD
TISSUES = ("air", "fat", "muscle", "organ", "body", "disc", "posterior", "ligament", "csf", "cord", "tumor", "edema",
           "cavity", "gm", "nucleus", "endplate", "epidural_fat", "brainstem", "cerebellum", "nerve", "flow_void")
CORD_CODES = (CORD, GM, TUMOR, EDEMA, CAVITY)

TUMOUR_TYPES = ("astrocytoma", "ependymoma", "hemangioblastoma")
TYPE_PROBS = (101 / 343, 122 / 343, 120 / 343)  # Lemay et al. 2021 cohort
# Probability of edema / cavity per type, chosen so that ~51 % / ~67 % of subjects have them.
EDEMA_PROB = {"astrocytoma": 0.40, "ependymoma": 0.40, "hemangioblastoma": 0.72}
CAVITY_PROB = {"astrocytoma": 0.50, "ependymoma": 0.70, "hemangioblastoma": 0.80}
SECOND_TUMOUR_PROB = {"astrocytoma": 0.05, "ependymoma": 0.10, "hemangioblastoma": 0.30}

# name, body height (mm), disc height below (mm), body AP depth (mm), body RL width (mm), spinous length (mm)
_VERTEBRAE = (
    [("C2", 16, 5, 15, 18, 22)]
    + [(f"C{i}", 13, 5, 16, 22, 14 + 2 * (i == 7) * 8) for i in range(3, 8)]
    + [(f"T{i}", 17 + 0.7 * i, 5 + 0.2 * i, 20 + i, 26 + 1.2 * i, 30) for i in range(1, 13)]
    + [(f"L{i}", 27, 10, 33, 44, 28) for i in range(1, 6)]
    + [("S1", 30, 6, 35, 50, 18), ("S2", 25, 4, 30, 44, 14), ("S3", 22, 3, 25, 38, 10)]
)
Z_TOP, Z_BOTTOM = 140.0, -860.0  # extent of the model (mm)
CORD_TOP_ARC = 12.0  # the labelled cord ends here (medulla); above it is brainstem


@dataclass
class Lesion:
    """One tumour with its own edema and cavity, in cord-centred coordinates."""

    z: float  # centre, world S (mm) of the centreline station
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
    curve_z: np.ndarray  # knots (world z, mm) of the sagittal angle profile
    curve_theta: np.ndarray  # sagittal angle of the centreline at the knots (degrees, dy/dz = tan)
    scoliosis: tuple[float, float, float]  # amplitude (mm), period (mm), phase
    conus_z: float
    levels: list[tuple[str, float, float]]  # (name, z_top, z_bottom) of each vertebral body (centreline z)
    discs: list[tuple[float, float]]
    body_dims: list[tuple[float, float]]  # (AP depth, RL width) per vertebra
    cord_ap: float
    cord_rl: float
    csf_ap: float
    csf_rl: float
    lesions: list[Lesion]
    intensity_jitter: dict[str, np.ndarray]
    level_arcs: list[tuple[float, float, float]] = field(default_factory=list)  # (arc top, arc bottom, disc bottom)
    spinous: list[float] = field(default_factory=list)
    degenerate: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # per disc: nucleus dark
    epifat: float = 2.0  # dorsal epidural fat thickness (mm, thoracic/lumbar; thinner in the neck)
    muscle_layer: float = 9.0  # thickness of posterior muscle layers (mm), fat planes between
    subcut: float = 8.0  # subcutaneous fat thickness (mm)
    flow_voids: float = 0.0  # 0: none; else the share of CSF with T2w flow voids
    flow_wave: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    phase: np.ndarray = field(default_factory=lambda: np.zeros(4))
    flexion_deg: float = 0.0
    healthy: bool = False
    _table: dict = field(default_factory=dict, repr=False)

    # ---- z-indexed lookup table, built once --------------------------------------------------
    def table(self) -> dict[str, np.ndarray]:
        if self._table:
            return self._table
        z = np.arange(Z_BOTTOM, Z_TOP + 0.25, 0.5)
        theta = np.deg2rad(CubicSpline(self.curve_z[::-1], self.curve_theta[::-1])(z))
        slope = np.tan(np.clip(theta, -1.2, 1.2))
        y_c = np.concatenate([[0.0], np.cumsum(0.5 * (slope[1:] + slope[:-1]) * 0.5)])
        arc = np.concatenate([[0.0], np.cumsum(0.5 * (1 / np.cos(theta[1:]) + 1 / np.cos(theta[:-1])) * 0.5)])
        i0 = int(np.argmin(np.abs(z)))
        y_c, arc = y_c - y_c[i0], arc - arc[i0]
        amp, period, phase = self.scoliosis
        x_c = amp * np.sin(2 * np.pi * z / period + phase)
        # Cord radii: cervical and lumbar enlargements, thoracic narrowing, conus taper.
        prof = 1.0 + 0.18 * np.exp(-(((z + 90) / 45) ** 2)) + 0.12 * np.exp(-(((z - self.conus_z - 60) / 35) ** 2))
        taper = np.clip((z - self.conus_z) / 25.0, 0.0, 1.0) ** 0.5
        cord_ap = self.cord_ap * (0.85 + 0.15 * prof) * taper * self.scale
        cord_rl = self.cord_rl * prof * taper * self.scale
        # Medulla and pons above the foramen magnum: the brainstem widens (anteriorly, the pons).
        up = np.clip((arc - 5.0) / 45.0, 0, None)
        cord_ap = cord_ap * (1 + 1.3 * np.minimum(up, 1.2) ** 1.5)
        cord_rl = cord_rl * (1 + 0.9 * np.minimum(up, 1.2) ** 1.5)
        # Grey-matter size factor: large in the enlargements and the conus, thin in the thorax.
        gm = (0.65 + 0.5 * np.exp(-(((z + 95) / 40) ** 2)) + 0.55 * np.exp(-(((z - self.conus_z - 40) / 40) ** 2))
              + 0.3 * np.clip(1 - (z - self.conus_z) / 20, 0, 1))
        widen = np.zeros_like(z)
        for les in self.lesions:
            lo, hi = les.extent()
            need = max(les.r_ap / 0.85, les.r_rl / 0.85) if les.half_length else 0.0
            target = np.clip(need / max(self.cord_rl, 1e-3), 1.0, 2.2)
            bump = np.clip(np.minimum(z - lo + 8, hi + 8 - z) / 10.0, 0.0, 1.0)
            widen = np.maximum(widen, (target - 1.0) * bump)
        cord_ap = cord_ap * (1 + widen * 1.1)
        cord_rl = cord_rl * (1 + widen)
        sac = z < self.conus_z + 30  # thecal sac below the conus, ending at S2
        can_ap = np.maximum(cord_ap + self.csf_ap * (1 + 0.6 * np.clip(up, 0, 1)), np.where(sac, 6.5 * self.scale, 0.0))
        can_rl = np.maximum(cord_rl + self.csf_rl, np.where(sac, 8.0 * self.scale, 0.0))
        if self.level_arcs:
            s2_bottom = self.level_arcs[-2][1]
            end = np.clip((arc - s2_bottom) / 15.0, 0.15, 1.0)
            can_ap, can_rl = can_ap * end, can_rl * end
        self._table = {"z": z, "y_c": y_c, "x_c": x_c, "theta": theta, "sin": np.sin(theta), "cos": np.cos(theta),
                       "arc": arc, "cord_ap": cord_ap, "cord_rl": cord_rl, "can_ap": can_ap, "can_rl": can_rl, "gm": gm}
        self._f32 = {k: v.astype(np.float32) for k, v in self._table.items()}
        return self._table

    def lookup(self, name: str, z: np.ndarray) -> np.ndarray:
        t = self.table()
        return np.interp(z, t["z"], t[name]).astype(np.float32)

    def lookup_many(self, names: tuple[str, ...], z: np.ndarray) -> list[np.ndarray]:
        """Nearest entry of the 0.5 mm table (fast path for millions of points)."""
        t = self.table()
        zt = t["z"]
        i = np.clip(np.rint((z - zt[0]) * 2.0).astype(np.int32), 0, zt.size - 1)
        return [self._f32[n].take(i) for n in names]

    def centreline(self, z: np.ndarray) -> np.ndarray:
        """World (x, y, z) of the cord centreline at heights ``z``."""
        return np.stack([self.lookup("x_c", z), self.lookup("y_c", z), np.asarray(z, np.float32)], axis=-1)

    def arc_to_z(self, a: float | np.ndarray) -> np.ndarray:
        t = self.table()
        return np.interp(a, t["arc"], t["z"])

    def tilt_deg(self, z: np.ndarray) -> np.ndarray:
        """Sagittal angle of the cord (degrees from the world S axis) at heights ``z``."""
        return np.degrees(self.lookup("theta", np.asarray(z, np.float32)))

    def level_at(self, z: float) -> str:
        """Vertebral level (body or the disc below it) at height ``z``."""
        for (name, top, _), (_, dbot) in zip(self.levels, self.discs):
            if dbot <= z:
                return name
        return self.levels[-1][0]


def _curve(rng: np.random.Generator, scale: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Knots of the sagittal angle profile: lordosis (neck, low back), kyphosis (thorax), flexion."""
    c1 = rng.uniform(3, 24)  # upper cervical lordosis (angle at C2)
    k1, k2 = rng.uniform(5, 22), rng.uniform(5, 20)  # cervicothoracic and thoracolumbar inflections (kyphosis)
    l2 = rng.uniform(8, 26)  # lumbosacral
    flex = float(rng.uniform(-10, 16)) if rng.random() < 0.6 else 0.0  # head/neck flexion (+) or extension (-)
    # apices (angle 0): C4-5, T6-7, L3; inflections (angle extreme): C1-2, C7-T1, T12-L1, L5-S1
    z = np.array([140.0, 60.0, 10.0, -30.0, -75.0, -130.0, -300.0, -470.0, -585.0, -690.0, -760.0, -860.0])
    th = np.array([-10 + flex, -12 + flex, -0.6 * c1 + flex, -c1 + 0.7 * flex, 0.2 * flex, k1, 0.0, -k2, 0.0, l2, 42.0, 45.0])
    th = th + rng.normal(0, 2.0, th.size)
    return z * 1.0, th, flex


def random_spec(rng: np.random.Generator, tumour_type: str | None = None) -> PhantomSpec:
    """Draw one subject: spine shape, cord size, tumour type and lesions."""
    ttype = tumour_type or str(rng.choice(TUMOUR_TYPES, p=TYPE_PROBS))
    scale = float(rng.uniform(0.92, 1.08))
    curve_z, curve_theta, flex = _curve(rng, scale)
    scol = (float(rng.uniform(0, 4)), float(rng.uniform(300, 600)), float(rng.uniform(0, 2 * np.pi)))
    spec = PhantomSpec(
        tumour_type=ttype, scale=scale, curve_z=curve_z, curve_theta=curve_theta, scoliosis=scol,
        conus_z=0.0, levels=[], discs=[], body_dims=[],
        cord_ap=float(rng.uniform(3.3, 4.2)), cord_rl=float(rng.uniform(4.8, 6.0)),
        csf_ap=float(rng.uniform(2.5, 4.5)), csf_rl=float(rng.uniform(3.0, 4.5)),
        lesions=[], intensity_jitter={}, flexion_deg=flex,
    )
    # Vertebral column from C2 downwards, laid out along the cord's arc length.
    arcs, dims, spin = [], [], []
    atop = -12.0 * scale
    for name, h, d, depth, width, sp in _VERTEBRAE:
        h, d = h * scale * rng.uniform(0.95, 1.05), d * scale * rng.uniform(0.85, 1.15)
        arcs.append((atop, atop - h, atop - h - d))
        dims.append((depth * scale, width * scale))
        spin.append(sp * scale * rng.uniform(0.85, 1.2))
        atop = atop - h - d
    spec.level_arcs, spec.body_dims, spec.spinous = arcs, dims, spin
    spec.degenerate = rng.random(len(arcs)) < rng.uniform(0.0, 0.35)
    to_z = lambda a: float(spec.arc_to_z(a))  # noqa: E731  (table needs no levels for arc -> z)
    spec.levels = [(n[0], to_z(a), to_z(b)) for n, (a, b, _) in zip(_VERTEBRAE, arcs)]
    spec.discs = [(to_z(b), to_z(c)) for a, b, c in arcs]
    l1 = next(lv for lv in spec.levels if lv[0] == "L1")
    spec.conus_z = float(rng.uniform(l1[2] - 8, l1[1] + 5))  # conus between T12/L1 and L1/L2
    spec.epifat = float(rng.uniform(1.0, 4.0))
    spec.muscle_layer = float(rng.uniform(9.0, 16.0))
    spec.subcut = float(rng.uniform(4.0, 16.0))
    spec.phase = rng.uniform(0, 2 * np.pi, 4)
    if rng.random() < 0.35:
        spec.flow_voids = float(rng.uniform(0.15, 0.45))
        k = rng.normal(size=(4, 3)) * np.array([0.25, 0.25, 0.08])
        spec.flow_wave = np.concatenate([k, rng.uniform(0, 2 * np.pi, (4, 1))], axis=1)
    n = 2 if rng.random() < SECOND_TUMOUR_PROB[ttype] else 1
    has_edema = rng.random() < EDEMA_PROB[ttype]
    has_cavity = rng.random() < CAVITY_PROB[ttype]
    z_lo, z_hi = spec.conus_z + 45, -25.0
    first = _random_lesion(rng, ttype, z_lo, z_hi, has_edema, has_cavity, primary=True)
    spec.lesions.append(first)
    for _ in range(n - 1):
        for _try in range(20):
            other = _random_lesion(rng, ttype, z_lo, z_hi, has_edema and rng.random() < 0.5, False, primary=False)
            lo, hi = other.extent()
            if all(hi + 10 < les.extent()[0] or lo - 10 > les.extent()[1] for les in spec.lesions):
                spec.lesions.append(other)
                break
    spec._table = {}
    return spec


def healthy_version(spec: PhantomSpec) -> PhantomSpec:
    """The same subject without any lesion (tumour type ``none``)."""
    from dataclasses import replace

    return replace(spec, tumour_type="none", lesions=[], healthy=True, _table={})


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


def _butterfly(p: np.ndarray, q: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Grey matter in normalised cord coordinates (p: right-left, q: anterior +, both in [-1, 1]):
    ventral horns, intermediate zone, thin dorsal horns reaching the dorsolateral surface and the
    grey commissure; ``g`` scales the horns (enlargements large, thorax thin)."""
    ap = np.abs(p)
    sg = np.sqrt(g)
    ventral = np.square((ap - 0.32 - 0.12 * (q - 0.25)) / (0.17 * g)) + np.square((q - 0.25) / (0.27 * sg)) < 1
    inter = np.square((ap - 0.2) / (0.13 * sg)) + np.square((q - 0.02) / (0.2 * sg)) < 1
    # dorsal horn: segment from (0.17, -0.05) to (0.33, -0.78)
    t = np.clip(((ap - 0.17) * 0.16 + (q + 0.05) * -0.73) / (0.16**2 + 0.73**2), 0, 1)
    d2 = np.square(ap - 0.17 - 0.16 * t) + np.square(q + 0.05 + 0.73 * t)
    dorsal = d2 < np.square(0.04 + 0.045 * g * (1 - 0.5 * t))
    comm = (np.abs(q - 0.02) < 0.06) & (ap < 0.22)
    return (ventral | inter | dorsal | comm) & (np.square(p) + np.square(q) < 0.8)


def classify(spec: PhantomSpec, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tissue code of each world point, the texture value used for lesion heterogeneity, and a
    mask of points inside the stage-1 target (30 mm cylinder around the centreline)."""
    x = x.astype(np.float32, copy=False)
    y = y.astype(np.float32, copy=False)
    z = z.astype(np.float32, copy=False)
    sc = spec.scale
    spec.table()
    x_c, y_c, sn, cs, arc0 = spec.lookup_many(("x_c", "y_c", "sin", "cos", "arc"), z)
    dy = y - y_c
    u = x - x_c
    v = dy * cs  # perpendicular to the cord
    a = arc0 + dy * sn  # arc length of the nearest centreline station
    s = z + dy * sn * cs  # its world height
    cord_ap, cord_rl, can_ap, can_rl, gmf = spec.lookup_many(("cord_ap", "cord_rl", "can_ap", "can_rl", "gm"), s)
    code = np.full(x.shape, ORGAN, dtype=np.uint8)
    texture = np.zeros(x.shape, dtype=np.float32)
    au = np.abs(u)
    ph = spec.phase
    head = a > 6.0
    neck = a > -130 * sc
    # ---- body outline: posterior muscles in layers with fat planes, subcutaneous fat, skin ----------
    skin = -(60 + 30 * np.clip((a - 5) / 40, 0, 1)) * sc - spec.subcut * 0.5
    code[v < 0] = MUSCLE
    depth = -v - can_ap
    layer = np.power(np.clip(depth, 0, None) / spec.muscle_layer, 0.8) + 0.3 * np.sin(a / 37.0 + ph[0]) + 0.25 * np.sin(u / 17.0 + ph[1])
    frac = layer - np.floor(layer)
    plane_w = (0.9 + 0.6 * np.sin(a / 29.0 + u / 11.0 + ph[2]) ** 2) / spec.muscle_layer
    code[(v < 0) & (depth > 6) & ((frac < plane_w) | (au > 38 + 6 * np.sin(a / 31 + ph[2])))] = FAT
    code[v < skin + spec.subcut] = FAT
    code[v < skin] = AIR
    code[(v > 0) & (au > 40)] = FAT
    # ---- neck: prevertebral muscle, airway, anterior neck, throat skin --------------------------------
    ant = can_ap + 1.5
    tops = np.array([lv[0] for lv in spec.level_arcs], np.float32)
    idx = np.clip(np.searchsorted(-tops, -a, side="right") - 1, 0, len(tops) - 1)
    bot = np.array([lv[1] for lv in spec.level_arcs], np.float32)[idx]
    dbot = np.array([lv[2] for lv in spec.level_arcs], np.float32)[idx]
    dep = np.array([d[0] for d in spec.body_dims], np.float32)[idx]
    wid = np.array([d[1] for d in spec.body_dims], np.float32)[idx]
    ttop = tops[idx]
    front = ant + dep  # anterior surface of the bodies
    nk = neck & (a < 60)
    air_lo = front + 4.0
    airway = nk & (v > air_lo) & (v < air_lo + 14 * sc) & (au < 9)
    code[nk & (v > front) & (v < air_lo) & (au < 20)] = MUSCLE
    code[airway] = AIR
    throat = front + 50 * sc
    code[nk & (v > throat - 5)] = FAT
    code[nk & (v > throat)] = AIR
    # lungs beside the thoracic spine
    code[(a < -150) & (a > -430) & (v > -5) & (au > 22) & (au < 90)] = AIR
    # ---- vertebral column -----------------------------------------------------------------------
    col = a <= tops[0]
    h = np.maximum(ttop - bot, 1.0)
    pa = (a - (ttop + bot) / 2) / (h / 2)
    pv = (v - ant - dep / 2) / (dep / 2)
    pv = np.where(pv < 0, pv * 1.15, pv)
    r_ax = np.square(u / (wid / 2)) + np.square(pv)
    in_body = col & (a > bot) & (np.square(r_ax) + pa ** 8 < 1)
    code[in_body] = BODY
    cortex = in_body & ((np.abs(pa) > 1 - 1.3 / (h / 2)) | (r_ax > 0.93))
    code[cortex] = ENDPLATE
    dh = np.maximum(bot - dbot, 0.5)
    pd = (a - (bot + dbot) / 2) / (dh / 2)
    in_disc = col & (a <= bot) & (a > dbot) & (r_ax < 1.06)
    code[in_disc] = DISC
    degen = spec.degenerate[idx] if spec.degenerate.size else np.zeros(a.shape, bool)
    nucleus = in_disc & ~degen & (np.square(u / (0.3 * wid)) + np.square((pv + 0.1) / 0.55) + np.square(pd / 0.7) < 1)
    code[nucleus] = NUCLEUS
    # dens of C2 and the anterior arch of C1
    c2top = tops[0]
    dens = (a > c2top) & (a < c2top + 16 * sc) & (np.square(u / 5.5) + np.square((v - ant - 0.4 * dep) / 5.0) < 1)
    code[dens] = BODY
    c1a = (a > c2top + 3) & (a < c2top + 12 * sc) & (np.square(u / 7) + np.square((v - ant - dep * 0.95 - 2) / 3.5) < 1)
    code[c1a] = BODY
    # posterior elements: lamina and spinous process, sloping caudally; C1 posterior arch
    epi = spec.epifat * np.where(neck, 0.4, 1.0)
    back = can_ap + 1.2 + epi
    d = -v - back
    spl = np.array(spec.spinous, np.float32)[idx]
    centre = (ttop + bot) / 2 - 0.45 * np.clip(d, 0, None) - 0.15 * h
    half = 0.32 * h * (1 - 0.3 * np.clip(d / np.maximum(spl, 1), 0, 1))
    wlim = np.where(d < 5, can_rl + 5, 3.0 + 2.0 * (a < -480))
    post = col & (d > 0) & (d < spl) & (np.abs(a - centre) < half) & (au < wlim)
    pillar = col & (au > can_rl + 1) & (au < can_rl + 9) & (v < 0.3 * can_ap) & (v > -back - 4) & (np.abs(a - (ttop + bot) / 2) < 0.38 * h)
    c1p = (a > c2top + 2) & (a < c2top + 10 * sc) & (d > 0) & (d < 9) & (au < can_rl + 6)
    code[post | pillar | c1p] = POSTERIOR
    # dorsal epidural fat, nuchal ligament (midline, neck)
    code[(v < -(can_ap + 1.2)) & (v > -back) & (au < can_rl * 0.85) & (a < c2top)] = EPIFAT
    # ---- skull base and posterior fossa ---------------------------------------------------------
    if np.any(head):
        hb = head & (v < 40)
        cer_c, cer_r = (-can_ap - 3 - 24 * sc), np.array([26.0, 34.0]) * sc  # (v, a) centre / radii
        rcer = np.square((v - cer_c) / cer_r[0]) + np.square((a - 46 * sc) / cer_r[1]) + np.square(u / 48)
        skull = hb & (rcer < 1.45) & (rcer >= 1.0) & (v < -can_ap - 2)
        code[skull] = POSTERIOR
        code[skull & (rcer > 1.33)] = ENDPLATE
        cer = hb & (rcer < 1.0)
        folia = np.sin(np.sqrt(np.square(v - cer_c) + np.square(a - 46 * sc)) * 1.3 + ph[3] + 0.3 * u) > 0.2
        code[cer] = np.where(folia[cer] & (rcer[cer] > 0.25), CEREBELLUM, BRAINSTEM)
        code[hb & (rcer < 1.45) & (v > cer_c + cer_r[0] * 0.6) & (v < -can_ap) & (a < 20)] = CSF  # cisterna magna
        clivus = head & (a < 70) & (np.abs(v - (ant + 6 + 0.5 * (a - 6))) < 5) & (au < 12)
        code[clivus] = BODY
        code[head & (a > 80) & (v < 30)] = CEREBELLUM  # cerebrum above the field of the posterior fossa
    # ---- thecal sac: dura, CSF (flow voids), cord (WM/GM), brainstem, cauda equina ---------------
    with np.errstate(divide="ignore", invalid="ignore"):
        r_can = np.square(u / can_rl) + np.square(v / can_ap)
        r_lig = np.square(u / (can_rl + 1.2)) + np.square(v / (can_ap + 1.2))
        r_cord = np.square(u / cord_rl) + np.square(v / cord_ap)
    code[(r_lig < 1) & (r_can >= 1)] = LIGAMENT
    in_can = r_can < 1
    code[in_can] = CSF
    if spec.flow_voids > 0:
        w = np.zeros(int(in_can.sum()), np.float32)
        uu, vv, aa = u[in_can], v[in_can], a[in_can]
        for kx, ky, kz, p0 in spec.flow_wave:
            w += np.cos(kx * uu + ky * vv + kz * aa + p0)
        thr = np.sqrt(len(spec.flow_wave) / 2.0) * NormalDist().inv_cdf(1 - spec.flow_voids)
        code[np.flatnonzero(in_can)[(w > thr) & (aa > -420) & (np.abs(vv) > 0.5 * can_ap[in_can])]] = FLOWVOID
    in_cord = (r_cord < 1) & (cord_ap > 0.05)
    code[in_cord] = np.where(a[in_cord] > CORD_TOP_ARC, BRAINSTEM, CORD)
    cm = in_cord & (a <= CORD_TOP_ARC)
    if cm.any():
        p = u[cm] / cord_rl[cm]
        q = v[cm] / cord_ap[cm]
        sub = code[cm]
        sub[_butterfly(p, q, gmf[cm])] = GM
        code[cm] = sub
    below = in_can & ~in_cord & (s < spec.conus_z + 2)
    if below.any():  # cauda equina: roots fanning out from the conus, drifting dorsally
        ub, vb = u[below], v[below]
        t = np.clip((spec.conus_z - s[below]) / 80.0, 0, 1)
        hit = np.zeros(ub.shape, bool)
        for k in range(12):
            ang = (k + 0.5) / 12 * 2 * np.pi + 0.3 * np.sin(k * 1.7)
            ru = np.cos(ang) * (1.5 + 4.5 * t) * sc
            rv = np.sin(ang) * (1.0 + 2.0 * t) * sc - 2.0 * t
            hit |= np.square(ub - ru) + np.square(vb - rv) < 0.55
        sub = code[below]
        sub[hit] = NERVE
        code[below] = sub
    for les in spec.lesions:
        lo, hi = les.extent()
        near = cm & (s > lo - 1) & (s < hi + 1)
        if not near.any():
            continue
        zi, ui, vi = s[near], u[near], v[near]
        ca, cr = cord_ap[near], cord_rl[near]
        sub = code[near]
        tex = np.zeros(zi.shape, np.float32)
        for kx, ky, kz, ph_ in les.wave:
            tex += np.cos(kx * x[near] + ky * y[near] + kz * z[near] + ph_)
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
    in_cyl = ((np.square(u) + np.square(v)) < 15.0**2) & (s > spec.conus_z) & (a < 40)
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
    ``(x_c(z) + u, y_c(z) + w, z)``, a shear of unit Jacobian, with ``step_mm`` across the cord and
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
        zr = np.arange(lo - 30, hi + 30, 0.5).astype(np.float32)
        c_ap, c_rl, cos = spec.lookup_many(("cord_ap", "cord_rl", "cos"), zr)
        r = (float(max(c_ap.max(), c_rl.max())) + 1.0) / float(max(cos.min(), 0.3))
        sin = float(np.sqrt(max(0.0, 1 - float(cos.min()) ** 2)))
        z = np.arange(lo - 2 - r * sin, hi + 2 + r * sin, dz) + dz / 2
        x_c, y_c = spec.lookup_many(("x_c", "y_c"), z.astype(np.float32))
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
