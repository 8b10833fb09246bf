"""Quality-control report: one offline HTML page over many subjects.

For each subject the page shows sagittal mosaics of the T2w and the T1w (resampled onto the T2w
grid, so the overlays line up) with the label map drawn in the colours of :data:`imsct.labels.COLOURS`,
the lesion morphometrics, and pass / fail buttons plus a comment box. The reviewer's marks live in
the browser's ``localStorage`` under the report's id and can be exported as JSON
(``{subject: {"qc": "pass" | "fail" | null, "comment": "..."}}``) or imported again.

Labels: a label map (0 background, 1 tumour, 2 edema, 3 cavity, ``*_seg-imsct``) or the three
SCT-named class masks (``*_seg-tumor``, ``*_seg-edema``, ``*_seg-cavity``), on the T2w grid.

Layout of a report folder::

    index.html   report.js   report.css   report.json   img/<subject>_{t2,t1}[_plain].png

Regenerating a report into the same folder keeps its id (read from ``report.json``), so the marks a
reviewer already set stay attached to their subjects; a mark set on a label map that has changed
since (its SHA-256 differs) is shown as *stale* and exported with ``"stale": true``. A folder that
is not empty and holds no imsct QC report is refused unless ``force`` is given, and even then only
the report's own files are written.

Display: sagittal slices in radiological convention (superior up, anterior left), pixels square in
millimetres (the voxel sizes set the aspect), intensity window from percentiles of the displayed
region. Axes are brought to that order by flips and transposes of the T2w voxel grid (no
interpolation); an oblique acquisition is shown along its nearest voxel axes, as viewers do.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

import nibabel as nib
import numpy as np

from .io import InputError, Volume, load_volume, replace_atomically, same_grid, strip_nifti_ext, write_text_atomically
from .labels import COLOURS, LABELS, SEG_SUFFIXES

GENERATOR = "imsct qc"
ALPHA = 0.4  # opacity of the label fill; the outline is drawn opaque
TILE_HEIGHT = 640  # pixels of the superior-inferior extent of one tile (at most)
TILE_WIDTH = 240  # pixels of the anterior-posterior extent of one tile (at most)
MIN_MM_PER_PIXEL = 0.25  # no finer: small fields are not blown up past this
MAX_TILES = 8
MARGIN_SI_MM = 25.0
MARGIN_AP_MM = 20.0
MIN_CROP_MM = (80.0, 50.0)  # smallest SI x AP field shown around a lesion
PERCENTILES = (0.5, 99.5)
ASSETS = Path(__file__).with_name("qc_assets")
DISPLAY_AXES = ("R", "I", "P")  # slice axis left->right, rows superior->inferior, columns anterior->posterior


@dataclass
class Subject:
    """One entry of the report. ``morphometrics`` (the dict of :func:`imsct.morphometrics.measure`)
    is computed from the label map when not given."""

    id: str
    t2: Path
    seg: Path | list[Path]  # a label map, or the SCT-named masks *_seg-tumor / _seg-edema / _seg-cavity
    t1: Path | None = None
    morphometrics: dict | None = None
    levels: list[dict] | None = None  # vertebral levels for the morphometrics ({"level", "z_top_mm", "z_bottom_mm"})
    note: str = ""  # shown under the subject's title (e.g. "T1w not found: ...")


@dataclass
class Mosaic:
    """Rendered sagittal mosaic of one contrast: RGB arrays with and without the overlay."""

    overlay: np.ndarray
    plain: np.ndarray
    tiles: list[dict] = field(default_factory=list)  # per tile: slice index, x0, width, height


# ----------------------------------------------------------------------------- rendering


def to_display(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorder a volume to (sagittal slice R, row I, column P) by flips and transposes only.

    Returns the array, the voxel sizes along those axes and the ``ornt`` transform used."""
    ornt = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt(DISPLAY_AXES)
    )
    out = nib.orientations.apply_orientation(data, ornt)
    sizes_in = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    sizes = np.zeros(3)
    for i in range(3):
        sizes[int(ornt[i, 0])] = sizes_in[i]
    return out, sizes, ornt


def _source_index(ornt: np.ndarray, shape_in: tuple[int, ...], k: int) -> int:
    """Index along the T2w file's own axis of display slice ``k``."""
    src = int(np.nonzero(ornt[:, 0] == 0)[0][0])
    return shape_in[src] - 1 - k if ornt[src, 1] < 0 else k


def choose_view(lab: np.ndarray, sizes: np.ndarray) -> tuple[list[int], tuple[slice, slice]]:
    """Slices (display axis 0) and the row/column crop shown: every slice through the lesion plus
    one on each side (at most MAX_TILES, evenly spread), cropped to the lesion with a margin; the
    central slices and the whole field when the label map is empty."""
    n, rows, cols = lab.shape
    fg = lab > 0
    if not fg.any():
        centre = n // 2
        first = max(0, centre - 2)
        picks = list(range(first, min(n, first + 5)))
        return picks, (slice(0, rows), slice(0, cols))
    ks = np.nonzero(fg.any(axis=(1, 2)))[0]
    lo, hi = max(0, int(ks.min()) - 1), min(n - 1, int(ks.max()) + 1)
    picks = list(range(lo, hi + 1))
    if len(picks) > MAX_TILES:
        picks = sorted({int(round(v)) for v in np.linspace(lo, hi, MAX_TILES)})
    crop = []
    for axis, margin, min_mm in ((1, MARGIN_SI_MM, MIN_CROP_MM[0]), (2, MARGIN_AP_MM, MIN_CROP_MM[1])):
        other = (0, 2) if axis == 1 else (0, 1)
        idx = np.nonzero(fg.any(axis=other))[0]
        size = lab.shape[axis]
        mm = sizes[axis]
        half = max((idx.max() - idx.min() + 1) * mm / 2 + margin, min_mm / 2) / mm
        centre = (idx.min() + idx.max()) / 2
        a, b = int(np.floor(centre - half)), int(np.ceil(centre + half)) + 1
        if a < 0:
            a, b = 0, min(size, b - a)
        if b > size:
            a, b = max(0, a - (b - size)), size
        crop.append(slice(a, b))
    return picks, (crop[0], crop[1])


def window(values: np.ndarray) -> tuple[float, float]:
    """Display window from percentiles of the non-zero voxels (all voxels if none is non-zero)."""
    v = values[values != 0] if np.any(values != 0) else values.ravel()
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(v, PERCENTILES)
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def _outline(lab: np.ndarray) -> np.ndarray:
    """Label pixels with a 4-neighbour of another value (the boundary of each class)."""
    edge = np.zeros(lab.shape, bool)
    edge[1:, :] |= lab[1:, :] != lab[:-1, :]
    edge[:-1, :] |= lab[:-1, :] != lab[1:, :]
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    return edge & (lab > 0)


def render_mosaic(image: np.ndarray, labelmap: np.ndarray, affine: np.ndarray, view=None) -> Mosaic:
    """Sagittal mosaic of ``image`` with ``labelmap`` drawn on it (both on the grid of ``affine``).

    ``view`` (slices, crop) as returned by :func:`choose_view` on the display-ordered label map;
    chosen from the label map when None, so that every contrast of a subject shows the same view."""
    from PIL import Image, ImageDraw, ImageFont

    img, sizes, ornt = to_display(np.asarray(image, np.float32), affine)
    lab, _, _ = to_display(np.asarray(labelmap), affine)
    lab = np.rint(lab).astype(np.uint8)
    picks, (rs, cs) = view if view is not None else choose_view(lab, sizes)
    region = img[picks][:, rs, cs]
    lo, hi = window(region)
    rows, cols = region.shape[1:]
    mmpp = max(rows * sizes[1] / TILE_HEIGHT, cols * sizes[2] / TILE_WIDTH, MIN_MM_PER_PIXEL)
    height = max(1, int(round(rows * sizes[1] / mmpp)))
    width = max(1, int(round(cols * sizes[2] / mmpp)))
    gap = 4
    total_w = len(picks) * width + (len(picks) - 1) * gap
    overlay = np.zeros((height, total_w, 3), np.uint8)
    plain = np.zeros_like(overlay)
    colours = {value: np.asarray(COLOURS[name], np.float32) for name, value in LABELS.items()}
    font = ImageFont.load_default()
    tiles = []
    for t, k in enumerate(picks):
        grey = (np.clip((img[k][rs, cs] - lo) / (hi - lo), 0, 1) * 255).astype(np.float32)
        grey = np.asarray(Image.fromarray(grey).resize((width, height), Image.Resampling.BILINEAR))
        tl = np.asarray(Image.fromarray(lab[k][rs, cs]).resize((width, height), Image.Resampling.NEAREST))
        rgb = np.repeat(np.clip(grey, 0, 255)[..., None], 3, axis=2)
        p = rgb.copy()
        edge = _outline(tl)
        for value, colour in colours.items():
            m = tl == value
            rgb[m] = (1 - ALPHA) * rgb[m] + ALPHA * colour
            rgb[m & edge] = colour
        x0 = t * (width + gap)
        overlay[:, x0 : x0 + width] = np.rint(rgb).astype(np.uint8)
        plain[:, x0 : x0 + width] = np.rint(p).astype(np.uint8)
        tiles.append({"slice": _source_index(ornt, image.shape, k), "x0": x0, "width": width, "height": height})
    # captions: the slice index in the file, orientation letters on the first tile
    out = []
    for arr in (overlay, plain):
        im = Image.fromarray(arr)
        draw = ImageDraw.Draw(im)
        for tile in tiles:
            draw.text((tile["x0"] + 3, height - 14), f"#{tile['slice']}", fill=(255, 255, 0), font=font)
        draw.text((width // 2 - 3, 2), "S", fill=(255, 255, 0), font=font)
        draw.text((3, height // 2 - 6), "A", fill=(255, 255, 0), font=font)
        out.append(np.asarray(im))
    return Mosaic(overlay=out[0], plain=out[1], tiles=tiles)


def _save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    replace_atomically(path, lambda out: Image.fromarray(array).save(out, format="PNG", compress_level=6))


def _seg_files(seg) -> list[Path]:
    return [Path(p) for p in seg] if isinstance(seg, (list, tuple)) else [Path(seg)]


def load_labelmap(seg, t2: Volume) -> np.ndarray:
    """A label map (0..3) on the T2w grid from a label map or SCT-named class masks, or an
    InputError naming the file."""
    from .morphometrics import read_labelmap

    files = _seg_files(seg)
    lab, affine, _ = read_labelmap(files)
    if not same_grid((lab.shape, affine), t2):
        raise InputError(
            f"label map {files[0]}: its grid (shape {lab.shape}) differs from the T2w {t2.path} (shape {t2.shape}); "
            "QC needs the labels on the T2w grid (as imsct segment and sct_deepseg write them)"
        )
    return lab


def render_subject(subject: Subject, img_dir: Path, key: str) -> dict:
    """Write the subject's PNG files; returns what the page needs (image names, morphometrics, sizes)."""
    from .geometry import resample_image

    t2 = load_volume(subject.t2, "T2w")
    lab = load_labelmap(subject.seg, t2)
    dlab, sizes, _ = to_display(lab, t2.affine)
    view = choose_view(dlab, sizes)
    images = {}
    contrasts = [("t2", "T2w", t2.data)]
    if subject.t1 is not None:
        t1 = load_volume(subject.t1, "T1w")
        contrasts.append(("t1", "T1w", resample_image(t1.data, t1.affine, t2.shape, t2.affine).numpy()))
    for short, title, data in contrasts:
        mosaic = render_mosaic(data, lab, t2.affine, view)
        names = {"overlay": f"{key}_{short}.png", "plain": f"{key}_{short}_plain.png"}
        _save_png(mosaic.overlay, img_dir / names["overlay"])
        _save_png(mosaic.plain, img_dir / names["plain"])
        images[short] = {"title": title, **names, "width": int(mosaic.overlay.shape[1]), "height": int(mosaic.overlay.shape[0]),
                         "slices": [t["slice"] for t in mosaic.tiles]}
    morpho = subject.morphometrics
    if morpho is None:
        from .morphometrics import measure

        morpho = measure(lab, t2.affine, levels=subject.levels)
    return {"images": images, "morphometrics": morpho, "fingerprint": fingerprint(_seg_files(subject.seg))}


def fingerprint(paths: list[Path]) -> str:
    """Short SHA-256 of the label files' bytes: a mark set on other labels is flagged stale."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- subjects


def subject_id(t2: Path) -> str:
    """``sub-001_ses-01`` for ``sub-001_ses-01_T2w.nii.gz`` (the file name without ``_T2w``)."""
    name = strip_nifti_ext(Path(t2).name)
    return name[: -len("_T2w")] if name.endswith("_T2w") and len(name) > 4 else name


def _file_key(sid: str, used: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", sid).strip("._") or "subject"
    key, n = base, 1
    while key.lower() in used:
        n += 1
        key = f"{base}-{n}"
    used.add(key.lower())
    return key


def subjects_from_dataset(dataset_dir: str | Path, segs_dir: str | Path) -> list[Subject]:
    """Every T2w of a BIDS folder with its T1w (if present) and its labels in ``segs_dir``: the
    label map ``<T2w name>_seg-imsct.nii.gz`` that ``imsct segment`` writes or, without it, the
    masks ``<T2w name>_seg-{tumor,edema,cavity}.nii.gz`` (the names of SCT's ``sct_deepseg``)."""
    from .bids import find_cases
    from .labels import output_paths

    segs = Path(segs_dir)
    if not segs.is_dir():
        raise InputError(f"label map folder {segs}: not found or not a folder")
    cases = find_cases(dataset_dir)
    if not cases:
        raise InputError(f"dataset folder {dataset_dir}: no sub-*/[ses-*/]anat/*_T2w.nii[.gz] found")
    subjects, missing = [], []
    for case in cases:
        seg = output_paths(case.name, segs)["labelmap"]
        if not seg.exists() and seg.with_name(seg.name[: -len(".gz")]).exists():
            seg = seg.with_name(seg.name[: -len(".gz")])
        if not seg.exists():
            masks = _sct_masks(case.name, segs)
            if masks:
                seg = masks
            else:
                missing.append((case.name, seg))
        t1 = case.t1 if case.t1.exists() else None
        note = "" if t1 is not None else f"T1w not found: {case.t1}"
        subjects.append(Subject(id=subject_id(case.t2), t2=case.t2, seg=seg, t1=t1, note=note))
    if missing:
        more = f" ({len(missing) - 1} more subject(s) lack a label map)" if len(missing) > 1 else ""
        raise InputError(f"label map {missing[0][1]}: file not found for {missing[0][0]} (nor its "
                         f"{'/'.join(SEG_SUFFIXES[n] for n in LABELS)} masks){more}")
    return subjects


def _sct_masks(case_name: str, segs: Path) -> list[Path] | None:
    """The three SCT-named class masks of a case, when all are there."""
    found = []
    for name in LABELS:
        for ext in (".nii.gz", ".nii"):
            p = segs / f"{case_name}{SEG_SUFFIXES[name]}{ext}"
            if p.exists():
                found.append(p)
                break
        else:
            return None
    return found


def subjects_from_lists(t2s: list, segs: list, t1s: list | None = None) -> list[Subject]:
    """Subjects from explicit, parallel lists of files (T1w optional)."""
    if len(segs) != len(t2s):
        raise InputError(f"--seg: {len(segs)} label map(s) for {len(t2s)} T2w image(s); give one per T2w, in the same order")
    if t1s is not None and len(t1s) != len(t2s):
        raise InputError(f"--t1: {len(t1s)} T1w image(s) for {len(t2s)} T2w image(s); give one per T2w, in the same order")
    subjects = []
    for i, (t2, seg) in enumerate(zip(t2s, segs)):
        t1 = Path(t1s[i]) if t1s is not None else None
        for role, p in (("T2w", Path(t2)), ("label map", Path(seg)), ("T1w", t1)):
            if p is not None and not p.is_file():
                raise InputError(f"{role} {p}: file not found")
        subjects.append(Subject(id=subject_id(Path(t2)), t2=Path(t2), seg=Path(seg), t1=t1))
    return subjects


# ----------------------------------------------------------------------------- page


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _num(v, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    try:
        return f"{float(v):.{digits}f}"
    except (TypeError, ValueError):
        return _e(v)


def _levels(levels) -> str:
    if not levels:
        return "–"
    if isinstance(levels, dict):
        parts = []
        for k, v in levels.items():
            parts.append(f"{_e(k)} {_num(v) if isinstance(v, (int, float)) else _e(v)}")
        return ", ".join(parts)
    if isinstance(levels, (list, tuple)):
        return ", ".join(_e(x) for x in levels)
    return _e(levels)


MORPHO_COLUMNS = (
    ("count", "lesions", 0),
    ("volume_mm3", "volume (mm³)", 1),
    ("length_si_mm", "SI length (mm)", 1),
    ("max_equivalent_diameter_mm", "max. equiv. diameter (mm)", 1),
)


def morphometrics_table(morpho: dict | None) -> str:
    classes = (morpho or {}).get("classes") or {}
    if not classes:
        return '<p class="muted">No morphometrics.</p>'
    head = "".join(f"<th>{_e(t)}</th>" for _, t, _ in MORPHO_COLUMNS)
    rows = []
    for name, vals in classes.items():
        colour = COLOURS.get(name)
        swatch = f'<span class="sw" style="background:rgb{colour}"></span>' if colour else ""
        cells = "".join(f"<td>{_num(vals.get(k), d)}</td>" for k, _, d in MORPHO_COLUMNS)
        rows.append(f"<tr><th scope=\"row\">{swatch}{_e(name)}</th>{cells}<td class=\"lv\">{_levels(vals.get('levels'))}</td></tr>")
    table = (f'<table class="morpho"><thead><tr><th>class</th>{head}<th>vertebral levels</th></tr></thead>'
             f"<tbody>{''.join(rows)}</tbody></table>")
    comps = (morpho or {}).get("components") or []
    if comps:
        crow = "".join(
            f"<tr><th scope=\"row\">{_e(c.get('class', ''))} {_e(c.get('index', ''))}</th>"
            + "".join(f"<td>{_num(c.get(k), d)}</td>" for k, _, d in MORPHO_COLUMNS[1:])
            + f"<td class=\"lv\">{_levels(c.get('levels'))}</td></tr>"
            for c in comps
        )
        chead = "".join(f"<th>{_e(t)}</th>" for _, t, _ in MORPHO_COLUMNS[1:])
        table += (f'<details class="components"><summary>{len(comps)} component(s)</summary><table class="morpho">'
                  f"<thead><tr><th>component</th>{chead}<th>vertebral levels</th></tr></thead><tbody>{crow}</tbody></table></details>")
    return table


def _entry_html(index: int, subject: Subject, info: dict | None, error: str | None) -> str:
    sid = _e(subject.id)
    paths = [("T2w", subject.t2), ("T1w", subject.t1)] + [("labels", p) for p in _seg_files(subject.seg)]
    files = "".join(f"<div><b>{r}</b> {_e(p)}</div>" for r, p in paths if p is not None)
    parts = [
        f'<section class="subject" id="s{index}" data-subject="{sid}" data-fp="{_e((info or {}).get("fingerprint", ""))}" tabindex="-1">',
        f'<header class="sh"><h2><span class="n">{index + 1}</span> {sid}</h2><span class="badge" aria-live="polite"></span></header>',
        f'<details class="files"><summary>files</summary>{files}</details>',
    ]
    if subject.note:
        parts.append(f'<p class="note">{_e(subject.note)}</p>')
    if error:
        parts.append(f'<p class="error">Could not render: {_e(error)}</p>')
    if info:
        for short, im in info["images"].items():
            v = _e(info["fingerprint"])
            alt = _e(f"{subject.id} {im['title']} sagittal slices {im['slices']}")
            parts.append(
                f'<figure class="mosaic"><figcaption>{_e(im["title"])} <span class="muted">sagittal, slices '
                f'{_e(", ".join(map(str, im["slices"])))}</span></figcaption>'
                f'<img class="ov" src="img/{_e(im["overlay"])}?v={v}" width="{im["width"]}" height="{im["height"]}" alt="{alt} with labels">'
                f'<img class="plain" loading="lazy" src="img/{_e(im["plain"])}?v={v}" width="{im["width"]}" height="{im["height"]}" alt="{alt}">'
                "</figure>"
            )
        whole = (((info.get("morphometrics") or {}).get("classes") or {}).get("whole-tumor") or {})
        if whole.get("count", None) == 0:
            # an empty label map is a valid answer: say so, rather than leave a table of zeros to read
            parts.append('<p class="nolesion"><b>No lesion found</b>: the label map is empty (0 tumour, edema or cavity).</p>')
        parts.append(morphometrics_table(info.get("morphometrics")))
    parts.append(
        '<div class="qc" role="group" aria-label="QC mark">'
        '<button type="button" class="pass" data-mark="pass" title="pass (p)">✔ pass</button>'
        '<button type="button" class="fail" data-mark="fail" title="fail (f)">✘ fail</button>'
        '<button type="button" class="unset" data-mark="" title="unset (u)">unset</button>'
        f'<textarea class="comment" rows="2" placeholder="comment (c)" aria-label="comment for {sid}"></textarea>'
        '<span class="stale" hidden>label map changed since this mark was set: check again</span>'
        "</div></section>"
    )
    return "\n".join(parts)


def _legend() -> str:
    return "".join(f'<span class="lg"><span class="sw" style="background:rgb{COLOURS[n]}"></span>{_e(n)}</span>' for n in LABELS)


def page_html(title: str, report_id: str, entries: list[str], generated: str) -> str:
    data = json.dumps({"report_id": report_id, "title": title, "generated": generated}).replace("<", "\\u003c")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="{GENERATOR}">
<meta name="imsct-report-id" content="{_e(report_id)}">
<title>{_e(title)}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="report.css">
</head>
<body>
<header class="top">
  <h1>{_e(title)}</h1>
  <div class="legend">{_legend()}</div>
  <div class="summary" id="summary" aria-live="polite"></div>
  <div class="tools">
    <label><input type="checkbox" id="overlay" checked> overlays (o)</label>
    <label>show <select id="filter"><option value="all">all</option><option value="unset">unset</option><option value="pass">pass</option><option value="fail">fail</option></select></label>
    <button type="button" id="export">Export JSON</button>
    <button type="button" id="import">Import JSON</button>
    <input type="file" id="import-file" accept=".json,application/json" hidden>
  </div>
  <p class="help">Keys: j / k next / previous subject, p pass, f fail, u unset, c comment, o overlays. Marks are kept in this browser (report {_e(report_id[:8])}); export them to keep a file. Generated {_e(generated)}.</p>
  <p class="warn" id="storage-warning" hidden>This browser does not let the page store marks: export before closing it.</p>
</header>
<main id="subjects">
{chr(10).join(entries)}
</main>
<script type="application/json" id="imsct-qc-data">{data}</script>
<script src="report.js"></script>
</body>
</html>
"""


def _prepare_dir(out: Path, force: bool) -> dict | None:
    """The previous report's manifest if ``out`` holds one; refuses a foreign non-empty folder."""
    manifest = out / "report.json"
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"report folder {out}: report.json is unreadable ({exc}); remove it or choose another folder") from None
        if isinstance(old, dict) and old.get("generator") == GENERATOR and isinstance(old.get("report_id"), str):
            return old
        if not force:
            raise InputError(f"report folder {out}: report.json was not written by {GENERATOR}; choose another folder or pass --force")
        return None
    if out.exists() and not out.is_dir():
        raise InputError(f"report folder {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InputError(f"report folder {out}: not empty and holds no imsct QC report; choose another folder or pass --force")
    return None


def build_report(
    subjects: list[Subject],
    out_dir: str | Path,
    title: str = "IMSCT QC",
    force: bool = False,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> dict:
    """Write the report for ``subjects`` into ``out_dir``; returns the manifest (also written as
    ``report.json``) with ``errors`` naming every subject that could not be rendered."""
    if not subjects:
        raise InputError("no subjects to report")
    out = Path(out_dir)
    old = _prepare_dir(out, force)
    report_id = old["report_id"] if old else uuid.uuid4().hex
    img_dir = out / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    keys = [_file_key(s.id, used) for s in subjects]
    ids: set[str] = set()
    for s in subjects:
        if s.id in ids:
            raise InputError(f"T2w {s.t2}: subject id {s.id!r} appears twice; give each subject its own T2w file name")
        ids.add(s.id)
    entries, records, errors, written = [], [], {}, []
    items = list(zip(subjects, keys))
    for i, (subject, key) in enumerate(progress(items) if progress else items):
        info, error = None, None
        try:
            info = render_subject(subject, img_dir, key)
        except InputError as exc:
            error = str(exc)
            errors[subject.id] = error
        entries.append(_entry_html(i, subject, info, error))
        rec = {"id": subject.id, "t2": str(subject.t2), "t1": str(subject.t1) if subject.t1 else None, "seg": [str(p) for p in _seg_files(subject.seg)]}
        if info:
            rec.update(fingerprint=info["fingerprint"], morphometrics=info["morphometrics"],
                       images={k: {"overlay": v["overlay"], "plain": v["plain"], "slices": v["slices"]} for k, v in info["images"].items()})
            written += [n for v in info["images"].values() for n in (v["overlay"], v["plain"])]
        records.append(rec)
    # images of subjects that an earlier version of this report had and this one has not
    if old:
        for rec in old.get("subjects", []):
            for im in (rec.get("images") or {}).values():
                for name in (im.get("overlay"), im.get("plain")):
                    if isinstance(name, str) and name not in written and "/" not in name and "\\" not in name:
                        (img_dir / name).unlink(missing_ok=True)
    for asset in ("report.js", "report.css"):
        shutil.copyfile(ASSETS / asset, out / asset)
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    manifest = {"generator": GENERATOR, "report_id": report_id, "title": title, "generated": generated,
                "subjects": records, "errors": errors}
    write_text_atomically(out / "report.json", json.dumps(manifest, indent=1, default=_json_default))
    write_text_atomically(out / "index.html", page_html(title, report_id, entries, generated))
    return manifest


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")




__all__ = ["Subject", "build_report", "render_mosaic", "subjects_from_dataset", "subjects_from_lists", "ALPHA"]
