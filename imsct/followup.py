"""Follow-up of one patient across two visits: align, then report volume change and growth rate.

Volumes are measured on each visit's own grid (:func:`imsct.morphometrics.measure`), so they do not
depend on the registration. The registration (rigid, visit-2 T2w onto visit-1 T2w,
:func:`imsct.registration.register_rigid`) is used for what needs both visits in one space: the
overlap of each class after alignment and the components that are new at visit 2 or have vanished.

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

from .io import InputError, Volume, load_image, same_grid
from .labels import CLASSES, split_masks

DAYS_PER_YEAR = 365.25
CSV_COLUMNS = [
    "class", "volume_visit1_mm3", "volume_visit2_mm3", "change_mm3", "change_percent", "rate_mm3_per_year",
    "rate_percent_per_year_linear", "rate_percent_per_year_compound", "dice_after_alignment",
    "components_visit1", "components_visit2", "new_components", "vanished_components", "growth_note",
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
    from .metrics import detection_rates, dice
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
    mask1, mask2 = split_masks(v1.labelmap), split_masks(lab2_on_1)
    vox1 = v1.t2.voxel_volume_mm3
    classes = {}
    for name in CLASSES:
        c = growth(m1["classes"][name]["volume_mm3"], m2["classes"][name]["volume_mm3"], years)
        a, b = mask1[name] & seen, mask2[name]
        tpr, fpr, n1, n2 = detection_rates(b, a, vox1)
        c.update({
            "components_visit1": m1["classes"][name]["count"], "components_visit2": m2["classes"][name]["count"],
            "dice_after_alignment": dice(b, a),
            "vanished_components": 0 if n1 == 0 else int(round(n1 * (1 - tpr))),
            "new_components": 0 if n2 == 0 else int(round(n2 * fpr)),
        })
        classes[name] = c
    return {
        "visit1": {"t2": v1.t2.path, "labels": v1.seg, "date": v1.date.isoformat(), "voxel_size_mm": m1["voxel_size_mm"]},
        "visit2": {"t2": v2.t2.path, "labels": v2.seg, "date": v2.date.isoformat(), "voxel_size_mm": m2["voxel_size_mm"]},
        "days": days, "years": years,
        "rates": "linear (mm3/year, %/year of the visit-1 volume) and compound (annualised %/year)",
        "volumes": "measured on each visit's own grid; overlap and components after aligning visit 2 onto visit 1, "
                   "inside the part of visit 1's field that visit 2 covers",
        "visit1_field_covered": float(seen.mean()),
        "registration": registration,
        "classes": classes,
    }


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
    head = f"{'class':<12}{'V1 mm3':>11}{'V2 mm3':>11}{'change %':>10}{'mm3/yr':>10}{'%/yr lin':>10}{'%/yr comp':>10}{'Dice':>7}{'new':>5}{'gone':>5}"
    lines.append(head)
    for name, c in result["classes"].items():
        lines.append(
            f"{name:<12}{_fmt(c['volume_visit1_mm3']):>11}{_fmt(c['volume_visit2_mm3']):>11}{_fmt(c['change_percent']):>10}"
            f"{_fmt(c['rate_mm3_per_year']):>10}{_fmt(c['rate_percent_per_year_linear']):>10}"
            f"{_fmt(c['rate_percent_per_year_compound']):>10}{_fmt(c['dice_after_alignment'], 2):>7}"
            f"{c['new_components']:>5}{c['vanished_components']:>5}"
        )
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
