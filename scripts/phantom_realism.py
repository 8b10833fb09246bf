"""Realism check of the phantoms (issue 17): a PNG sheet and a texture/intensity statistic.

    .venv/bin/python scripts/phantom_realism.py --out DIR [--cases 6] [--seed 17000] [--max-voxels 1500000]

Sheet (``DIR/realism_sheet.png``): the real healthy sample scans of ``../shared/realdata`` (T2w
only) beside mid-sagittal T2w and T1w of phantoms of the current generator, every panel resliced
through the cord at 1 mm per pixel over the same 220 mm (SI) x 150 mm (AP): the same display
scale; each panel is windowed 0 .. its 99.5th percentile.

Statistic (printed, and written to ``DIR/realism_stats.json``), on the T2w's mid-sagittal plane
through the cord at 1 mm, relative to the median intensity of the cord (lesion excluded):

* ``ring/cord``: median of the ring 1-3 mm outside the cord (mostly CSF) over the cord median;
* ``nbh p50/cord``, ``nbh p95/cord``: median and 95th percentile of the neighbourhood within 20 mm
  of the cord (cord excluded): how bright the surrounding tissue (fat, muscle, bone) is;
* ``locstd nbh``, ``locstd cord``: median local standard deviation (3 x 3 mm window) in the
  neighbourhood and in the cord's interior (cord eroded by 1 pixel), over the cord median:
  texture, edges and noise.

The real scans are used only to look at and to report these numbers, never to fit the generator.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL = ROOT.parent / "shared" / "realdata"
if not REAL.exists():
    REAL = Path("/work/shared/realdata")
PANEL = (220, 150)  # SI, AP (mm at 1 mm per pixel)
ZOOM = (70, 50)  # zoomed panels around the cord (0.5 mm per pixel)


def _plane(img: np.ndarray, affine: np.ndarray, cord: np.ndarray, centre_z: float | None = None, order: int = 1,
           panel: tuple[float, float] = PANEL, pixel: float = 1.0):
    """Mid-sagittal plane through the cord (world x of the cord's centroid), 1 mm pixels,
    rows = S (top) to I, columns = P (left) to A; centred on the cord at ``centre_z`` (world)."""
    ijk = np.argwhere(cord > 0)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    x0 = float(np.median(world[:, 0]))
    if centre_z is None:
        centre_z = float(np.median(world[:, 2]))
    near = np.abs(world[:, 2] - centre_z) < 15
    y0 = float(np.median(world[near, 1])) if near.any() else float(np.median(world[:, 1]))
    zs = centre_z + panel[0] / 2 - np.arange(0, panel[0], pixel)
    ys = y0 - panel[1] / 2 + np.arange(0, panel[1], pixel)
    zz, yy = np.meshgrid(zs, ys, indexing="ij")
    pts = np.stack([np.full(zz.size, x0), yy.ravel(), zz.ravel()], -1)
    vox = (pts - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    out = ndimage.map_coordinates(img.astype(np.float32), vox.T, order=order, mode="constant", cval=np.nan)
    inside = np.all((vox > -0.5) & (vox < np.asarray(img.shape) - 0.5), axis=1)
    out[~inside] = np.nan
    return out.reshape(zz.shape)


def stats(plane: np.ndarray, cordp: np.ndarray) -> dict[str, float]:
    valid = np.isfinite(plane)
    cord = (cordp > 0.5) & valid
    if cord.sum() < 10:
        return {}
    med = float(np.median(plane[cord]))
    dist = ndimage.distance_transform_edt(~(cordp > 0.5))
    ring = (dist > 1) & (dist <= 3) & valid
    nbh = (dist > 0) & (dist <= 20) & valid
    p = np.where(valid, plane, 0.0)
    m1 = ndimage.uniform_filter(p, 3)
    m2 = ndimage.uniform_filter(p * p, 3)
    loc = np.sqrt(np.clip(m2 - m1 * m1, 0, None))
    full = ndimage.minimum_filter(valid.astype(np.uint8), 3) > 0
    return {
        "ring/cord": float(np.median(plane[ring]) / med),
        "nbh p50/cord": float(np.median(plane[nbh]) / med),
        "nbh p95/cord": float(np.percentile(plane[nbh], 95) / med),
        "locstd nbh": float(np.median(loc[nbh & full]) / med),
        "locstd cord": float(np.median(loc[ndimage.binary_erosion(cord) & full]) / med) if ndimage.binary_erosion(cord).sum() > 5 else float("nan"),
    }


def _case_planes(case) -> dict:
    from imsct.labels import CORD_SUFFIX, SEG_SUFFIXES

    t2, t1 = case.t2, case.t1
    cord = np.asarray(case.labels[CORD_SUFFIX].dataobj) > 0
    wt = np.asarray(case.labels[SEG_SUFFIXES["whole-tumor"]].dataobj) > 0
    d2 = np.asarray(t2.dataobj, np.float32)
    p2 = _plane(d2, t2.affine, cord)
    cp = _plane((cord & ~wt).astype(np.float32), t2.affine, cord, order=0)
    z = float(np.median((np.argwhere(cord) @ t2.affine[:3, :3].T + t2.affine[:3, 3])[:, 2]))
    # the T1w may be on its own grid: reslice the same world plane (cord position from the T2w)
    c1 = np.zeros(t1.shape, bool)
    inv = np.linalg.inv(t1.affine)
    w = np.argwhere(cord) @ t2.affine[:3, :3].T + t2.affine[:3, 3]
    ijk = np.rint(w @ inv[:3, :3].T + inv[:3, 3]).astype(int)
    ok = np.all((ijk >= 0) & (ijk < np.asarray(t1.shape)), axis=1)
    c1[tuple(ijk[ok].T)] = True
    p1 = _plane(np.asarray(t1.dataobj, np.float32), t1.affine, c1 if c1.any() else cord, centre_z=z) if c1.any() else None
    zoom = _plane(d2, t2.affine, cord, panel=ZOOM, pixel=0.5)
    return {"t2": p2, "t1": p1, "cord": cp, "info": case.info, "zoom": zoom}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--seed", type=int, default=17000)
    ap.add_argument("--max-voxels", type=int, default=1_500_000)
    ap.add_argument("--show", type=int, default=4, help="v2 subjects on the sheet (default 4)")
    args = ap.parse_args(argv)
    from imsct.phantoms import generate_case

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[dict]] = {"v2": []}
    for i in range(args.cases):
        groups["v2"].append(_case_planes(generate_case(args.seed, i, max_voxels=args.max_voxels)))
    real = []
    for name, zc in (("sct-t2_T2w", None), ("pam50-small_T2w", "cervical"), ("pam50-small_T2w", "thoracic")):
        img = nib.load(REAL / f"{name}.nii.gz")
        cord = np.asarray(nib.load(REAL / f"{name}_seg-cord.nii.gz").dataobj) > 0
        data = np.asarray(img.dataobj, np.float32)
        zw = (np.argwhere(cord) @ img.affine[:3, :3].T + img.affine[:3, 3])[:, 2]
        cz = None if zc is None else float(zw.max() - 110 if zc == "cervical" else np.median(zw))
        real.append({"name": f"{name}" + (f" ({zc})" if zc else ""), "t2": _plane(data, img.affine, cord, cz),
                     "cord": _plane(cord.astype(np.float32), img.affine, cord, cz, order=0), "t1": None,
                     "zoom": _plane(data, img.affine, cord, cz, panel=ZOOM, pixel=0.5)})
    table = {}
    for g, items in groups.items():
        rows = [stats(it["t2"], it["cord"]) for it in items]
        rows = [r for r in rows if r]
        table[g] = {k: [float(np.nanmean([r[k] for r in rows])), float(np.nanstd([r[k] for r in rows]))] for k in rows[0]}
        table[g]["n"] = len(rows)
        if g == "v2":
            pr = [stats(it["t2"], it["cord"]) for it in items if it["info"]["intensity_mode"] == "paper"]
            pr = [r for r in pr if r]
            table["v2 paper-intensity share"] = {k: [float(np.nanmean([r[k] for r in pr])), float(np.nanstd([r[k] for r in pr]))] for k in rows[0]}
            table["v2 paper-intensity share"]["n"] = len(pr)
    for r in real:
        table[r["name"]] = stats(r["t2"], r["cord"])
    keys = ["ring/cord", "nbh p50/cord", "nbh p95/cord", "locstd nbh", "locstd cord"]
    print(f"{'':34s}" + "".join(f"{k:>15s}" for k in keys) + "      n")
    for name, row in table.items():
        cells = []
        for k in keys:
            v = row.get(k)
            cells.append(f"{v[0]:7.2f} ±{v[1]:5.2f}" if isinstance(v, list) else f"{v:15.2f}" if v is not None else f"{'-':>15s}")
        print(f"{name:34s}" + "".join(f"{c:>15s}" for c in cells) + f"{row.get('n', 1):7d}")
    (out / "realism_stats.json").write_text(json.dumps(table, indent=1))
    _sheet(out / "realism_sheet.png", real, groups["v2"][: args.show])
    print(f"sheet: {out / 'realism_sheet.png'}")
    return 0


def _sheet(path: Path, real, v2) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(r["name"] + " T2w", r["t2"]) for r in real]
    for tag, items in (("v2", v2),):
        for it in items:
            inf = it["info"]
            label = f"{tag} {inf['participant_id']} {inf['tumor_type'][:5]}"
            if tag == "v2":
                label += f" {inf['acquisition']} {inf['intensity_mode']}"
            panels.append((label + " T2w", it["t2"]))
            panels.append((label + " T1w", it["t1"]))
    while len(panels) % 6:
        panels.append(("", None))
    panels += [(r["name"][:11] + " zoom", r["zoom"]) for r in real[:1]]
    panels += [(f"v2 {it['info']['participant_id']} {it['info']['acquisition']} zoom", it["zoom"]) for it in v2[:4]]
    ncol = 6
    nrow = int(np.ceil(len(panels) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(ncol * 2.3, nrow * 3.3), dpi=110)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (title, im) in zip(axes.ravel(), panels):
        if im is None:
            continue
        top = np.nanpercentile(im, 99.5) if np.isfinite(im).any() else 1.0
        ax.imshow(np.nan_to_num(im, nan=0.0), cmap="gray", vmin=0, vmax=top, aspect="equal", interpolation="nearest")
        ax.set_title(title, fontsize=6)
    fig.suptitle("mid-sagittal T2w/T1w through the cord, 1 mm/pixel, 220 x 150 mm (S up, A right); last row: T2w zoom 70 x 50 mm "
                 "at 0.5 mm/pixel", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
