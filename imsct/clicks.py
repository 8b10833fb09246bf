"""Interactive correction by clicks, in the DeepEdit manner: conventions, click maps, simulation, inference.

**Conventions.**

* Click classes, in the order of the network's click channels: ``tumor``, ``edema``, ``cavity``
  (:data:`imsct.labels.LABELS`) and ``background`` (:data:`CLICK_CLASSES`). A click of a class says
  "this voxel is that class"; a background click says "this voxel is no lesion".
* A click map is, per class, the maximum over that class's clicks of a Gaussian of the distance to
  the click (in mm, on the grid's own voxel spacing; sigma :data:`SIGMA_MM`, cut at 3 sigma): 1 at
  the click, in [0, 1] elsewhere. Click maps are never z-scored; only the image channels are
  (:class:`imsct.networks.ClickGuided`).
* Clicks from a viewer are voxel indices ``[i, j, k]`` of the image the viewer shows, the T2w as
  the datastore holds it (MONAI Label's DeepEdit: ``{"tumor": [[i, j, k], ...], "edema": [...],
  "background": [...]}``, the label names as keys, what 3D Slicer's and OHIF's MONAI Label plugins
  send; DeepGrow's ``{"foreground": [...], "background": [...]}`` with the class in ``"label"`` is
  read too). :func:`parse_points` reads them; :func:`to_working_points` brings them onto the
  working grid through world space.
* **Crop.** A correction re-predicts only the box around the clicks: their bounding box grown to
  at least :data:`CROP_SIZE` (64 x 64 x 32 working voxels, 64 x 64 x 64 mm), slid inside the field
  (:func:`click_box`); elsewhere the previous answer stands. One click therefore costs one
  64 x 64 x 32 forward pass of the network. Crops shorter than 32 voxels along an axis are padded
  by :mod:`imsct.windows`' rule (images replicated and marked invalid, click maps with zeros).

**Simulated clicks** (training and evaluation, :func:`next_click`): the missed region of each class
``L`` in (background, tumor, edema, cavity) is where the truth is ``L`` and the prediction is not;
the next click goes to the largest 26-connected component of all these regions, at its centre (the
maximum of its Euclidean distance transform, in mm), with class ``L``. A false-positive lesion on
true background thus gets a background click, a missed edema an edema click.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from .geometry import box_slices
from .io import InputError
from .labels import LABELS
from .postprocess import labelmap_from_probabilities
from .windows import MIN_WINDOW, MULTIPLE, pad_replicate

BACKGROUND = "background"
CLICK_CLASSES: tuple[str, ...] = (*LABELS, BACKGROUND)  # order of the click channels
CLASS_INDEX = {**LABELS, BACKGROUND: 0}  # click class -> value in a label map
SIGMA_MM = 3.0
CUTOFF_SIGMAS = 3.0
CROP_SIZE = (64, 64, 32)  # SI, AP, RL working voxels
_STRUCT = np.ones((3, 3, 3), bool)

Points = dict  # {click class: (n, 3) float array of voxel coordinates}


# ---- clicks from a request -------------------------------------------------------------------------


def _as_points(value, key: str) -> np.ndarray:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError:
            raise InputError(f"clicks {key!r}: {value!r} is not a list of [x, y, z] points") from None
    if value is None:
        return np.zeros((0, 3))
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        raise InputError(f"clicks {key!r}: {value!r} is not a list of [x, y, z] points") from None
    if arr.size == 0:
        return np.zeros((0, 3))
    if arr.ndim == 1 and arr.shape[0] == 3:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 3 or not np.isfinite(arr).all():
        raise InputError(f"clicks {key!r}: {value!r} is not a list of [x, y, z] points (voxel indices)")
    return arr


def parse_points(params: dict) -> Points:
    """The clicks of a MONAI Label request (DeepEdit: label names as keys, plus ``background``;
    DeepGrow: ``foreground`` / ``background`` with the class in ``label``), as ``{class: (n, 3)}``
    voxel indices of the image. Keys that are no click class are ignored (a request carries many);
    a malformed point list is an :class:`InputError` naming the key."""
    out = {name: np.zeros((0, 3)) for name in CLICK_CLASSES}
    for name in CLICK_CLASSES:
        if name in params:
            out[name] = _as_points(params[name], name)
    if "foreground" in params:
        fg = _as_points(params["foreground"], "foreground")
        if len(fg):
            label = params.get("label")
            if label not in LABELS:
                raise InputError(f"clicks 'foreground': give the class they mark as 'label' (one of {', '.join(LABELS)}), "
                                 f"got {label!r}; or send them under the class's name")
            out[label] = np.concatenate([out[label], fg])
    return out


def check_inside(points: Points, shape, what: str = "image") -> None:
    """InputError naming the first click outside a grid of ``shape`` (voxel centres -0.5 .. n-0.5)."""
    hi = np.asarray(shape[:3], float) - 0.5
    for name, pts in points.items():
        for p in np.asarray(pts, float).reshape(-1, 3):
            if (p < -0.5).any() or (p > hi).any():
                raise InputError(f"click {name!r} at voxel {[round(float(v), 2) for v in p]}: outside the {what} "
                                 f"({' x '.join(str(int(s)) for s in shape[:3])} voxels)")


def to_working_points(points: Points, native_affine: np.ndarray, working_affine: np.ndarray) -> Points:
    """Clicks given as voxel indices of the native image, as (fractional) voxel coordinates of the working grid."""
    m = np.linalg.inv(np.asarray(working_affine, float)) @ np.asarray(native_affine, float)
    return {k: (np.asarray(v, float).reshape(-1, 3) @ m[:3, :3].T + m[:3, 3]) for k, v in points.items()}


def count(points: Points) -> int:
    return int(sum(len(v) for v in points.values()))


# ---- click maps -----------------------------------------------------------------------------------------


def click_maps(points: Points, shape, spacing, origin=(0, 0, 0), sigma_mm: float = SIGMA_MM) -> np.ndarray:
    """``(4, *shape)`` float32 click maps (:data:`CLICK_CLASSES` order) of a grid of ``shape`` whose
    voxel ``[0, 0, 0]`` is voxel ``origin`` of the clicks' grid (a crop), with voxel ``spacing`` (mm)."""
    shape = tuple(int(s) for s in shape[:3])
    out = np.zeros((len(CLICK_CLASSES), *shape), np.float32)
    spacing = np.asarray(spacing, float)
    radius = np.ceil(CUTOFF_SIGMAS * sigma_mm / spacing).astype(int)
    for c, name in enumerate(CLICK_CLASSES):
        for p in np.asarray(points.get(name, np.zeros((0, 3))), float).reshape(-1, 3) - np.asarray(origin, float):
            centre = np.rint(p).astype(int)
            lo, hi = np.maximum(centre - radius, 0), np.minimum(centre + radius + 1, shape)
            if (hi <= lo).any():
                continue  # this click's ball does not reach the grid
            axes = [(np.arange(a, b) - q) * s for a, b, q, s in zip(lo, hi, p, spacing)]
            d2 = axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2
            g = np.exp(-d2 / (2 * sigma_mm**2)).astype(np.float32)
            g[d2 > (CUTOFF_SIGMAS * sigma_mm) ** 2] = 0.0
            sl = (c, *box_slices(lo, hi))
            np.maximum(out[sl], g, out=out[sl])
    return out


# ---- the crop around the clicks, and the network on it ------------------------------------------------


def click_box(points: Points, shape, size=CROP_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The box ``(lo, hi)`` a correction re-predicts: the clicks' bounding box grown about its centre
    to at least ``size``, slid inside a grid of ``shape`` and clipped to it."""
    pts = np.concatenate([np.asarray(v, float).reshape(-1, 3) for v in points.values()])
    if not len(pts):
        raise ValueError("click_box: no click")
    shape_a = np.asarray(shape[:3])
    lo_p, hi_p = np.floor(pts.min(0)).astype(int), np.floor(pts.max(0)).astype(int) + 1
    extent = np.maximum(hi_p - lo_p, np.asarray(size))
    lo = (lo_p + hi_p) // 2 - extent // 2
    hi = lo + extent
    shift = np.where(lo < 0, -lo, 0) - np.where(hi > shape_a, hi - shape_a, 0)
    return np.clip(lo + shift, 0, shape_a), np.clip(hi + shift, 0, shape_a)


def network_input(image: np.ndarray, maps: np.ndarray) -> torch.Tensor:
    """``(1, 2 + 4 + 1, ...)``: image channels, click maps and the validity channel, padded where an
    axis is shorter than the network's smallest window or not a multiple of 16 (images replicated,
    clicks zero, padding marked invalid: :mod:`imsct.windows`)."""
    spatial = image.shape[-3:]
    size = [max(MIN_WINDOW, -(-int(n) // MULTIPLE) * MULTIPLE) for n in spatial]
    img, valid = pad_replicate(np.ascontiguousarray(image, np.float32), size)
    clicks = np.zeros((maps.shape[0], *size), np.float32)
    clicks[(slice(None), *[slice(0, int(n)) for n in spatial])] = maps
    return torch.from_numpy(np.concatenate([img, clicks, valid[None]]))[None]


@torch.no_grad()
def predict(net: torch.nn.Module, image: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """The click-guided network on one crop: ``(4, ...)`` probabilities of the crop's voxels (one
    forward pass; the crop should be about :data:`CROP_SIZE`, larger ones go through
    :func:`predict_large`)."""
    x = network_input(image, maps).to(next(net.parameters()).device)
    out = torch.sigmoid(net(x).float())[0].cpu().numpy()
    return out[(slice(None), *[slice(0, int(n)) for n in image.shape[-3:]])]


def correct(net: torch.nn.Module, image: np.ndarray, probs: np.ndarray, points: Points, spacing,
            size=CROP_SIZE, inferer=None) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """One correction: ``probs`` (the current ``(4, ...)`` answer on the grid of ``image``, ``(2, ...)``)
    with the box around ``points`` (voxel coordinates of that grid) re-predicted from the image and
    the click maps. Returns the new probabilities and the box. A box larger than :data:`CROP_SIZE`
    (clicks far apart) is predicted by ``inferer`` (stage 2's sliding window by default)."""
    lo, hi = click_box(points, image.shape[-3:], size)
    sl = box_slices(lo, hi)
    maps = click_maps(points, hi - lo, spacing, origin=lo)
    crop = image[(slice(None), *sl)]
    if np.prod(hi - lo) <= np.prod(size):
        p = predict(net, crop, maps)
    else:
        p = predict_large(net, crop, maps, inferer)
    out = probs.copy()
    out[(slice(None), *sl)] = p
    return out, (lo, hi)


@torch.no_grad()
def predict_large(net: torch.nn.Module, image: np.ndarray, maps: np.ndarray | None = None, inferer=None) -> np.ndarray:
    """The click-guided network over a region of any size by stage 2's padding-safe sliding window
    (:func:`imsct.cascade.sliding_window_inferer`); ``maps=None``: no click (stage 2's answer at
    initialisation)."""
    from .cascade import sliding_window_inferer

    inferer = inferer or sliding_window_inferer()
    if maps is None:
        maps = np.zeros((len(CLICK_CLASSES), *image.shape[-3:]), np.float32)
    x = torch.from_numpy(np.ascontiguousarray(np.concatenate([image, maps]), np.float32))[None]
    x = x.to(next(net.parameters()).device)
    return torch.sigmoid(inferer(x, net).float())[0].cpu().numpy()


# ---- simulated clicks -----------------------------------------------------------------------------------


def near_clicks(points: Points | None, shape, spacing, radius_mm: float = SIGMA_MM) -> np.ndarray | None:
    """Voxels of a grid of ``shape`` within ``radius_mm`` of any click of ``points`` (None without clicks)."""
    if not points or count(points) == 0:
        return None
    maps = click_maps(points, shape, spacing, sigma_mm=radius_mm)
    return maps.max(axis=0) >= np.exp(-0.5)  # the Gaussian's value at one sigma


def next_click(pred: np.ndarray, truth: np.ndarray, spacing=(1.0, 1.0, 1.0), valid: np.ndarray | None = None,
               clicked: Points | None = None) -> tuple[str, np.ndarray] | None:
    """The click a DeepEdit-style annotator gives next (module docstring): ``(class, voxel index)``
    at the centre of the largest missed region of any class, or None when ``pred`` (a 0..3 label
    map) equals ``truth`` (where ``valid``). Voxels within :data:`SIGMA_MM` of an earlier click
    (``clicked``) are left out: an annotator whose click did not fix a region clicks elsewhere in it,
    not on the same voxel again."""
    best = None  # (size, class, component labels, component index)
    near = near_clicks(clicked, truth.shape, spacing)
    for name in CLICK_CLASSES:
        v = CLASS_INDEX[name]
        missed = (truth == v) & (pred != v)
        if valid is not None:
            missed &= valid
        if near is not None:
            missed &= ~near
        if not missed.any():
            continue
        lab, n = ndimage.label(missed, _STRUCT)
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        k = int(sizes.argmax())
        if best is None or sizes[k] > best[0]:
            best = (int(sizes[k]), name, lab, k)
    if best is None:
        return None
    _, name, lab, k = best
    box = ndimage.find_objects((lab == k).astype(np.uint8))[0]
    comp = np.pad(lab[box] == k, 1)  # padded: the box's edge is not the region's edge
    dist = ndimage.distance_transform_edt(comp, sampling=spacing)
    idx = np.asarray(np.unravel_index(int(dist.argmax()), dist.shape)) - 1 + np.array([s.start for s in box])
    return name, idx


@dataclass
class ClickSession:
    """Simulated interaction on one region: the image ``(2, ...)``, the truth label map, the current
    probabilities (start: no click) and the clicks so far (voxel indices of the region)."""

    net: torch.nn.Module
    image: np.ndarray
    truth: np.ndarray
    spacing: tuple
    probs: np.ndarray
    valid: np.ndarray | None = None
    points: Points = field(default_factory=lambda: {k: np.zeros((0, 3)) for k in CLICK_CLASSES})
    threshold: float = 0.5
    size: tuple = CROP_SIZE
    seconds: list = field(default_factory=list)  # time of each re-prediction (the latency of a click)

    @property
    def labelmap(self) -> np.ndarray:
        return labelmap_from_probabilities(self.probs, self.threshold)

    def click(self) -> bool:
        """Give the next simulated click and re-predict around it; False when there is no error left."""
        nxt = next_click(self.labelmap, self.truth, self.spacing, self.valid, self.points)
        if nxt is None:
            return False
        name, ijk = nxt
        self.points[name] = np.concatenate([self.points[name], np.asarray(ijk, float)[None]])
        t0 = time.perf_counter()
        self.probs, _ = correct(self.net, self.image, self.probs, self.points, self.spacing, self.size)
        self.seconds.append(time.perf_counter() - t0)
        return True


# ---- evaluation by simulated interaction ----------------------------------------------------------------

LESION_MARGIN = (16, 16, 8)  # working voxels around the lesion: the region an annotator corrects
DICE_CLASSES = ("tumor", "edema", "cavity", "whole-tumor")


def lesion_region(image: np.ndarray, truth: np.ndarray, margin=LESION_MARGIN, size=CROP_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``image`` (C, ...) and ``truth`` cut to the lesion's bounding box grown by ``margin`` and to at
    least ``size`` (the whole of them when there is no lesion)."""
    idx = np.argwhere(truth > 0)
    if not len(idx):
        return image, truth
    m = np.asarray(margin)
    lo, hi = click_box({"lesion": np.stack([idx.min(0) - m, idx.max(0) + m])}, truth.shape, size)
    box = box_slices(lo, hi)
    return np.ascontiguousarray(image[(slice(None), *box)]), np.ascontiguousarray(truth[box])


def class_dice(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Dice per class of :data:`DICE_CLASSES` of two 0..3 label maps (:func:`imsct.metrics.dice`);
    None for a class the truth lacks."""
    from .labels import split_masks
    from .metrics import dice

    p, t = split_masks(pred), split_masks(truth)
    return {c: (dice(p[c], t[c]) if t[c].any() else None) for c in DICE_CLASSES}


def dice_after_clicks(net: torch.nn.Module, image: np.ndarray, truth: np.ndarray, spacing, clicks=(0, 1, 3, 5),
                      seconds: list | None = None) -> dict:
    """``{n: class_dice}`` after ``n`` simulated clicks, for each ``n`` of ``clicks``, on one region:
    first the network without clicks (:func:`predict_large`), then one click at a time
    (:meth:`ClickSession.click`; once no error is left, later counts repeat the last answer).
    ``seconds`` collects the time of each correction."""
    s = ClickSession(net, image, truth, tuple(spacing), predict_large(net, image))
    out, done = {}, 0
    for n in sorted(clicks):
        while done < n and s.click():
            done += 1
        out[n] = class_dice(s.labelmap, truth)
    if seconds is not None:
        seconds.extend(s.seconds)
    return out


__all__ = ["CLICK_CLASSES", "BACKGROUND", "CROP_SIZE", "SIGMA_MM", "parse_points", "check_inside", "to_working_points",
           "click_maps", "click_box", "network_input", "predict", "predict_large", "correct", "next_click", "near_clicks", "ClickSession",
           "lesion_region", "class_dice", "dice_after_clicks", "LESION_MARGIN"]
