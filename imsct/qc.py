"""Quality-control report: one offline HTML page over many subjects, for signing segmentations off.

For each subject the page shows sagittal mosaics of the T2w and the T1w (resampled onto the T2w
grid, so the overlays line up) with the label map drawn in the colours of :data:`imsct.labels.COLOURS`,
axial panels through the centre of each lesion (the :data:`MAX_AXIAL` largest whole-tumour
components), the lesion morphometrics, the provenance of the masks, and the three verdicts of the
Spinal Cord Toolbox's QC (pass / fail / artifact) plus a comment box. The reviewer's marks live in
the browser's ``localStorage`` under the report's id and can be exported as JSON
(``{subject: {"qc": "pass" | "fail" | "artifact" | null, "comment": "..."}}``) or imported again.
After a verdict the page stays on the subject unless *advance after marking* is ticked (``n``;
off by default, remembered by the browser); the page says which it does.

Slices: every sagittal slice through the lesion plus one on each side; when there are more than
:data:`MAX_TILES`, an even spread that always includes the slice with the most tumour, the most
edema and the most cavity. Tiles carry their slice number (index in the T2w file), the first one
a scale bar and orientation letters, drawn in Pillow's TrueType font at :data:`FONT_PX` pixels on
images the page shows unscaled at 1400 px wide.

Provenance: the masks' BIDS sidecar (``<label file name>.json`` beside it: imsct version, models
and their SHA-256, command, date) when there is one; else what ``imsct qc`` was told (``--models``).
The report's own imsct version, command line and date are always shown.

Labels: a label map (0 background, 1 tumour, 2 edema, 3 cavity, ``*_seg-imsct``) or the three
SCT-named class masks (``*_seg-tumor``, ``*_seg-edema``, ``*_seg-cavity``), on the T2w grid.

Layout of a report folder::

    index.html   report.js   report.css   report.json   img/<subject>_{t2,t1}[_ax][_plain].png

Regenerating a report into the same folder keeps its id (read from ``report.json``), so the marks a
reviewer already set stay attached to their subjects; a mark set on a label map that has changed
since (its SHA-256 differs) is shown as *stale* and exported with ``"stale": true``. A folder that
is not empty and holds no imsct QC report is refused unless ``force`` is given, and even then only
the report's own files are written.

Display: sagittal slices in radiological convention (superior up, anterior left), axial panels
anterior up with the patient's right on the left, pixels square in millimetres (the voxel sizes set
the aspect), intensity window from percentiles of the displayed region. Axes are brought to that
order by flips and transposes of the T2w voxel grid (no interpolation); an oblique acquisition is
shown along its nearest voxel axes, as viewers do.
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
from .labels import COLOURS, CORD_SUFFIX, LABELMAP_SUFFIX, LABELS, LEVELS_SUFFIX, SEG_SUFFIXES

GENERATOR = "imsct qc"
ALPHA = 0.4  # opacity of the label fill; the outline is drawn opaque
TILE_HEIGHT = 420  # pixels of the superior-inferior extent of one tile (at most)
TILE_WIDTH = 240  # pixels of the anterior-posterior extent of one tile (at most)
MOSAIC_WIDTH = 860  # pixels of a whole mosaic (at most): the page shows it unscaled beside the marks at 1400 px
AXIAL_SIZE = 220  # pixels of an axial panel's larger side (at most)
MAX_AXIAL = 4  # axial panels: through the centres of the largest lesions (whole-tumour components)
MIN_MM_PER_PIXEL = 0.25  # no finer: small fields are not blown up past this
MAX_TILES = 8
GAP = 4  # pixels between tiles
FONT_PX = 16  # captions: Pillow's bundled TrueType font at this size
CAPTION_RGB = (255, 255, 0)
SCALE_BAR_MM = (5.0, 10.0, 20.0, 50.0)
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
    """Rendered mosaic (sagittal slices, or axial panels) of one contrast: RGB arrays with and
    without the overlay."""

    overlay: np.ndarray
    plain: np.ndarray
    tiles: list[dict] = field(default_factory=list)  # per tile: slice index (in the T2w file), x0, width, height, text
    mm_per_pixel: float = 1.0


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


def _source_index(ornt: np.ndarray, shape_in: tuple[int, ...], k: int, axis: int = 0) -> int:
    """Index along the T2w file's own axis of index ``k`` along display axis ``axis``."""
    src = int(np.nonzero(ornt[:, 0] == axis)[0][0])
    return shape_in[src] - 1 - k if ornt[src, 1] < 0 else k


def most_lesion_slices(lab: np.ndarray) -> dict[str, int]:
    """Display slice (axis 0) holding the most voxels of each class present: the slice a reviewer
    must see. Ties go to the first such slice."""
    out = {}
    for name, value in LABELS.items():
        per_slice = (lab == value).sum(axis=(1, 2))
        if per_slice.any():
            out[name] = int(np.argmax(per_slice))
    return out


def _crop(idx: np.ndarray, size: int, mm: float, margin: float, min_mm: float) -> slice:
    """Index range around ``idx`` (the lesion's indices along one axis) with ``margin`` mm on
    each side and at least ``min_mm`` in all, kept inside ``[0, size)``."""
    half = max((idx.max() - idx.min() + 1) * mm / 2 + margin, min_mm / 2) / mm
    centre = (idx.min() + idx.max()) / 2
    a, b = int(np.floor(centre - half)), int(np.ceil(centre + half)) + 1
    if a < 0:
        a, b = 0, min(size, b - a)
    if b > size:
        a, b = max(0, a - (b - size)), size
    return slice(a, b)


def choose_view(lab: np.ndarray, sizes: np.ndarray) -> tuple[list[int], tuple[slice, slice]]:
    """Slices (display axis 0) and the row/column crop shown: every slice through the lesion plus
    one on each side; over MAX_TILES of them, MAX_TILES spread evenly with the slice of most
    tumour, most edema and most cavity always among them (each replaces the nearest evenly spread
    one). Cropped to the lesion with a margin; the central slices and the whole field when the
    label map is empty."""
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
        must = sorted(set(most_lesion_slices(lab).values()))
        spread = sorted({int(round(v)) for v in np.linspace(lo, hi, MAX_TILES)})
        for k in must:
            if k in spread:
                continue
            free = [s for s in spread if s not in must]
            spread.remove(min(free, key=lambda s: (abs(s - k), s)))
            spread.append(k)
        picks = sorted(spread)
    crop = (_crop(np.nonzero(fg.any(axis=(0, 2)))[0], rows, sizes[1], MARGIN_SI_MM, MIN_CROP_MM[0]),
            _crop(np.nonzero(fg.any(axis=(0, 1)))[0], cols, sizes[2], MARGIN_AP_MM, MIN_CROP_MM[1]))
    return picks, crop


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


def _tile(grey: np.ndarray, lab: np.ndarray, lo: float, hi: float, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """One panel (rows x columns of the display) scaled to ``width`` x ``height``: with the label
    fill and outline, and without."""
    from PIL import Image

    g = (np.clip((grey - lo) / (hi - lo), 0, 1) * 255).astype(np.float32)
    g = np.asarray(Image.fromarray(g).resize((width, height), Image.Resampling.BILINEAR))
    tl = np.asarray(Image.fromarray(np.ascontiguousarray(lab)).resize((width, height), Image.Resampling.NEAREST))
    rgb = np.repeat(np.clip(g, 0, 255)[..., None], 3, axis=2)
    plain = rgb.copy()
    edge = _outline(tl)
    for name, value in LABELS.items():
        colour = np.asarray(COLOURS[name], np.float32)
        m = tl == value
        rgb[m] = (1 - ALPHA) * rgb[m] + ALPHA * colour
        rgb[m & edge] = colour
    return np.rint(rgb).astype(np.uint8), np.rint(plain).astype(np.uint8)


def _font(px: int = FONT_PX):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=px)  # Pillow's bundled TrueType font (FreeType)
    except (TypeError, ValueError, OSError, ImportError):  # Pillow built without FreeType: its bitmap font
        return ImageFont.load_default()


def scale_bar_mm(mm_per_pixel: float, tile_width: int) -> float:
    """The longest round length (mm) whose bar spans at most 40 % of a tile."""
    fits = [mm for mm in SCALE_BAR_MM if mm / mm_per_pixel <= 0.4 * tile_width]
    return fits[-1] if fits else SCALE_BAR_MM[0]


def _annotate(arrays: list[np.ndarray], tiles: list[dict], letters: dict[str, str], mm_per_pixel: float) -> list[np.ndarray]:
    """Captions drawn alike on the overlay and the plain image (so they never read as labels):
    each tile's slice number bottom left, a scale bar bottom right of the last tile, orientation
    letters on the first tile's edges (``{"top", "bottom", "left", "right"}``). Yellow on a black
    outline, :data:`FONT_PX` pixels: readable at the size the page shows the image."""
    from PIL import Image, ImageDraw

    font = _font()
    text = {"fill": CAPTION_RGB, "font": font, "stroke_width": 2, "stroke_fill": (0, 0, 0)}
    out = []
    for arr in arrays:
        im = Image.fromarray(arr)
        draw = ImageDraw.Draw(im)
        for tile in tiles:
            x0, h = tile["x0"], tile["height"]
            draw.text((x0 + 4, h - 4), tile["text"], anchor="ld", **text)
        last = tiles[-1]  # the scale bar on the last tile, clear of the first one's letters
        x0, w, h = last["x0"], last["width"], last["height"]
        mm = scale_bar_mm(mm_per_pixel, w)
        length = int(round(mm / mm_per_pixel))
        xb, yb = x0 + w - 6 - length, h - 8
        draw.rectangle((xb - 1, yb - 3, xb + length + 1, yb + 3), fill=(0, 0, 0))
        draw.rectangle((xb, yb - 2, xb + length, yb + 2), fill=CAPTION_RGB)
        draw.text((xb + length, yb - 6), f"{mm:g} mm", anchor="rd", **text)
        first = tiles[0]
        x0, w, h = first["x0"], first["width"], first["height"]
        spots = {"top": ((x0 + w // 2, 3), "mt"), "bottom": ((x0 + w // 2, h - 24), "md"),
                 "left": ((x0 + 4, h // 2), "lm"), "right": ((x0 + w - 4, h // 2), "rm")}
        for where, letter in letters.items():
            xy, anchor = spots[where]
            draw.text(xy, letter, anchor=anchor, **text)
        out.append(np.asarray(im))
    return out


def _tile_size(rows_mm: float, cols_mm: float, n: int, max_h: int, max_w: int, total_w: int) -> tuple[float, int, int]:
    """Millimetres per pixel and tile size: square millimetres, no tile over ``max_h`` x ``max_w``
    and ``n`` tiles (with gaps) no wider than ``total_w``, never finer than MIN_MM_PER_PIXEL."""
    per = max(1, (total_w - (n - 1) * GAP) // max(n, 1))
    mmpp = max(rows_mm / max_h, cols_mm / min(max_w, per), MIN_MM_PER_PIXEL)
    return mmpp, max(1, int(round(rows_mm / mmpp))), max(1, int(round(cols_mm / mmpp)))


def render_mosaic(image: np.ndarray, labelmap: np.ndarray, affine: np.ndarray, view=None) -> Mosaic:
    """Sagittal mosaic of ``image`` with ``labelmap`` drawn on it (both on the grid of ``affine``).

    ``view`` (slices, crop) as returned by :func:`choose_view` on the display-ordered label map;
    chosen from the label map when None, so that every contrast of a subject shows the same view."""
    img, sizes, ornt = to_display(np.asarray(image, np.float32), affine)
    lab, _, _ = to_display(np.asarray(labelmap), affine)
    lab = np.rint(lab).astype(np.uint8)
    picks, (rs, cs) = view if view is not None else choose_view(lab, sizes)
    region = img[picks][:, rs, cs]
    lo, hi = window(region)
    rows, cols = region.shape[1:]
    mmpp, height, width = _tile_size(rows * sizes[1], cols * sizes[2], len(picks), TILE_HEIGHT, TILE_WIDTH, MOSAIC_WIDTH)
    total_w = len(picks) * width + (len(picks) - 1) * GAP
    overlay = np.zeros((height, total_w, 3), np.uint8)
    plain = np.zeros_like(overlay)
    tiles = []
    for t, k in enumerate(picks):
        x0 = t * (width + GAP)
        overlay[:, x0 : x0 + width], plain[:, x0 : x0 + width] = _tile(img[k][rs, cs], lab[k][rs, cs], lo, hi, width, height)
        index = _source_index(ornt, image.shape, k)
        tiles.append({"slice": index, "x0": x0, "width": width, "height": height, "text": f"#{index}"})
    letters = {"top": "S", "bottom": "I", "left": "A", "right": "P"}
    overlay, plain = _annotate([overlay, plain], tiles, letters, mmpp)
    return Mosaic(overlay=overlay, plain=plain, tiles=tiles, mm_per_pixel=mmpp)


def lesion_centres(lab: np.ndarray, sizes: np.ndarray, limit: int = MAX_AXIAL) -> list[dict]:
    """The ``limit`` largest connected whole-tumour components of a display-ordered label map,
    superior first: display row (axis 1) through each one's centroid, its volume and extents."""
    from scipy import ndimage

    from .morphometrics import CONNECTIVITY

    comps, n = ndimage.label(lab > 0, structure=CONNECTIVITY)
    if n == 0:
        return []
    counts = np.bincount(comps.ravel())[1:]
    keep = np.argsort(-counts, kind="stable")[:limit] + 1
    out = []
    for c in keep:
        idx = np.argwhere(comps == c)
        out.append({"row": int(round(idx[:, 1].mean())), "slices": idx[:, 0], "columns": idx[:, 2],
                    "volume_mm3": float(counts[c - 1] * np.prod(sizes))})
    return sorted(out, key=lambda c: c["row"])


def render_axial(image: np.ndarray, labelmap: np.ndarray, affine: np.ndarray, centres: list[dict]) -> Mosaic | None:
    """Axial panels, one through the centre of each lesion of ``centres`` (:func:`lesion_centres`):
    radiological convention (anterior up, the patient's right on the left), square millimetres,
    cropped around the lesion. Tiles are captioned with the index along the T2w file's axis nearest
    to superior-inferior. None without lesions."""
    if not centres:
        return None
    img, sizes, ornt = to_display(np.asarray(image, np.float32), affine)
    lab, _, _ = to_display(np.asarray(labelmap), affine)
    lab = np.rint(lab).astype(np.uint8)
    n_r, _, n_p = img.shape
    # each panel: rows = display axis 2 (anterior first), columns = display axis 0 reversed (right on the left)
    panels = []
    for c in centres:
        rr = _crop(c["slices"], n_r, sizes[0], MARGIN_AP_MM, MIN_CROP_MM[1])
        pp = _crop(c["columns"], n_p, sizes[2], MARGIN_AP_MM, MIN_CROP_MM[1])
        panels.append((img[rr, c["row"], pp][::-1].T, lab[rr, c["row"], pp][::-1].T))
    rows_mm = max(p[0].shape[0] for p in panels) * sizes[2]
    cols_mm = max(p[0].shape[1] for p in panels) * sizes[0]
    mmpp, _, _ = _tile_size(rows_mm, cols_mm, len(panels), AXIAL_SIZE, AXIAL_SIZE, MOSAIC_WIDTH)
    lo, hi = window(np.concatenate([p[0].ravel() for p in panels]))
    dims = [(max(1, int(round(p[0].shape[1] * sizes[0] / mmpp))), max(1, int(round(p[0].shape[0] * sizes[2] / mmpp)))) for p in panels]
    height = max(h for _, h in dims)
    total_w = sum(w for w, _ in dims) + (len(dims) - 1) * GAP
    overlay = np.zeros((height, total_w, 3), np.uint8)
    plain = np.zeros_like(overlay)
    tiles, x0 = [], 0
    for i, ((grey, tl), (w, h), c) in enumerate(zip(panels, dims, centres), 1):
        overlay[:h, x0 : x0 + w], plain[:h, x0 : x0 + w] = _tile(grey, tl, lo, hi, w, h)
        index = _source_index(ornt, image.shape, c["row"], axis=1)
        tiles.append({"slice": index, "lesion": i, "x0": x0, "width": w, "height": height, "text": f"{i}: #{index}",
                      "volume_mm3": c["volume_mm3"]})
        x0 += w + GAP
    letters = {"top": "A", "bottom": "P", "left": "R", "right": "L"}
    overlay, plain = _annotate([overlay, plain], tiles, letters, mmpp)
    return Mosaic(overlay=overlay, plain=plain, tiles=tiles, mm_per_pixel=mmpp)


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


def anatomy_beside(seg, t2: Volume) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The tight cord and the vertebral level map that ``imsct segment`` writes beside the masks
    (``<T2w name>_seg-cord`` and ``_seg-levels``), each None where absent or not on the T2w grid."""
    first = _seg_files(seg)[0]
    stem = strip_nifti_ext(first.name)
    for suffix in (LABELMAP_SUFFIX, *SEG_SUFFIXES.values()):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    out = []
    for suffix in (CORD_SUFFIX, LEVELS_SUFFIX):
        path = first.with_name(f"{stem}{suffix}.nii.gz")
        vol = load_volume(path, suffix[1:]) if path.is_file() else None
        out.append(np.asarray(vol.data) if vol is not None and same_grid((vol.shape, vol.affine), t2) else None)
    return out[0], out[1]


def render_subject(subject: Subject, img_dir: Path, key: str) -> dict:
    """Write the subject's PNG files; returns what the page needs (image names, slices shown,
    morphometrics, sizes, provenance)."""
    from .geometry import resample_image

    t2 = load_volume(subject.t2, "T2w")
    lab = load_labelmap(subject.seg, t2)
    dlab, sizes, ornt = to_display(lab, t2.affine)
    view = choose_view(dlab, sizes)
    most = {name: _source_index(ornt, t2.shape, k) for name, k in most_lesion_slices(dlab).items()}
    centres = lesion_centres(dlab, sizes)
    images = {}
    contrasts = [("t2", "T2w", t2.data)]
    if subject.t1 is not None:
        t1 = load_volume(subject.t1, "T1w")
        contrasts.append(("t1", "T1w", resample_image(t1.data, t1.affine, t2.shape, t2.affine).numpy()))
    for short, title, data in contrasts:
        entry = {"title": title}
        for view_name, mosaic, suffix in (("sagittal", render_mosaic(data, lab, t2.affine, view), ""),
                                          ("axial", render_axial(data, lab, t2.affine, centres), "_ax")):
            if mosaic is None:
                continue
            names = {"overlay": f"{key}_{short}{suffix}.png", "plain": f"{key}_{short}{suffix}_plain.png"}
            _save_png(mosaic.overlay, img_dir / names["overlay"])
            _save_png(mosaic.plain, img_dir / names["plain"])
            part = {**names, "width": int(mosaic.overlay.shape[1]), "height": int(mosaic.overlay.shape[0]),
                    "slices": [t["slice"] for t in mosaic.tiles], "mm_per_pixel": round(float(mosaic.mm_per_pixel), 4)}
            if view_name == "sagittal":
                entry.update(part)
            else:
                part["volumes_mm3"] = [round(t["volume_mm3"], 1) for t in mosaic.tiles]
                entry["axial"] = part
        images[short] = entry
    morpho = subject.morphometrics
    if morpho is None:
        from .morphometrics import measure

        cord, level_map = anatomy_beside(subject.seg, t2)  # levels and damage ratio from the image
        morpho = measure(lab, t2.affine, levels=subject.levels, cord=None if cord is None else cord > 0.5,
                         level_map=None if subject.levels is not None or level_map is None else np.rint(level_map).astype(int))
    return {"images": images, "morphometrics": morpho, "fingerprint": fingerprint(_seg_files(subject.seg)),
            "most_lesion_slice": most, "provenance": masks_provenance(_seg_files(subject.seg))}


def sha256(paths: Iterable[Path]) -> str:
    """SHA-256 (hex) of the files' bytes, in order."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def fingerprint(paths: list[Path]) -> str:
    """Short SHA-256 of the label files' bytes: a mark set on other labels is flagged stale."""
    return sha256(paths)[:16]


# ----------------------------------------------------------------------------- provenance


def sidecar_path(seg: Path) -> Path:
    """The BIDS sidecar JSON of a label file: the same name with ``.json`` (``x_seg-imsct.json``)."""
    return Path(seg).with_name(strip_nifti_ext(Path(seg).name) + ".json")


def masks_provenance(segs: list[Path]) -> dict:
    """What made the masks, from the first label file's sidecar JSON that exists (``source``: its
    path, ``record``: its content), or ``{"source": None}`` when there is none. An unreadable
    sidecar is reported as such, not skipped."""
    for seg in segs:
        side = sidecar_path(seg)
        if side.is_file():
            try:
                record = json.loads(side.read_text())
            except (OSError, ValueError) as exc:
                return {"source": str(side), "error": f"unreadable ({exc})"}
            if not isinstance(record, dict):
                return {"source": str(side), "error": "not a JSON object"}
            return {"source": str(side), "record": record}
    return {"source": None, "looked_for": str(sidecar_path(segs[0]))}


def models_record(models_dir: str | Path) -> dict[str, dict[str, str]]:
    """``{file name: {"model": key, "sha256": ...}}`` of the model files of :data:`imsct.weights.MODELS`
    present in ``models_dir`` (an InputError naming the folder when it holds none)."""
    from .weights import MODELS

    folder = Path(models_dir)
    if not folder.is_dir():
        raise InputError(f"models folder {folder}: not found or not a folder")
    from .weights import record

    found = record([key for key, m in MODELS.items() if m.path(folder).is_file()], folder)
    if not found:
        raise InputError(f"models folder {folder}: none of {', '.join(m.filename for m in MODELS.values())} found")
    return found


def report_provenance(command: str | None = None, models_dir: str | Path | None = None) -> dict:
    """What the QC command knows: imsct's version, its command line, the date and, when given, the
    models folder said to have made the masks (with the SHA-256 of each model file)."""
    from . import __version__

    out = {"imsct_version": __version__, "command": command,
           "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if models_dir is not None:
        out["models_dir"] = str(Path(models_dir).resolve())
        out["models"] = models_record(models_dir)
    return out


def _models_html(models) -> str:
    """Model files and checksums from a provenance ``models`` entry (a dict by file name or a list)."""
    rows = []
    if isinstance(models, dict):
        items = list(models.items())
    elif isinstance(models, list):
        items = [((m.get("file") or m.get("filename") or m.get("name") or "?") if isinstance(m, dict) else str(m), m) for m in models]
    else:
        return _e(models)
    for name, m in items:
        m = m if isinstance(m, dict) else {}
        digest = m.get("sha256") or m.get("checksum") or "–"
        rows.append(f'<li><b>{_e(name)}</b>{" (" + _e(m["model"]) + ")" if m.get("model") else ""} '
                    f'<code class="sha" title="{_e(digest)}">sha256 {_e(digest)}</code></li>')
    return f'<ul class="models">{"".join(rows)}</ul>'


def provenance_html(masks: dict | None, report: dict) -> str:
    """The subject's provenance block: from the masks' sidecar when there is one, else what the QC
    command was told; the report's own version, command and date always."""
    parts = []
    masks = masks or {"source": None}
    rec = masks.get("record")
    if rec is not None:
        # the sidecar imsct.inference.provenance writes (BIDS GeneratedBy, models by file, command, date)
        made_by = rec.get("GeneratedBy") if isinstance(rec.get("GeneratedBy"), dict) else {}
        version = made_by.get("Version")
        command = rec.get("command")
        date = rec.get("date")
        models = rec.get("models")
        parts.append(f'<div><b>masks</b> from <code>{_e(masks["source"])}</code></div>')
        parts.append(f'<div>imsct {_e(version or "version not recorded")}; date {_e(date or "not recorded")}</div>')
        parts.append(f'<div>command <code>{_e(command or "not recorded")}</code></div>')
        parts.append(_models_html(models) if models else '<div class="muted">models not recorded in the sidecar</div>')
    else:
        why = masks.get("error") or f"no sidecar JSON next to the masks ({masks.get('looked_for', '')})"
        parts.append(f'<div class="warnp"><b>masks</b>: {_e(why)}</div>')
        if report.get("models"):
            parts.append(f'<div>models given to imsct qc (--models {_e(report.get("models_dir"))}):</div>' + _models_html(report["models"]))
        else:
            parts.append('<div class="muted">models not recorded (pass imsct qc --models DIR to name them)</div>')
    return '<div class="prov">' + "".join(parts) + "</div>"


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
        cols = MORPHO_COLUMNS[1:]
        if any(c.get("max_axial_damage_ratio") is not None for c in comps):  # with a cord mask (SCT's damage ratio)
            cols = (*cols, ("max_axial_damage_ratio", "max. axial damage ratio", 2))
        crow = "".join(
            f"<tr><th scope=\"row\">{_e(c.get('class', ''))} {_e(c.get('index', ''))}</th>"
            + "".join(f"<td>{_num(c.get(k), d)}</td>" for k, _, d in cols)
            + f"<td class=\"lv\">{_levels(c.get('levels'))}</td></tr>"
            for c in comps
        )
        chead = "".join(f"<th>{_e(t)}</th>" for _, t, _ in cols)
        table += (f'<details class="components"><summary>{len(comps)} component(s)</summary><table class="morpho">'
                  f"<thead><tr><th>component</th>{chead}<th>vertebral levels</th></tr></thead><tbody>{crow}</tbody></table></details>")
    return table


VERDICTS = (("pass", "✔ pass", "p"), ("fail", "✘ fail", "f"), ("artifact", "⚠ artifact", "a"))  # SCT's three QC verdicts


def _figure(subject: Subject, im: dict, view: str, fp: str, caption: str) -> str:
    alt = _e(f"{subject.id} {im['title']} {view} {caption}")
    return (f'<figure class="mosaic {view}"><figcaption>{_e(im["title"])} {view} <span class="muted">{_e(caption)}</span></figcaption>'
            f'<img class="ov" src="img/{_e(im["overlay"])}?v={_e(fp)}" width="{im["width"]}" height="{im["height"]}" alt="{alt} with labels">'
            f'<img class="plain" loading="lazy" src="img/{_e(im["plain"])}?v={_e(fp)}" width="{im["width"]}" height="{im["height"]}" alt="{alt}">'
            "</figure>")


def _slices_text(info: dict) -> str:
    """Which sagittal slices the mosaic shows and where each class is largest (T2w file indices)."""
    t2 = info["images"]["t2"]
    most = info.get("most_lesion_slice") or {}
    text = f"Sagittal slices shown: {', '.join(map(str, t2['slices']))}"
    if most:
        text += "; most " + ", most ".join(f"{n} #{k}" for n, k in most.items())
    ax = t2.get("axial")
    if ax:
        text += "; axial panels through lesion centres at #" + ", #".join(map(str, ax["slices"]))
    return text + "."


def _entry_html(index: int, subject: Subject, info: dict | None, error: str | None, report_prov: dict | None = None) -> str:
    sid = _e(subject.id)
    paths = [("T2w", subject.t2), ("T1w", subject.t1)] + [("labels", p) for p in _seg_files(subject.seg)]
    files = "".join(f"<div><b>{r}</b> {_e(p)}</div>" for r, p in paths if p is not None)
    views, side = [], []
    if subject.note:
        side.append(f'<p class="note">{_e(subject.note)}</p>')
    if error:
        side.append(f'<p class="error">Could not render: {_e(error)}</p>')
    if info:
        fp = info["fingerprint"]
        for im in info["images"].values():
            views.append(_figure(subject, im, "sagittal", fp, "slices " + ", ".join(f"#{k}" for k in im["slices"])))
            if im.get("axial"):
                ax = {**im["axial"], "title": im["title"]}
                views.append(_figure(subject, ax, "axial", fp, "through lesion " + ", ".join(
                    f"{i} (#{k}, {v / 1000:.2f} cm³)" for i, (k, v) in enumerate(zip(ax["slices"], ax["volumes_mm3"]), 1))))
        whole = (((info.get("morphometrics") or {}).get("classes") or {}).get("whole-tumor") or {})
        if whole.get("count", None) == 0:
            # an empty label map is a valid answer: say so, rather than leave a table of zeros to read
            side.append('<p class="nolesion"><b>No lesion found</b>: the label map is empty (0 tumour, edema or cavity).</p>')
        side.append(f'<div class="summary-table">{morphometrics_table(info.get("morphometrics"))}</div>')
    buttons = "".join(f'<button type="button" class="{m}" data-mark="{m}" title="{m} ({k})">{_e(label)} <kbd>{k}</kbd></button>'
                      for m, label, k in VERDICTS)
    side.append(
        '<div class="qc" role="group" aria-label="QC verdict">'
        f'{buttons}<button type="button" class="unset" data-mark="" title="unset (u)">unset <kbd>u</kbd></button>'
        f'<textarea class="comment" rows="2" placeholder="comment (c)" aria-label="comment for {sid}"></textarea>'
        '<span class="stale" hidden>label map changed since this mark was set: check again</span>'
        "</div>"
    )
    if info:
        side.append(f'<p class="shown">{_e(_slices_text(info))}</p>')
    side.append(f'<details class="files"><summary>files</summary>{files}</details>')
    side.append(f'<details class="provenance"><summary>provenance</summary>'
                f'{provenance_html((info or {}).get("provenance"), report_prov or {})}</details>')
    return "\n".join([
        f'<section class="subject" id="s{index}" data-subject="{sid}" data-fp="{_e((info or {}).get("fingerprint", ""))}" tabindex="-1">',
        f'<header class="sh"><h2><span class="n">{index + 1}</span> {sid}</h2><span class="badge" aria-live="polite"></span></header>',
        '<div class="cols">',
        f'<div class="views">{"".join(views)}</div>',
        f'<aside class="side">{"".join(side)}</aside>',
        "</div></section>",
    ])


def _legend() -> str:
    return "".join(f'<span class="lg"><span class="sw" style="background:rgb{COLOURS[n]}"></span>{_e(n)}</span>' for n in LABELS)


def _report_line(prov: dict) -> str:
    bits = [f"imsct {prov.get('imsct_version', '?')}"]
    if prov.get("command"):
        bits.append(f"<code>{_e(prov['command'])}</code>")
    bits.append(f"generated {_e(prov.get('date', ''))}")
    if prov.get("models"):
        bits.append("models " + ", ".join(f"{_e(n)} sha256 {_e(m['sha256'][:12])}…" for n, m in prov["models"].items()))
    return "; ".join(bits)


def page_html(title: str, report_id: str, entries: list[str], generated: str, provenance: dict | None = None) -> str:
    data = json.dumps({"report_id": report_id, "title": title, "generated": generated}).replace("<", "\\u003c")
    prov = provenance or {"date": generated}
    options = "".join(f'<option value="{v}">{v}</option>' for v in ("all", "unset", "pass", "fail", "artifact"))
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
<header class="top" id="top">
  <h1>{_e(title)}</h1>
  <div class="legend">{_legend()}</div>
  <div class="summary" id="summary" aria-live="polite"></div>
  <div class="tools">
    <label title="after a verdict, go to the next subject"><input type="checkbox" id="advance"> advance after marking (n)</label>
    <label><input type="checkbox" id="overlay" checked> overlays (o)</label>
    <label>show <select id="filter">{options}</select></label>
    <button type="button" id="export">Export JSON</button>
    <button type="button" id="import">Import JSON</button>
    <input type="file" id="import-file" accept=".json,application/json" hidden>
  </div>
  <p class="help">Keys: j / k next / previous subject; p pass, f fail, a artifact, u unset; c comment; o overlays; n advance on / off.
  <span id="advance-state"></span> Marks are kept in this browser (report {_e(report_id[:8])}); export them to keep a file.</p>
  <p class="status" id="status" aria-live="polite"></p>
  <p class="prov-line" id="report-provenance">Report: {_report_line(prov)}</p>
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
    provenance: dict | None = None,
) -> dict:
    """Write the report for ``subjects`` into ``out_dir``; returns the manifest (also written as
    ``report.json``) with ``errors`` naming every subject that could not be rendered.

    ``provenance``: what the QC command knows (:func:`report_provenance`: version, command line,
    date, models); each subject's masks are described by their sidecar JSON when they have one."""
    if not subjects:
        raise InputError("no subjects to report")
    prov = provenance or report_provenance()
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
        entries.append(_entry_html(i, subject, info, error, prov))
        rec = {"id": subject.id, "t2": str(subject.t2), "t1": str(subject.t1) if subject.t1 else None, "seg": [str(p) for p in _seg_files(subject.seg)]}
        if info:
            rec.update(fingerprint=info["fingerprint"], morphometrics=info["morphometrics"], provenance=info["provenance"],
                       most_lesion_slice=info["most_lesion_slice"],
                       images={k: {"overlay": v["overlay"], "plain": v["plain"], "slices": v["slices"],
                                   **({"axial": {n: v["axial"][n] for n in ("overlay", "plain", "slices")}} if v.get("axial") else {})}
                               for k, v in info["images"].items()})
            written += _image_names(rec["images"])
        records.append(rec)
    # images of subjects that an earlier version of this report had and this one has not
    if old:
        for rec in old.get("subjects", []):
            for name in _image_names(rec.get("images")):
                if name not in written and "/" not in name and "\\" not in name:
                    (img_dir / name).unlink(missing_ok=True)
    for asset in ("report.js", "report.css"):
        shutil.copyfile(ASSETS / asset, out / asset)
    generated = prov.get("date") or datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    manifest = {"generator": GENERATOR, "report_id": report_id, "title": title, "generated": generated,
                "provenance": prov, "subjects": records, "errors": errors}
    write_text_atomically(out / "report.json", json.dumps(manifest, indent=1, default=_json_default))
    write_text_atomically(out / "index.html", page_html(title, report_id, entries, generated, prov))
    return manifest


def _image_names(images) -> list[str]:
    """The PNG names a manifest's ``images`` entry lists (sagittal and axial, with and without labels)."""
    names = []
    for im in (images or {}).values() if isinstance(images, dict) else []:
        if not isinstance(im, dict):
            continue
        for part in (im, im.get("axial") if isinstance(im.get("axial"), dict) else {}):
            names += [n for n in (part.get("overlay"), part.get("plain")) if isinstance(n, str)]
    return names


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")




__all__ = ["Subject", "build_report", "render_mosaic", "render_axial", "choose_view", "report_provenance", "subjects_from_dataset",
           "subjects_from_lists", "ALPHA", "VERDICTS"]
