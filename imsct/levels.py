"""Vertebral levels from the image: discs found by the anatomy network, numbered, and a level map.

Conventions are the Spinal Cord Toolbox's (``sct_label_vertebrae``), so that its users read our
files as theirs:

- **Levels** are numbered from the top: C1 = 1 ... C7 = 7, T1 = 8 ... T12 = 19, L1 = 20 ... L5 = 24,
  S1 = 25. The level map (``<T2w name>_seg-levels.nii.gz``) holds, on every voxel of the spinal cord
  mask, the number of the vertebra at that height; 0 elsewhere and where the level is unknown.
- **Discs** are numbered by the vertebra below them: 3 = C2/C3, 8 = C7/T1. A disc label file
  (``_label-discs``) holds one voxel per disc, on the cord centreline, valued by that number.

How levels are found (:func:`find_levels`): the anatomy network's disc probability is split into
components; each is projected onto the cord centreline (nearest point). Discs are then numbered,
in this order of trust:

1. **a disc given by the user** (a label file with one voxel valued by its number, as SCT's
   ``-initlabel``): the detected disc nearest to it along the cord takes its number;
2. **the top of the column**: when the cord continues for at least :data:`HEADROOM_MM` (and 1.5
   of the top three disc gaps) above the highest disc without another disc, and the gaps below it are cervical
   (at most :data:`CERVICAL_GAP_MAX_MM`), that disc is C2/C3, the highest disc there is (C1 and C2
   have none between them, and the skull base lies above);
3. **the conus**: when the cord ends inside the field (at least :data:`CONUS_MARGIN_MM` above the
   field's lower edge), the lowest disc above its tip is taken as T12/L1 (the conus lies at L1 in
   most adults, T12 to L2 in nearly all): uncertain by a level;
4. **spacing**: otherwise the gaps between discs are matched to :data:`TYPICAL_GAP_MM`, the
   typical adult disc-to-disc distances. A weak cue, reported as uncertain.

Between two consecutive detected discs a gap much longer than the others (a disc the network
missed) advances the numbering by the number of discs that fit in it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .io import world as to_world

LEVEL_NAMES: tuple[str, ...] = (
    *(f"C{i}" for i in range(1, 8)), *(f"T{i}" for i in range(1, 13)), *(f"L{i}" for i in range(1, 6)),
    *(f"S{i}" for i in range(1, 6)),
)

CERVICAL_GAP_MAX_MM = 24.0  # disc-to-disc distance below C2/C3 (C3 body + disc: 18-21 mm in adults)
HEADROOM_MM = 32.0  # cord above the highest disc that marks it as C2/C3 (C2 body + dens: about 40 mm)
MAX_DISC_DISTANCE_MM = 45.0  # a disc's centre lies in front of the cord: 15-30 mm from the centreline
MIN_DISC_MM3 = 150.0  # smaller disc components are noise or discs cut by the field edge (a cervical disc: ~1500 mm3)
MERGE_MM = 10.0  # disc components closer than this along the cord are one disc (discs lie 15 mm or more apart)
CENTRELINE_SMOOTH_MM = 10.0
MISSED_GAP_FACTOR = 1.6  # a gap this many times the expected one holds a missed disc
CONUS_MARGIN_MM = 15.0  # the cord ending this far above the field's lower edge ends there (the conus)
CONUS_DISC = 20  # T12/L1: the disc just above the conus tip
MIN_RELATIVE_DISC = 1.0 / 3.0  # adjacent discs differ in volume by well under this factor along the column
TOP_CLEAR_MM = 25.0  # C2/C3, the highest disc, lies 35 mm or more below the cord's upper end (C1, C2 and the dens)

# Typical adult distance (mm) from disc n to disc n + 1 (the height of vertebra n plus its disc),
# keyed by disc number: cervical ~18, thoracic rising from ~23 to ~33, lumbar ~37.
TYPICAL_GAP_MM: dict[int, float] = {
    **{n: 18.0 for n in range(3, 8)},
    **{7 + i: 22.0 + 0.9 * i for i in range(1, 13)},
    **{19 + i: 37.0 for i in range(1, 6)},
}


def level_number(name: str) -> int:
    """SCT's number of a vertebra name (``"C2"`` -> 2, ``"T1"`` -> 8, ``"L1"`` -> 20)."""
    try:
        return LEVEL_NAMES.index(str(name).upper()) + 1
    except ValueError:
        raise ValueError(f"unknown vertebral level {name!r}; expected one of C1-C7, T1-T12, L1-L5, S1-S5") from None


def level_name(number: int) -> str:
    """The vertebra name of an SCT level number (2 -> ``"C2"``)."""
    if not 1 <= int(number) <= len(LEVEL_NAMES):
        raise ValueError(f"level number {number}: expected 1 to {len(LEVEL_NAMES)}")
    return LEVEL_NAMES[int(number) - 1]


def disc_label_of(vertebra_above: str) -> int:
    """SCT's number of the disc below ``vertebra_above`` (``"C2"`` -> 3, the C2/C3 disc)."""
    return level_number(vertebra_above) + 1


def disc_name(label: int) -> str:
    """``3`` -> ``"C2/C3"``."""
    return f"{level_name(int(label) - 1)}/{level_name(int(label))}"


@dataclass
class Centreline:
    """The cord's centreline on a grid whose first axis points superiorly (the working grid): one
    point per slice that holds cord, smoothed, in world mm, with the arc length (mm, increasing
    superiorly) at each."""

    slices: np.ndarray  # (n,) first-axis index of each point
    world: np.ndarray  # (n, 3)
    arc: np.ndarray  # (n,)

    @classmethod
    def from_mask(cls, cord: np.ndarray, affine: np.ndarray) -> "Centreline | None":
        cord = np.asarray(cord) > 0
        rows = np.flatnonzero(cord.any(axis=(1, 2)))
        if rows.size < 2:
            return None
        ijk = np.zeros((rows.size, 3))
        for n, i in enumerate(rows):
            jk = np.argwhere(cord[i])
            ijk[n] = (i, *jk.mean(0))
        step = float(np.linalg.norm(affine[:3, 0]))
        width = max(1, int(round(CENTRELINE_SMOOTH_MM / max(step, 1e-6))))
        ijk[:, 1:] = ndimage.uniform_filter1d(ijk[:, 1:], size=width, axis=0, mode="nearest")
        points = to_world(ijk, affine)
        arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
        return cls(rows, points, arc)

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For world points ``(m, 3)``: the index of the nearest centreline point, its arc length,
        and the distance (mm)."""
        d = np.linalg.norm(np.asarray(points, float)[:, None, :] - self.world[None], axis=2)
        idx = d.argmin(axis=1)
        return idx, self.arc[idx], d[np.arange(len(idx)), idx]

    def arc_at_slice(self, i: np.ndarray) -> np.ndarray:
        return np.interp(np.asarray(i, float), self.slices.astype(float), self.arc)


@dataclass
class Disc:
    world: np.ndarray  # on the cord centreline (mm)
    arc_mm: float
    label: int = 0  # SCT disc number, 0 until numbered
    volume_mm3: float = 0.0


@dataclass
class Levels:
    """What :func:`find_levels` found: the discs (top first, numbered), how they were numbered and
    the level map on the grid of the cord mask."""

    discs: list[Disc]
    method: str  # "user", "top of column", "spacing", or "none"
    certain: bool
    level_map: np.ndarray
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "method": self.method, "certain": self.certain, "notes": list(self.notes),
            "discs": [{"label": d.label, "name": disc_name(d.label) if d.label >= 2 else None,
                       "world_mm": [round(float(v), 2) for v in d.world]} for d in self.discs],
            "levels": [level_name(v) for v in np.unique(self.level_map) if v > 0],  # in level order (np.unique sorts numbers)
        }


def _region(region: tuple | None, shape) -> tuple[np.ndarray, np.ndarray]:
    """``(lo, hi)`` voxel corners of the part of a grid the network looked at (all of it by default)."""
    if region is None:
        return np.zeros(3, int), np.asarray(shape[:3], int)
    return np.asarray(region[0], int), np.asarray(region[1], int)


def detect_discs(disc_prob: np.ndarray, affine: np.ndarray, centreline: Centreline, threshold: float = 0.5,
                 region: tuple | None = None) -> list[Disc]:
    """Disc components of a probability map (any grid), projected onto the cord centreline; top
    first. Components too small, too far from the cord, or beyond the cord's ends are dropped;
    components closer than :data:`MERGE_MM` along the cord are merged; then a disc smaller than
    :data:`MIN_RELATIVE_DISC` of the median of its (up to) three nearest along the cord is dropped
    (a fragment, or the atlanto-axial joint or skull base taken for a disc), unless it touches the
    edge of ``region`` (``(lo, hi)`` voxel corners where the network looked, default the whole
    grid), where a real disc can be cut."""
    affine = np.asarray(affine, float)
    vox = float(abs(np.linalg.det(affine[:3, :3])))
    lab, n = ndimage.label(np.asarray(disc_prob) > threshold, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return []
    counts = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    keep = np.flatnonzero(counts * vox >= MIN_DISC_MM3) + 1
    if keep.size == 0:
        return []
    lo, hi = _region(region, lab.shape)
    bounds = ndimage.find_objects(lab)
    at_edge = {int(k): any(sl.start <= a or sl.stop >= b for sl, a, b in zip(bounds[k - 1], lo, hi)) for k in keep}
    centres = np.asarray(ndimage.center_of_mass(np.ones(lab.shape), lab, keep))
    idx, arc, dist = centreline.project(to_world(centres, affine))
    last = len(centreline.arc) - 1
    found = [(Disc(centreline.world[i], float(a), volume_mm3=float(counts[k - 1] * vox)), at_edge[int(k)])
             for i, a, d, k in zip(idx, arc, dist, keep) if d <= MAX_DISC_DISTANCE_MM and 0 < i < last]
    found.sort(key=lambda f: -f[0].arc_mm)
    merged: list[tuple[Disc, bool]] = []
    for d, edge in found:
        if merged and merged[-1][0].arc_mm - d.arc_mm < MERGE_MM:
            a, a_edge = merged[-1]
            w = a.volume_mm3 + d.volume_mm3
            merged[-1] = (Disc((a.world * a.volume_mm3 + d.world * d.volume_mm3) / w,
                               (a.arc_mm * a.volume_mm3 + d.arc_mm * d.volume_mm3) / w, volume_mm3=w), a_edge or edge)
        else:
            merged.append((d, edge))
    arcs = np.array([d.arc_mm for d, _ in merged])
    vols = np.array([d.volume_mm3 for d, _ in merged])
    out = []
    for k, (d, edge) in enumerate(merged):
        near = np.argsort(np.abs(arcs - arcs[k]))[1:4]
        if edge or near.size == 0 or d.volume_mm3 >= MIN_RELATIVE_DISC * float(np.median(vols[near])):
            out.append(d)
    return out


def _steps(arcs: np.ndarray, first_label: int) -> list[int]:
    """Numbers for discs at ``arcs`` (top first) from the first one's number: +1 per disc, more
    across a gap that holds missed discs."""
    labels = [int(first_label)]
    scale = _scale(arcs, first_label)
    for a, b in zip(arcs[:-1], arcs[1:]):
        expected = TYPICAL_GAP_MM.get(labels[-1], 25.0) * scale
        labels.append(labels[-1] + max(1, int(round((a - b) / expected))) if (a - b) > MISSED_GAP_FACTOR * expected
                      else labels[-1] + 1)
    return labels


def _scale(arcs: np.ndarray, first_label: int) -> float:
    """The subject's size relative to the typical gaps (median ratio of observed to typical)."""
    gaps = -np.diff(arcs)
    if gaps.size == 0:
        return 1.0
    ref = np.array([TYPICAL_GAP_MM.get(first_label + i, 25.0) for i in range(gaps.size)])
    return float(np.clip(np.median(gaps / ref), 0.8, 1.25))


def _fit_spacing(arcs: np.ndarray) -> int:
    """The number of the highest disc whose typical gaps best match the observed ones."""
    gaps = -np.diff(arcs)
    best, best_cost = 3, np.inf
    for first in range(3, 25):
        ref = np.array([TYPICAL_GAP_MM.get(first + i, np.nan) for i in range(gaps.size)])
        if np.isnan(ref).any():
            break
        ratio = gaps / ref
        s = np.median(ratio)
        cost = float(np.mean(np.square(ratio / s - 1.0))) + (0.0 if 0.8 <= s <= 1.25 else 1.0)
        if cost < best_cost - 1e-9:
            best, best_cost = first, cost
    return best


def number_discs(discs: list[Disc], centreline: Centreline, user: tuple[np.ndarray, int] | None = None,
                 conus: bool = False) -> tuple[str, bool, list[str]]:
    """Give each disc (top first) its SCT number in place; returns (method, certain, notes).
    ``conus``: the centreline's lower end is the conus (the cord ends inside the field)."""
    notes: list[str] = []
    if not discs:
        return "none", False, ["no intervertebral disc found along the cord"]
    arcs = np.array([d.arc_mm for d in discs])
    if user is not None:
        point, label = user
        _, (arc,), (dist,) = centreline.project(np.asarray(point, float)[None])
        k = int(np.abs(arcs - arc).argmin())
        if abs(arcs[k] - arc) > 10.0 or dist > MAX_DISC_DISTANCE_MM:
            notes.append(f"the given disc {disc_name(label)} is {abs(arcs[k] - arc):.0f} mm along the cord from the nearest detected disc")
        below = _steps(arcs[k:], label)
        above = [label - (len(arcs[: k + 1]) - 1 - j) for j in range(k)]  # one per disc upwards
        for d, n in zip(discs, above + below):
            d.label = n
        method, certain = "user", True
    else:
        gaps = -np.diff(arcs)
        headroom = float(centreline.arc[-1] - arcs[0])
        # the spacing at the top (cervical there), not the whole field's (thoracic in a long one)
        top_gap = float(np.median(gaps[:3])) if gaps.size else 0.0
        needed = max(HEADROOM_MM, 1.5 * top_gap)
        cervical = top_gap <= CERVICAL_GAP_MAX_MM
        if headroom >= needed and cervical:
            first, method, certain = 3, "top of column", True
        elif conus:
            relative = _steps(arcs, 0)
            first, method, certain = CONUS_DISC - relative[-1], "conus", False
            notes.append("levels numbered from the conus (taken at L1), which may be off by a level; "
                         "give one disc with --disc-label")
        else:
            first, method, certain = _fit_spacing(arcs), "spacing", False
            notes.append("the field does not reach the top of the column (C2): levels numbered by disc spacing, "
                         "which is uncertain; give one disc with --disc-label")
        for d, n in zip(discs, _steps(arcs, first)):
            d.label = n
    if any(d.label < 2 or d.label > len(LEVEL_NAMES) for d in discs):
        notes.append("some discs numbered outside C2/C3 to S: check --disc-label")
        for d in discs:
            d.label = int(np.clip(d.label, 2, len(LEVEL_NAMES)))
    return method, certain, notes


def level_map(cord: np.ndarray, affine: np.ndarray, centreline: Centreline, discs: list[Disc]) -> np.ndarray:
    """SCT level numbers on the cord voxels of a grid whose first axis points superiorly: between
    disc n and the next one below lies vertebra n; above the highest disc its vertebra (number - 1)
    and below the lowest its vertebra, each for one typical gap; 0 beyond (unknown)."""
    out = np.zeros(np.shape(cord), np.uint8)
    if not discs:
        return out
    arcs = np.array([d.arc_mm for d in discs])
    labels = np.array([d.label for d in discs])
    rows = np.flatnonzero(np.asarray(cord).any(axis=(1, 2)))
    arc_rows = centreline.arc_at_slice(rows)
    s = _scale(arcs, int(labels[0]))
    for i, a in zip(rows, arc_rows):
        if a > arcs[0]:
            value = labels[0] - 1 if a - arcs[0] <= TYPICAL_GAP_MM.get(labels[0] - 1, 25.0) * s * 1.2 else 0
        else:
            k = int(np.flatnonzero(arcs >= a)[-1])
            value = labels[k] if (k + 1 < len(arcs) or arcs[k] - a <= TYPICAL_GAP_MM.get(labels[k], 25.0) * s * 1.2) else 0
        out[i][np.asarray(cord[i]) > 0] = value
    return out


def find_levels(cord: np.ndarray, disc_prob: np.ndarray, affine: np.ndarray, user: tuple[np.ndarray, int] | None = None,
                threshold: float = 0.5, region: tuple | None = None) -> Levels:
    """Discs, their numbers and the level map from a cord mask and a disc probability map on one
    grid whose first axis points superiorly (the cascade's working grid). ``user``: ``(world
    point, disc number)`` of one disc the user identified. ``region``: ``(lo, hi)`` voxel corners
    of the part of the grid the network looked at (default: all of it); the cord ends inside the
    field at either end only when it stops :data:`CONUS_MARGIN_MM` short of that part's edge.

    Where the cord's upper end lies inside the field (the top of the column is there), detections
    less than :data:`TOP_CLEAR_MM` below it are dropped: no disc lies between C1 and C2."""
    centreline = Centreline.from_mask(cord, affine)
    if centreline is None:
        return Levels([], "none", False, np.zeros(np.shape(cord), np.uint8), ["no spinal cord: no levels"])
    lo, hi = _region(region, np.shape(cord))
    discs = detect_discs(disc_prob, affine, centreline, threshold, (lo, hi))
    step = float(np.linalg.norm(np.asarray(affine)[:3, 0]))
    conus = (centreline.slices[0] - lo[0]) * step >= CONUS_MARGIN_MM
    notes: list[str] = []
    if (hi[0] - 1 - centreline.slices[-1]) * step >= CONUS_MARGIN_MM:
        below = [d for d in discs if centreline.arc[-1] - d.arc_mm >= TOP_CLEAR_MM]
        if len(below) < len(discs):
            notes.append(f"{len(discs) - len(below)} disc-like detection(s) less than {TOP_CLEAR_MM:.0f} mm below the cord's upper end "
                         "ignored (C1 and C2 have no disc between them)")
            discs = below
    method, certain, more = number_discs(discs, centreline, user, conus)
    return Levels(discs, method, certain, level_map(cord, affine, centreline, discs), notes + more)


def read_disc_label(data: np.ndarray, affine: np.ndarray, where: str) -> tuple[np.ndarray, int]:
    """The one disc of a user's label image (a voxel, or a small blob, valued by the disc number):
    its world centre and number. Raises ValueError naming ``where`` if it holds none or several
    numbers, or a number that is not a disc (2 = C1/C2 is not one: C1 and C2 have no disc)."""
    values = np.unique(np.rint(np.asarray(data)).astype(int))
    values = values[values != 0]
    if values.size != 1:
        found = "no label" if values.size == 0 else f"labels {', '.join(map(str, values[:6]))}"
        raise ValueError(f"disc label {where}: expected one disc valued by its number (3 = C2/C3), found {found}")
    label = int(values[0])
    if not 3 <= label <= len(LEVEL_NAMES):
        raise ValueError(f"disc label {where}: value {label} is not a disc number (3 = C2/C3 to {len(LEVEL_NAMES)})")
    ijk = np.argwhere(np.rint(np.asarray(data)) == label).mean(0)
    return to_world(ijk[None], affine)[0], label


__all__ = ["LEVEL_NAMES", "TYPICAL_GAP_MM", "level_number", "level_name", "disc_label_of", "disc_name", "Centreline",
           "Disc", "Levels", "detect_discs", "number_discs", "level_map", "find_levels", "read_disc_label"]
