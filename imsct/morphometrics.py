"""Lesion morphometrics (what ``sct_analyze_lesion`` users expect), per class and per component.

Definitions (all in world millimetres, from the image's voxel-to-world affine, so anisotropic and
oblique grids are measured correctly):

- **Classes**: ``tumor`` (label 1), ``edema`` (2), ``cavity`` (3) and ``whole-tumor`` (any label).
- **Components**: 26-connected (face, edge or corner neighbours) voxels of one class, the same
  connectivity as post-processing (:func:`imsct.postprocess.remove_small`). Numbered 1.. per class
  from superior to inferior.
- **Volume**: voxel count x voxel volume (:func:`imsct.io.voxel_volume_mm3`), in mm3 and cm3.
- **Axis**: without a cord mask, the world superior axis (z). With a cord mask, the cord
  centreline: centroids of the cord in 2 mm horizontal slabs, smoothed over ~10 mm; a point's
  coordinate along it is the arc length at its height plus its horizontal offset projected on the
  local tangent (exact for a straight, tilted cord, first order for a curved one).
- **Superior-inferior length**: extent of the component's voxel centres along the axis, corrected
  for sampling: ``range * m / (m - 1)`` with ``m`` distinct positions along the axis. On a grid with
  slices perpendicular to the axis this is the number of slices x slice spacing (SCT's count);
  on an oblique grid, where positions are nearly continuous, it is the range. One position: the
  voxel's extent along the axis. Along a curved cord on thick slices the positions are continuous
  too, so the length can come out up to one slice shorter than the slice count.
- **Maximal equivalent diameter**: the largest over slabs perpendicular to the axis of
  ``2 * sqrt(area / pi)``, the area of a slab being the component's volume inside it divided by
  its thickness. Voxels count as boxes (their volume spread over their extent along the axis), so
  an oblique grid's layers of voxel centres do not alias into the areas; the slab is as thick as a
  voxel's extent along the axis, and at least 1 mm. On a grid with slices of 1 mm or more
  perpendicular to the axis this is the largest slice's area (SCT's per-slice area).
- **Centroid**: mean of the voxel centres, in voxel indices and world (RAS+) mm.
- **Vertebral levels**: levels whose height range overlaps the component's world-z range (voxel
  centres). A level spans from its body's top down to the top of the next body (body plus the disc
  below), as the phantoms' truth does. Given as ``{"vertebrae": [{"level", "z_top_mm",
  "z_bottom_mm"}, ...]}`` (a phantom's ``*_phantom.json`` works as is); ``None`` without it.
  Or, from a **level map** (``imsct segment``'s ``_seg-levels``, SCT's convention: each cord voxel
  valued by its vertebra's number, :mod:`imsct.levels`): the levels of the component's voxels, a
  voxel off the map taking the level of the nearest voxel on it.
- **Maximal axial damage ratio** (with a cord mask, as ``sct_analyze_lesion``): over slabs
  perpendicular to the cord axis, one voxel's extent thick, the largest share of the cord's
  cross-section (cord mask plus lesion) that the component takes.

Per-class rows: ``count`` (components), total volume, and the largest length and diameter over the
class's components, with the union of their levels.
"""

from __future__ import annotations

import csv
import io as _io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from .io import InputError, Volume, grid_difference, load_volume, strip_nifti_ext, voxel_volume_mm3, world, write_texts
from .labels import LABELMAP_SUFFIX, LABELS, SEG_SUFFIXES, STAGE2_CHANNELS, split_masks

CONNECTIVITY = np.ones((3, 3, 3), bool)  # 26-connectivity
SLAB_MIN_MM = 1.0
AREA_BIN_MM = 0.05  # resolution of the area profile along the axis
CENTRELINE_BIN_MM = 2.0
CENTRELINE_SMOOTH_MM = 10.0
CLASS_FIELDS = ("count", "volume_mm3", "volume_cm3", "length_si_mm", "max_equivalent_diameter_mm", "levels",
                "max_axial_damage_ratio")
CSV_COLUMNS = (
    "class", "component", "count", "volume_mm3", "volume_cm3", "length_si_mm", "max_equivalent_diameter_mm",
    "centroid_x_mm", "centroid_y_mm", "centroid_z_mm", "centroid_i", "centroid_j", "centroid_k", "levels",
    "max_axial_damage_ratio",
)


def extent_along(direction: np.ndarray, affine: np.ndarray) -> float:
    """Extent of one voxel (its box) along a unit direction, in mm."""
    return float(np.abs(np.asarray(direction, float) @ np.asarray(affine, float)[:3, :3]).sum())


# ---- the measuring axis ------------------------------------------------------------------------
class SuperiorAxis:
    """The world superior axis: coordinate = world z."""

    name = "world-superior"

    def coordinate(self, points: np.ndarray) -> np.ndarray:
        return points[:, 2]

    def tangent(self, z: float) -> np.ndarray:
        return np.array([0.0, 0.0, 1.0])


@dataclass
class CordAxis:
    """The cord centreline, as a function of world height (the cord runs superior-inferior)."""

    z: np.ndarray  # knot heights, increasing
    xy: np.ndarray  # (n, 2) centreline x, y at the knots
    d: np.ndarray  # (n, 2) dx/dz, dy/dz
    s: np.ndarray  # arc length at the knots
    name: str = "cord-centreline"

    @classmethod
    def from_mask(cls, cord: np.ndarray, affine: np.ndarray) -> "CordAxis":
        pts = world(np.argwhere(cord), affine)
        if len(pts) == 0:
            raise InputError("cord mask: it is empty (no voxel > 0)")
        lo = pts[:, 2].min()
        b = np.floor((pts[:, 2] - lo) / CENTRELINE_BIN_MM).astype(int)
        n = np.bincount(b)
        keep = n > 0
        z = (np.bincount(b, pts[:, 2])[keep] / n[keep])
        xy = np.stack([np.bincount(b, pts[:, i])[keep] / n[keep] for i in (0, 1)], axis=1)
        if len(z) < 3:
            raise InputError(f"cord mask: spans only {np.ptp(pts[:, 2]):.1f} mm superior-inferior; too short for a centreline")
        half = max(1, int(round(CENTRELINE_SMOOTH_MM / CENTRELINE_BIN_MM / 2)))
        xy = np.stack([_moving_average(xy[:, i], half) for i in (0, 1)], axis=1)
        d = np.stack([np.gradient(xy[:, i], z) for i in (0, 1)], axis=1)
        speed = np.sqrt(1.0 + (d**2).sum(1))
        s = np.concatenate([[0.0], np.cumsum(0.5 * (speed[1:] + speed[:-1]) * np.diff(z))])
        return cls(z=z, xy=xy, d=d, s=s)

    def _at(self, z: np.ndarray):
        xy = np.stack([np.interp(z, self.z, self.xy[:, i]) for i in (0, 1)], axis=1)
        d = np.stack([np.interp(z, self.z, self.d[:, i]) for i in (0, 1)], axis=1)
        s = np.interp(z, self.z, self.s)
        speed = np.sqrt(1.0 + (d**2).sum(1))
        # beyond the cord's ends: continue straight along the end tangent
        s = s + np.where(z < self.z[0], (z - self.z[0]) * speed, 0.0) + np.where(z > self.z[-1], (z - self.z[-1]) * speed, 0.0)
        xy = xy + np.where(z < self.z[0], z - self.z[0], 0.0)[:, None] * d + np.where(z > self.z[-1], z - self.z[-1], 0.0)[:, None] * d
        return xy, d, s, speed

    def coordinate(self, points: np.ndarray) -> np.ndarray:
        xy, d, s, speed = self._at(points[:, 2])
        return s + ((points[:, :2] - xy) * d).sum(1) / speed

    def tangent(self, z: float) -> np.ndarray:
        _, d, _, speed = self._at(np.array([float(z)]))
        return np.array([d[0, 0], d[0, 1], 1.0]) / speed[0]


def _moving_average(v: np.ndarray, half: int) -> np.ndarray:
    """Centred moving average, the window shrinking near the ends."""
    c = np.concatenate([[0.0], np.cumsum(v)])
    i = np.arange(len(v))
    lo, hi = np.maximum(i - half, 0), np.minimum(i + half + 1, len(v))
    return (c[hi] - c[lo]) / (hi - lo)


# ---- levels --------------------------------------------------------------------------------
def load_levels(path: str | os.PathLike) -> list[dict]:
    """Vertebral levels from a JSON with ``"vertebrae": [{"level", "z_top_mm", "z_bottom_mm"}]``."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"levels {p}: file not found")
    try:
        doc = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"levels {p}: not valid JSON ({exc})") from None
    return check_levels(doc.get("vertebrae") if isinstance(doc, dict) else doc, str(p))


def check_levels(levels, where: str = "levels") -> list[dict]:
    if not isinstance(levels, list) or not levels:
        raise InputError(f"levels {where}: expected a non-empty list 'vertebrae' of {{level, z_top_mm, z_bottom_mm}}")
    out = []
    for i, v in enumerate(levels):
        try:
            top, bottom = float(v["z_top_mm"]), float(v["z_bottom_mm"])
            out.append({"level": str(v["level"]), "z_top_mm": top, "z_bottom_mm": bottom})
        except (KeyError, TypeError, ValueError):
            raise InputError(f"levels {where}: entry {i} lacks level, z_top_mm or z_bottom_mm as numbers") from None
        if not np.isfinite([top, bottom]).all() or top < bottom:
            raise InputError(f"levels {where}: entry {i} ({out[-1]['level']}) has z_top_mm below z_bottom_mm")
    return sorted(out, key=lambda v: -v["z_top_mm"])


def levels_spanned(z_lo: float, z_hi: float, levels: list[dict] | None) -> list[str] | None:
    """Names of the levels (body plus the disc below) overlapping heights ``[z_lo, z_hi]``."""
    if levels is None:
        return None
    names = []
    for k, v in enumerate(levels):
        bottom = levels[k + 1]["z_top_mm"] if k + 1 < len(levels) else v["z_bottom_mm"]
        if z_hi >= bottom and z_lo <= v["z_top_mm"]:
            names.append(v["level"])
    return names


# ---- reading ---------------------------------------------------------------------------------
def _class_of(path: Path) -> str | None:
    """The class of a binary mask from its SCT suffix, ``"whole-tumor"``, or None for a label map."""
    stem = strip_nifti_ext(path.name)
    for name, suffix in sorted(SEG_SUFFIXES.items(), key=lambda kv: -len(kv[1])):
        if stem.endswith(suffix):
            return name
    return None


def read_labelmap(paths: list[str]):
    """One label map (0..3) from a label map, or from binary masks named ``*_seg-tumor`` /
    ``*_seg-edema`` / ``*_seg-cavity``, all on one grid: ``(labelmap, affine, base)`` where ``base``
    is the first file's path without its extension and SCT suffix."""
    if not paths:
        raise InputError("label map: no file given")
    labelmap = affine = first = None
    owner: dict[int, Path] = {}
    for raw in paths:
        p = Path(raw)
        cls = _class_of(p)
        if cls == "whole-tumor":
            raise InputError(f"mask {p}: the whole tumour is the union of the classes; give the label map or the "
                             "tumor / edema / cavity masks instead")
        role = "label map" if cls is None else f"{cls} mask"
        vol = load_volume(p, role)
        data = vol.data
        top = max(LABELS.values()) if cls is None else 1
        if not np.array_equal(data, np.round(data)) or data.min() < 0 or data.max() > top:
            raise InputError(f"{role} {p}: values must be integers from 0 to {top} "
                             f"(found {float(data.min()):g} to {float(data.max()):g})")
        if labelmap is None:
            labelmap, affine, first = np.zeros(vol.shape, np.uint8), vol.affine, p
        elif diff := grid_difference(vol, Volume(labelmap, affine)):
            raise InputError(f"{p}: grid differs from {first}'s ({diff}); all inputs must be on one grid")
        values = data.astype(np.uint8) if cls is None else (data > 0).astype(np.uint8) * LABELS[cls]
        overlap = (labelmap > 0) & (values > 0)
        if overlap.any():
            other = owner.get(int(labelmap[overlap][0]), first)
            raise InputError(f"{p}: {int(overlap.sum())} voxels are also labelled in {other}; classes must not overlap")
        labelmap[values > 0] = values[values > 0]
        for v in np.unique(values[values > 0]):
            owner[int(v)] = p
    name = strip_nifti_ext(first.name)
    for suffix in (LABELMAP_SUFFIX, *SEG_SUFFIXES.values()):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return labelmap, affine, first.parent / name


# ---- measuring -------------------------------------------------------------------------------
def max_slab_area(s: np.ndarray, direction: np.ndarray, affine: np.ndarray, vox_mm3: float) -> float:
    """Largest volume per mm along the axis (mm2) of voxels at axis coordinates ``s``, each voxel
    spread as a box (its projection on ``direction``: three uniform widths convolved), over slabs as
    thick as a voxel's extent along the axis and at least :data:`SLAB_MIN_MM`."""
    widths = np.abs(np.asarray(affine, float)[:3, :3].T @ np.asarray(direction, float))
    kernel = np.ones(1)
    for w in widths:
        kernel = np.convolve(kernel, np.ones(max(1, int(round(w / AREA_BIN_MM)))))
    kernel /= kernel.sum()
    slab = max(int(round(max(widths.sum(), SLAB_MIN_MM) / AREA_BIN_MM)), 1)
    counts = np.bincount(np.floor((s - s.min()) / AREA_BIN_MM).astype(int))
    density = np.convolve(counts.astype(float), kernel)  # voxels per bin, boxes spread
    per_slab = np.convolve(density, np.ones(slab))  # voxels per slab, every slab position
    return float(per_slab.max() * vox_mm3 / (slab * AREA_BIN_MM))


def _component(idx: np.ndarray, affine: np.ndarray, axis, vox_mm3: float) -> dict:
    pts = world(idx, affine)
    centroid_vox = idx.mean(0)
    centroid = world(centroid_vox[None], affine)[0]
    s = axis.coordinate(pts)
    step = extent_along(axis.tangent(centroid[2]), affine)
    positions = np.unique(np.round(s, 3))
    m = len(positions)
    length = step if m == 1 else float(np.ptp(s)) * m / (m - 1)
    area = max_slab_area(s, axis.tangent(centroid[2]), affine, vox_mm3)
    return {
        "volume_mm3": len(idx) * vox_mm3,
        "volume_cm3": len(idx) * vox_mm3 / 1000.0,
        "length_si_mm": float(length),
        "max_equivalent_diameter_mm": float(2.0 * np.sqrt(area / np.pi)),
        "centroid_world_mm": [float(v) for v in centroid],
        "centroid_voxel": [float(v) for v in centroid_vox],
        "z_range_mm": [float(pts[:, 2].min()), float(pts[:, 2].max())],
    }


def _map_levels(level_map: np.ndarray, lesions: np.ndarray) -> np.ndarray | None:
    """The level map extended to every lesion voxel (nearest voxel on the map), on the lesions'
    bounding box; None when the map holds no level there."""
    idx = np.argwhere(lesions)
    if len(idx) == 0 or not level_map.any():
        return None
    lo, hi = np.maximum(idx.min(0) - 20, 0), np.minimum(idx.max(0) + 21, lesions.shape)
    sub = level_map[tuple(slice(a, b) for a, b in zip(lo, hi))]
    if not sub.any():
        return None
    _, nearest = ndimage.distance_transform_edt(sub == 0, return_indices=True)
    out = np.zeros(level_map.shape, level_map.dtype)
    out[tuple(slice(a, b) for a, b in zip(lo, hi))] = sub[tuple(nearest)]
    return out


def _damage_ratio(s_lesion: np.ndarray, s_cord: np.ndarray, slab_mm: float) -> float:
    """Largest share of the cord's voxels that the lesion's take, over slabs of the axis coordinate."""
    lo = min(s_lesion.min(), s_cord.min())
    b_les = np.floor((s_lesion - lo) / slab_mm).astype(int)
    b_cord = np.bincount(np.floor((s_cord - lo) / slab_mm).astype(int), minlength=b_les.max() + 1)
    n_les = np.bincount(b_les, minlength=b_cord.size)
    ok = b_cord > 0
    return float(np.clip(n_les[ok] / b_cord[ok], 0, 1).max()) if ok.any() else float("nan")


def measure(labelmap: np.ndarray, affine: np.ndarray, levels: list[dict] | None = None, cord: np.ndarray | None = None,
            level_map: np.ndarray | None = None) -> dict:
    """Morphometrics of a label map (0 background, 1 tumour, 2 edema, 3 cavity); see the module
    docstring for the definitions. ``levels``: list of ``{"level", "z_top_mm", "z_bottom_mm"}``;
    ``cord``: binary cord mask on the same grid (measure along its centreline, and the damage
    ratio); ``level_map``: SCT level numbers on the same grid (instead of ``levels``)."""
    labelmap = np.asarray(labelmap)
    affine = np.asarray(affine, float)
    if labelmap.ndim != 3:
        raise InputError(f"label map: expected 3D, got shape {labelmap.shape}")
    top = max(LABELS.values())
    if labelmap.size and (labelmap.min() < 0 or labelmap.max() > top):
        raise InputError(f"label map: values must be 0 (background) to {top}, found {labelmap.min()} to {labelmap.max()}")
    if levels is not None:
        levels = check_levels(levels)
    if level_map is not None and np.shape(level_map) != labelmap.shape:
        raise InputError(f"level map: shape {np.shape(level_map)} differs from the label map's {labelmap.shape}")
    cord_s = None
    if cord is not None:
        if np.shape(cord) != labelmap.shape:
            raise InputError(f"cord mask: shape {np.shape(cord)} differs from the label map's {labelmap.shape}")
        axis = CordAxis.from_mask(np.asarray(cord) > 0, affine)
        cord_s = axis.coordinate(world(np.argwhere((np.asarray(cord) > 0) | (labelmap > 0)), affine))
    else:
        axis = SuperiorAxis()
    from .levels import level_name, level_number

    mapped = _map_levels(np.asarray(level_map), labelmap > 0) if level_map is not None else None
    vox = voxel_volume_mm3(affine)
    masks = split_masks(labelmap)
    classes, components = {}, []
    for name in STAGE2_CHANNELS:
        lab, _ = ndimage.label(masks[name], structure=CONNECTIVITY)
        comps = []
        for k, sl in enumerate(ndimage.find_objects(lab), 1):
            if sl is None:
                continue
            idx = np.argwhere(lab[sl] == k) + np.array([s.start for s in sl])
            c = _component(idx, affine, axis, vox)
            if mapped is not None:
                numbers = np.unique(mapped[tuple(idx.T)])
                c["level_numbers"] = [int(v) for v in numbers if v > 0]
            c["max_axial_damage_ratio"] = None
            if cord_s is not None:
                s_les = axis.coordinate(world(idx, affine))
                slab = max(extent_along(axis.tangent(c["centroid_world_mm"][2]), affine), SLAB_MIN_MM)
                c["max_axial_damage_ratio"] = _damage_ratio(s_les, cord_s, slab)
            comps.append(c)
        comps.sort(key=lambda c: -c["centroid_world_mm"][2])  # superior first
        for i, c in enumerate(comps, 1):
            if mapped is not None:
                c["levels"] = [level_name(v) for v in c.pop("level_numbers")]
            elif level_map is not None:
                c["levels"] = []
            else:
                c["levels"] = levels_spanned(*c["z_range_mm"], levels)
            components.append({"class": name, "index": i, **c})
        if level_map is not None:
            union = sorted({v for c in comps for v in c["levels"]}, key=level_number)
        else:
            union = [lv["level"] for lv in levels if any(lv["level"] in c["levels"] for c in comps)] if levels is not None else None
        ratios = [c["max_axial_damage_ratio"] for c in comps if c["max_axial_damage_ratio"] is not None]
        total = int(masks[name].sum()) * vox
        classes[name] = {
            "count": len(comps),
            "volume_mm3": float(total),
            "volume_cm3": float(total) / 1000.0,
            "length_si_mm": max((c["length_si_mm"] for c in comps), default=0.0),
            "max_equivalent_diameter_mm": max((c["max_equivalent_diameter_mm"] for c in comps), default=0.0),
            "levels": union,
            "max_axial_damage_ratio": (max(ratios) if ratios else (0.0 if cord is not None else None)),
        }
    return {
        "classes": classes,
        "components": components,
        "axis": axis.name,
        "connectivity": 26,
        "voxel_volume_mm3": vox,
        "voxel_size_mm": [float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(0))],
    }


# ---- writing ---------------------------------------------------------------------------------
def rows(result: dict) -> list[dict]:
    """CSV rows: one per component, then one total row per class (``component`` = ``all``)."""
    out = []

    def fmt_levels(lv):
        return "" if lv is None else ";".join(lv)

    def fmt_ratio(r):
        return "" if r is None else round(r, 4)

    for c in result["components"]:
        out.append({
            "class": c["class"], "component": c["index"], "count": 1,
            **{k: round(c[k], 4) for k in ("volume_mm3", "volume_cm3", "length_si_mm", "max_equivalent_diameter_mm")},
            **{f"centroid_{a}_mm": round(v, 3) for a, v in zip("xyz", c["centroid_world_mm"])},
            **{f"centroid_{a}": round(v, 3) for a, v in zip("ijk", c["centroid_voxel"])},
            "levels": fmt_levels(c["levels"]), "max_axial_damage_ratio": fmt_ratio(c.get("max_axial_damage_ratio")),
        })
    for name, c in result["classes"].items():
        out.append({
            "class": name, "component": "all", "count": c["count"],
            **{k: round(c[k], 4) for k in ("volume_mm3", "volume_cm3", "length_si_mm", "max_equivalent_diameter_mm")},
            "levels": fmt_levels(c["levels"]), "max_axial_damage_ratio": fmt_ratio(c.get("max_axial_damage_ratio")),
        })
    return out


def write_tables(result: dict, out_prefix: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``<prefix>.csv`` and ``<prefix>.json`` together (all or nothing)."""
    prefix = str(out_prefix)
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, restval="")
    w.writeheader()
    w.writerows(rows(result))
    csv_path, json_path = Path(prefix + ".csv"), Path(prefix + ".json")
    write_texts([(buf.getvalue(), csv_path), (json.dumps(result, indent=1) + "\n", json_path)])
    return csv_path, json_path


__all__ = ["measure", "write_tables", "load_levels", "read_labelmap", "levels_spanned", "CordAxis", "SuperiorAxis", "CONNECTIVITY"]
