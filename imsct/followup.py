"""Follow-up of one patient across two visits: align, then report volume change and growth rate.

Volumes are measured on each visit's own grid (:func:`imsct.morphometrics.measure`), so they do not
depend on the registration. The registration (rigid, visit-2 T2w onto visit-1 T2w,
:func:`imsct.registration.register_rigid`) is used for what needs both visits in one space: the
overlap of each class after alignment and the matching of lesions.

Lesions (:func:`match_lesions`): the components of each class are counted on each visit's own grid
(26-connected, as :mod:`imsct.morphometrics` counts them) and matched across visits by their overlap
in world space, each voxel taken as the box it samples. Resampling visit 2's labels onto visit 1's
grid and counting there would not do: on thick slices a lesion breaks into pieces (an edema read
"new 3" with one component at visit 2) and the part of a grown lesion beyond its old outline came
out as new ones (a cavity that only grew read "new 2"). Components that share enough volume are
one lesion, and a lesion is the connected group of its components at both visits, so a lesion in
two pieces on one grid and one on the other is matched (``split`` / ``merged``); an unchanged or
grown lesion overlaps its old self and is never new. New / vanished: components that overlap
nothing at the other visit, inside its field.

Growth rates, with ``t`` the time between the visits in years (days / 365.25):

* linear: ``(V2 - V1) / t`` in mm3/year, and ``100 (V2 - V1) / V1 / t`` in %/year;
* compound (annualised): ``100 ((V2 / V1) ** (1 / t) - 1)`` in %/year, the constant yearly rate
  that turns V1 into V2 (for a lesion growing exponentially, it is the same whatever the interval).

Where V1 is 0 (no lesion of that class at visit 1, or at either visit) the relative numbers are not
computable: they are reported as missing (``null`` in JSON, empty in CSV, ``n/a`` on the console)
with the reason in ``growth_note``; the absolute change and mm3/year are still given.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io as _io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io import InputError, Volume, _voxel_sizes, load_image, same_grid, voxel_volume_mm3
from .labels import CLASSES, WHOLE, split_masks

DAYS_PER_YEAR = 365.25
CSV_COLUMNS = [
    "class", "volume_visit1_mm3", "volume_visit2_mm3", "change_mm3", "change_percent", "rate_mm3_per_year",
    "rate_percent_per_year_linear", "rate_percent_per_year_compound", "dice_after_alignment",
    "components_visit1", "components_visit2", "matched_lesions", "new_components", "vanished_components",
    "outside_field_visit1", "outside_field_visit2", "growth_note",
]


@dataclass
class Visit:
    t2: Volume
    labelmap: np.ndarray
    date: _dt.date
    seg: str  # the label map's (or first mask's) path, for messages


def parse_date(text: str, where: str) -> _dt.date:
    """A date from ``YYYY-MM-DD`` or an ISO date-time (BIDS ``acq_time``, ``AcquisitionDateTime``)."""
    s = str(text).strip()
    try:
        return _dt.date.fromisoformat(s[:10])
    except ValueError:
        raise InputError(f"{where}: {s!r} is not a date (expected YYYY-MM-DD or YYYY-MM-DDThh:mm:ss)") from None


def visit_date(t2_path: str | os.PathLike) -> _dt.date:
    """The acquisition date of a T2w from its BIDS sidecar JSON (``AcquisitionDateTime`` or
    ``AcquisitionDate``) or, failing that, from ``sub-XXX_sessions.tsv`` (``acq_time`` of its
    ``ses-YY``)."""
    p = Path(t2_path)
    name = p.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    sidecar = p.with_name(name + ".json")
    if sidecar.exists():
        try:
            meta = json.loads(sidecar.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"sidecar {sidecar}: cannot be read as JSON ({exc})") from None
        for key in ("AcquisitionDateTime", "AcquisitionDate"):
            if meta.get(key):
                return parse_date(meta[key], f"sidecar {sidecar} ({key})")
    ses = next((q for q in p.parents if q.name.startswith("ses-")), None)
    if ses is not None and ses.parent.name.startswith("sub-"):
        sub = ses.parent.name
        table = ses.parent / f"{sub}_sessions.tsv"
        ses = ses.name
        if table.exists():
            with open(table, newline="") as fh:
                for row in csv.DictReader(fh, delimiter="\t"):
                    if row.get("session_id") == ses and row.get("acq_time") not in (None, "", "n/a"):
                        return parse_date(row["acq_time"], f"sessions table {table} ({ses})")
    raise InputError(f"T2w {p}: no acquisition date (no AcquisitionDateTime in {sidecar.name}, no acq_time in a "
                     "sessions.tsv); give the dates with --dates")


def load_visit(t2_path: str | os.PathLike, seg_paths: list[str], date: str | _dt.date | None = None) -> Visit:
    """Read one visit: its T2w, its label map (or tumor/edema/cavity masks) on the T2w's grid, and
    its date (given, or read with :func:`visit_date`)."""
    from .morphometrics import read_labelmap

    t2 = load_image(t2_path, "T2w")
    labelmap, affine, _ = read_labelmap(list(seg_paths))
    if not same_grid((labelmap.shape, affine), t2):
        raise InputError(f"label map {seg_paths[0]}: not on its T2w's grid ({t2_path}): shape {labelmap.shape} vs "
                         f"{t2.shape}, or the affines differ; give the label map that was segmented from this T2w")
    if date is None:
        day = visit_date(t2_path)
    elif isinstance(date, _dt.date):
        day = date
    else:
        day = parse_date(date, f"date of {t2_path}")
    return Visit(t2=t2, labelmap=labelmap, date=day, seg=str(seg_paths[0]))


def growth(v1: float, v2: float, years: float) -> dict:
    """Change and growth rates of one volume between two visits ``years`` apart (see module doc)."""
    change = v2 - v1
    out = {
        "volume_visit1_mm3": v1, "volume_visit2_mm3": v2, "change_mm3": change,
        "change_percent": None, "rate_mm3_per_year": change / years,
        "rate_percent_per_year_linear": None, "rate_percent_per_year_compound": None,
    }
    if v1 > 0:
        out["change_percent"] = 100.0 * change / v1
        out["rate_percent_per_year_linear"] = out["change_percent"] / years
        out["rate_percent_per_year_compound"] = 100.0 * ((v2 / v1) ** (1.0 / years) - 1.0)
        out["growth_note"] = ""
    elif v2 > 0:
        out["growth_note"] = "relative growth not computable: volume 0 at visit 1 (a new lesion at visit 2)"
    else:
        out["growth_note"] = "relative growth not computable: no lesion at either visit (volume 0 at both)"
    return out


def compare_visits(v1: Visit, v2: Visit, register: bool = True) -> dict:
    """Volume change, growth rates and (after rigid alignment of visit 2 onto visit 1) overlap and
    new / vanished components per class. Visit 2 must be later than visit 1."""
    from .geometry import field_overlap, to_working
    from .metrics import dice
    from .morphometrics import measure

    days = (v2.date - v1.date).days
    if days <= 0:
        what = "the same day as" if days == 0 else "before"
        raise InputError(f"T2w {v2.t2.path}: visit 2 ({v2.date}) is {what} visit 1 ({v1.date}, {v1.t2.path}); "
                         "give the visits in time order with distinct dates")
    years = days / DAYS_PER_YEAR
    m1, m2 = measure(v1.labelmap, v1.t2.affine), measure(v2.labelmap, v2.t2.affine)

    registration: dict = {"registered": False}
    to_v1 = np.eye(4)
    if register:
        from .registration import register_rigid

        to_v1, info = register_rigid(v1.t2, v2.t2)
        registration = {"registered": True, "moving_to_fixed_ras": to_v1.tolist(), **info}
    moved = to_v1 @ v2.t2.affine
    lab2_on_1 = to_working(v2.labelmap, moved, v1.t2.shape, v1.t2.affine, label=True)
    seen = field_overlap(v2.t2.shape, moved, v1.t2.shape, v1.t2.affine).numpy()
    mask1, mask2, own2 = split_masks(v1.labelmap), split_masks(lab2_on_1), split_masks(v2.labelmap)
    classes = {}
    for name in CLASSES:
        c = growth(m1["classes"][name]["volume_mm3"], m2["classes"][name]["volume_mm3"], years)
        c["dice_after_alignment"] = dice(mask2[name], mask1[name] & seen)
        # lesions: counted on each visit's own grid, matched by overlap in world space
        c.update(match_lesions(mask1[name], v1.t2.affine, own2[name], moved, mask1[WHOLE], own2[WHOLE]))
        classes[name] = c
    return {
        "visit1": {"t2": v1.t2.path, "labels": v1.seg, "date": v1.date.isoformat(), "voxel_size_mm": m1["voxel_size_mm"]},
        "visit2": {"t2": v2.t2.path, "labels": v2.seg, "date": v2.date.isoformat(), "voxel_size_mm": m2["voxel_size_mm"]},
        "days": days, "years": years,
        "rates": "linear (mm3/year, %/year of the visit-1 volume) and compound (annualised %/year)",
        "volumes": "measured on each visit's own grid; Dice after aligning visit 2 onto visit 1, inside the part of "
                   "visit 1's field that visit 2 covers",
        "lesions": "components counted on each visit's own grid and matched across visits by their overlap in world "
                   f"space (voxels as boxes; at least {MATCH_FRACTION:.0%} of the smaller one shared): new and vanished "
                   "are components matched by none at the other visit, inside its field",
        "visit1_field_covered": float(seen.mean()),
        "registration": registration,
        "classes": classes,
    }


# ----------------------------------------------------------------------------- lesions across visits

MATCH_FRACTION = 0.1  # two components are one lesion when they share this much of the smaller one's volume
COMMON_STEP_MM = 0.4  # finest spacing of the common grid the overlaps are counted on
COMMON_MAX_VOXELS = 20_000_000


def components(mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of ``mask`` on its own grid, numbered 1.. from superior to inferior
    (the numbering of :func:`imsct.morphometrics.measure`'s component rows)."""
    from scipy import ndimage

    from .morphometrics import CONNECTIVITY

    lab, n = ndimage.label(mask, structure=CONNECTIVITY)
    if n < 2:
        return lab.astype(np.int32), n
    centres = np.asarray(ndimage.center_of_mass(mask, lab, range(1, n + 1)), np.float64)
    z = centres @ np.asarray(affine, np.float64)[2, :3] + affine[2, 3]
    order = np.argsort(-z, kind="stable")  # superior first
    lut = np.zeros(n + 1, np.int32)
    lut[order + 1] = np.arange(1, n + 1)
    return lut[lab], n


def _common_grid(lo: np.ndarray, hi: np.ndarray, affine1: np.ndarray, affine2: np.ndarray):
    """A grid that subdivides visit 1's voxels ``[lo, hi)`` (index box) into sub-voxels no coarser
    than the finer of the two grids (and :data:`COMMON_STEP_MM`): its shape, affine and the
    subdivision per axis."""
    s1, s2 = _voxel_sizes(affine1), _voxel_sizes(affine2)
    step = max(float(min(s1.min(), s2.min())), COMMON_STEP_MM)
    n = hi - lo
    while True:
        sub = np.maximum(1, np.ceil(s1 / step - 1e-6)).astype(int)
        shape = tuple(int(v) for v in n * sub)
        if np.prod(shape, dtype=np.int64) <= COMMON_MAX_VOXELS or np.all(sub == 1):
            break
        step *= 1.25
    t = np.eye(4)
    t[:3, :3] = np.diag(1.0 / sub)
    t[:3, 3] = lo - 0.5 + 0.5 / sub  # sub-voxel centres inside visit 1's voxel boxes
    return shape, np.asarray(affine1, np.float64) @ t, sub


def _on_common(lab1, affine1, lab2, affine2, box, grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Visit 1's and visit 2's integer maps on the common grid (boxes: a sub-voxel takes the value
    of the voxel it lies in) and the mask of its sub-voxels inside visit 2's field."""
    from .geometry import resample, shifted

    (lo, hi), (shape, affine, sub) = box, grid
    v1 = lab1[tuple(slice(a, b) for a, b in zip(lo, hi))]
    for axis, k in enumerate(sub):
        v1 = np.repeat(v1, k, axis=axis)
    field2 = resample(np.ones(lab2.shape, np.float32), affine2, shape, affine, mode="nearest").numpy() > 0.5
    nz = np.argwhere(lab2 > 0)
    if nz.size == 0:
        return v1, np.zeros(shape, lab2.dtype), field2
    lo2, hi2 = nz.min(0), nz.max(0) + 1
    crop = lab2[tuple(slice(a, b) for a, b in zip(lo2, hi2))].astype(np.float32)
    v2 = np.rint(resample(crop, shifted(affine2, lo2), shape, affine, mode="nearest").numpy()).astype(lab2.dtype)
    return v1, v2, field2


def match_lesions(mask1: np.ndarray, affine1: np.ndarray, mask2: np.ndarray, affine2: np.ndarray,
                  within1: np.ndarray | None = None, within2: np.ndarray | None = None) -> dict:
    """Components of each visit counted on its own grid and matched by their overlap in world space.

    ``affine2`` maps visit 2's voxels into visit 1's world (after alignment). Voxels count as the
    boxes they sample: the overlap is measured on a common grid that subdivides visit 1's voxels
    into sub-voxels no coarser than the finer grid (:func:`_common_grid`); a sub-voxel takes the
    component of the visit-1 voxel it lies in and of the visit-2 voxel holding its centre. Two
    components are one lesion when they share at least :data:`MATCH_FRACTION` of the smaller one's
    volume (inside both fields); lesions are the connected groups of matched components, so a
    lesion in two pieces on one grid and one on the other is one lesion (``split`` / ``merged``).

    An unmatched component is ``new`` (visit 2) or ``vanished`` (visit 1) unless it is

    * ``outside the other visit's field`` (no part of it inside): counted in ``outside_field_visit1``
      (visit-1 components visit 2 did not image) / ``outside_field_visit2``;
    * ``too small to match``: smaller than a voxel of the other grid or than
      :data:`imsct.metrics.DETECTION_MIN_OVERLAP_MM3`, a partial-volume speck the other grid cannot
      show (``too_small_visit1`` / ``_visit2``);
    * ``inside a known lesion``: it overlaps the other visit's ``within`` mask (the whole tumour, for
      a class): a lesion whose make-up changed, e.g. tumour grown into what was edema, is not a new
      lesion (``inside_known_lesion_visit1`` / ``_visit2``).
    """
    from .geometry import covering_box
    from .metrics import DETECTION_MIN_OVERLAP_MM3

    lab1, n1 = components(mask1, affine1)
    lab2, n2 = components(mask2, affine2)
    w1 = np.asarray(mask1 if within1 is None else within1, bool)
    w2 = np.asarray(mask2 if within2 is None else within2, bool)
    # both visits' maps in one array each: component id * 2 + (inside the 'within' mask)
    code1, code2 = lab1.astype(np.int64) * 2 + w1, lab2.astype(np.int64) * 2 + w2
    overlap = np.zeros((n1 + 1, n2 + 1))
    near1, near2 = np.zeros(n1 + 1), np.zeros(n2 + 1)  # volume inside the other visit's 'within' mask
    shape1 = np.asarray(mask1.shape)
    boxes = []
    if (code1 > 0).any():
        idx = np.argwhere(code1 > 0)
        boxes.append((idx.min(0), idx.max(0) + 1))
    if (code2 > 0).any():
        idx = np.argwhere(code2 > 0)
        boxes.append(covering_box(idx.min(0), idx.max(0) + 1, affine2, tuple(shape1), affine1))
    if boxes:
        lo = np.clip(np.min([b[0] for b in boxes], axis=0), 0, shape1)
        hi = np.clip(np.max([b[1] for b in boxes], axis=0), 0, shape1)
        if np.all(hi > lo):
            grid = _common_grid(lo, hi, affine1, affine2)
            c1, c2, field2 = _on_common(code1, affine1, code2, affine2, (lo, hi), grid)
            both = field2.ravel()
            c1, c2 = c1.ravel()[both], c2.ravel()[both]
            sub_mm3 = voxel_volume_mm3(grid[1])
            i, j = c1 // 2, c2 // 2
            overlap = np.bincount(i * (n2 + 1) + j, minlength=(n1 + 1) * (n2 + 1)).reshape(n1 + 1, n2 + 1) * sub_mm3
            near1 = np.bincount(i[c2 % 2 == 1], minlength=n1 + 1) * sub_mm3
            near2 = np.bincount(j[c1 % 2 == 1], minlength=n2 + 1) * sub_mm3
    in1, in2 = overlap.sum(axis=1), overlap.sum(axis=0)  # each component's volume inside both fields
    linked = (overlap[1:, 1:] > 0) & (overlap[1:, 1:] >= MATCH_FRACTION * np.minimum.outer(in1[1:], in2[1:]))
    # lesions: the connected groups of the bipartite graph of linked components
    parent = list(range(n1 + n2))

    def root(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(*np.nonzero(linked)):
        parent[root(int(a))] = root(n1 + int(b))
    groups: dict[int, tuple[list, list]] = {}
    for x in range(n1 + n2):
        g = groups.setdefault(root(x), ([], []))
        (g[0] if x < n1 else g[1]).append(x + 1 if x < n1 else x - n1 + 1)
    vol1 = np.bincount(lab1.ravel(), minlength=n1 + 1) * voxel_volume_mm3(affine1)
    vol2 = np.bincount(lab2.ravel(), minlength=n2 + 1) * voxel_volume_mm3(affine2)
    small1 = max(voxel_volume_mm3(affine2), DETECTION_MIN_OVERLAP_MM3)  # below this, visit 2 could not show a visit-1 component
    small2 = max(voxel_volume_mm3(affine1), DETECTION_MIN_OVERLAP_MM3)
    counts = dict.fromkeys(("new", "vanished", "outside_field_visit1", "outside_field_visit2", "too_small_visit1",
                            "too_small_visit2", "inside_known_lesion_visit1", "inside_known_lesion_visit2"), 0)
    lesions = []
    for g1, g2 in sorted(groups.values(), key=lambda g: (min(g[0] or [n1 + 1]), min(g[1] or [n2 + 1]))):
        entry = {"visit1": g1, "visit2": g2, "visit1_mm3": [round(float(vol1[i]), 3) for i in g1],
                 "visit2_mm3": [round(float(vol2[j]), 3) for j in g2], "overlap_mm3": 0.0}
        if g1 and g2:
            kind = "matched" if len(g1) == len(g2) == 1 else "split" if len(g1) == 1 else "merged" if len(g2) == 1 else "split and merged"
            entry["overlap_mm3"] = round(float(overlap[np.ix_(g1, g2)].sum()), 3)
        else:
            v, own, inside, near, small = (2, g2[0], in2, near2, small2) if g2 else (1, g1[0], in1, near1, small1)
            vol = vol2 if g2 else vol1
            if inside[own] == 0:
                kind, key = f"outside visit {3 - v}'s field", f"outside_field_visit{v}"
            elif vol[own] < small:
                kind, key = "too small to match", f"too_small_visit{v}"
            elif near[own] > 0:
                kind, key = "inside a known lesion", f"inside_known_lesion_visit{v}"
            else:
                kind = key = "new" if g2 else "vanished"
            counts[key] += 1
        entry["kind"] = kind
        lesions.append(entry)
    return {"components_visit1": n1, "components_visit2": n2,
            "matched_lesions": sum(1 for e in lesions if e["visit1"] and e["visit2"]),
            "new_components": counts.pop("new"), "vanished_components": counts.pop("vanished"), **counts, "lesions": lesions}


def _fmt(v, nd=1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{nd}f}"


def table(result: dict) -> str:
    """A short console table of the comparison."""
    lines = [f"visit 1 {result['visit1']['date']} -> visit 2 {result['visit2']['date']}: {result['years']:.2f} years"]
    reg = result["registration"]
    if reg.get("registered"):
        lines.append(f"registration: rigid, {reg.get('metric')} {reg.get('metric_value', float('nan')):.3f}, {reg.get('seconds', 0):.1f} s")
    head = (f"{'class':<12}{'V1 mm3':>11}{'V2 mm3':>11}{'change %':>10}{'mm3/yr':>10}{'%/yr lin':>10}{'%/yr comp':>10}{'Dice':>7}"
            f"{'same':>5}{'new':>5}{'gone':>5}")
    lines.append(head)
    for name, c in result["classes"].items():
        lines.append(
            f"{name:<12}{_fmt(c['volume_visit1_mm3']):>11}{_fmt(c['volume_visit2_mm3']):>11}{_fmt(c['change_percent']):>10}"
            f"{_fmt(c['rate_mm3_per_year']):>10}{_fmt(c['rate_percent_per_year_linear']):>10}"
            f"{_fmt(c['rate_percent_per_year_compound']):>10}{_fmt(c['dice_after_alignment'], 2):>7}"
            f"{c['matched_lesions']:>5}{c['new_components']:>5}{c['vanished_components']:>5}"
        )
    lines.append("same: lesions found at both visits (matched by overlap, each counted on its own grid); new / gone: at one visit only")
    for name, c in result["classes"].items():
        if c.get("growth_note"):
            lines.append(f"{name}: {c['growth_note']}")
    return "\n".join(lines)


def write_report(result: dict, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``compare.json`` and ``compare.csv`` in ``out_dir``, written together (all or nothing)."""
    from .io import write_texts

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out}: exists and is not a folder")
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
    w.writeheader()
    for name, c in result["classes"].items():
        w.writerow({"class": name, **{k: ("" if c[k] is None else c[k]) for k in CSV_COLUMNS[1:]}})
    json_path, csv_path = out / "compare.json", out / "compare.csv"
    write_texts([(json.dumps(result, indent=1) + "\n", json_path), (buf.getvalue(), csv_path)])
    return json_path, csv_path
