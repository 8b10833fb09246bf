"""The two-stage cascade of Lemay et al. 2021: locate the cord, crop, label the tumour, paste back.

All geometry happens on the working grid of :mod:`imsct.geometry`; the final masks are resampled
onto the T2w's own grid from the probabilities (not from hard labels) and post-processed there,
so volume thresholds use the native voxel size.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .geometry import WORKING_SPACING, box_slices, covering_box, crop_or_pad, field_overlap, fields_intersect, resample, resample_image, shifted, to_working, working_grid
from .io import InputError, Volume, nearest_voxel, world
from .labels import LABELS, MIN_VOLUME_CM3
from .postprocess import keep_touching, labelmap_from_probabilities, largest_component, postprocess_labelmap
from .precision import use_bf16
from .windows import padding_safe

log = logging.getLogger(__name__)

STAGE1_FIELD = (512, 256, 32)  # SI, AP, RL voxels on the working grid
SAFETY_FACTOR = (1.2, 1.2, 1.0)
ROI_SIZE = (128, 128, 32)


def zscore(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    return (x - x.mean()) / (x.std() + eps)


def stage1_input(t2_working: np.ndarray, field_size=STAGE1_FIELD) -> tuple[np.ndarray, np.ndarray]:
    """Volume-wise z-score, then centre crop / zero-pad to the localiser's field.

    Returns the ``(1, *field)`` array and the field's offset on the working grid.
    """
    return crop_or_pad(zscore(t2_working)[None], field_size, 0.0)


def fitted_field(shape: tuple[int, ...], field_size=STAGE1_FIELD, multiple: int = 16) -> tuple[int, int, int]:
    """The localiser's field for a working grid of ``shape``: the image rounded up to a multiple
    of 16 (the U-Net's stride), at most ``field_size``. A fully convolutional network needs no
    more padding than that, and a 273-voxel-long sagittal scan then costs a 288-long pass, not 512."""
    return tuple(min(int(f), -(-int(s) // multiple) * multiple) for f, s in zip(field_size, shape[:3]))  # type: ignore[return-value]


def cord_box(mask: np.ndarray, shape: tuple[int, ...], safety=SAFETY_FACTOR, min_size=ROI_SIZE) -> tuple[np.ndarray, np.ndarray] | None:
    """Bounding box ``(lo, hi)`` (hi exclusive) of a binary mask on a grid of ``shape``, grown by
    ``safety`` around its centre, at least ``min_size`` per side, clipped to the grid."""
    idx = np.argwhere(mask)
    if idx.size == 0:
        return None
    lo, hi = idx.min(0).astype(float), idx.max(0).astype(float) + 1
    centre, size = (lo + hi) / 2, (hi - lo) * np.asarray(safety)
    size = np.maximum(size, np.asarray(min_size, float))
    lo = np.floor(centre - size / 2).astype(int)
    hi = lo + np.ceil(size).astype(int)
    shape_a = np.asarray(shape[:3])
    # slide the box inside the grid before clipping, so that it keeps its size where possible
    shift = np.where(lo < 0, -lo, 0) - np.where(hi > shape_a, hi - shape_a, 0)
    lo, hi = np.clip(lo + shift, 0, shape_a), np.clip(hi + shift, 0, shape_a)
    return lo, hi


# Defaults of the recipe, in one place: the bundle's inference.json spells the same values and
# tests/bundle/test_bundle_configs.py fails when the two disagree.
THRESHOLD = 0.5
SW_BATCH_SIZE = 4
OPENVINO_SW_BATCH_SIZE = 1
SW_OVERLAP = 0.25
SW_MODE = "gaussian"
MIN_T1_COVERAGE = 0.5
# The intramedullary constraint (Cascade(cord_constraint=...)): lesions must overlap the stage-1
# region dilated by this margin. The region is the localiser's target, a 30 mm-diameter cylinder
# around the centreline, which already reaches ~9-11 mm beyond the surface of a normal cord (about
# 8 x 12 mm AP x RL); the 5 mm margin absorbs the localiser's own error at the region's boundary
# and ends (a predicted region thinner or shorter than its target, the 2 mm right-left voxels)
# without reaching the posterior neck muscles, ~20 mm and more behind the centreline. A lesion is
# judged whole (imsct.postprocess.keep_touching), so a tumour that widens the cord is never cut.
CORD_CONSTRAINT = True
CORD_MARGIN_MM = 5.0
# Where the anatomy network runs, the region is its tight cord instead (the cord itself, lesions
# included: the phantoms' cord target holds tumour, edema and cavity), dilated by this margin: one
# voxel of the working grid's coarsest axis (2 mm right-left), for the network's error at the cord's
# surface. Measured (scripts/cord_constraint_effect.py, 30 lesion and 20 healthy phantoms, seed
# 9500/9501): it removed no true lesion voxel at 0, 2 or 5 mm, and cut the false whole tumour on
# healthy phantoms from 1.44 to 0.52 cm3 (wholespine fields: 4.5 to 0), where the stage-1 region
# removed nothing: that 30 mm cylinder reaches the medulla and the thecal sac below the conus.
TIGHT_CORD_MARGIN_MM = 2.0


def cord_region(cord: np.ndarray, spacing, margin_mm: float = CORD_MARGIN_MM) -> np.ndarray:
    """The stage-1 cord mask (working grid, voxel ``spacing`` in mm) dilated by ``margin_mm``
    (Euclidean, in mm): the region lesions must overlap."""
    from scipy import ndimage

    cord = np.asarray(cord) > 0
    if margin_mm <= 0 or not cord.any():
        return cord
    # only the cord's bounding box grown by the margin can change
    idx = np.argwhere(cord)
    pad = np.ceil(margin_mm / np.asarray(spacing, float)).astype(int) + 1
    lo, hi = np.maximum(idx.min(0) - pad, 0), np.minimum(idx.max(0) + 1 + pad, cord.shape)
    sl = box_slices(lo, hi)
    out = np.zeros(cord.shape, bool)
    out[sl] = ndimage.distance_transform_edt(~cord[sl], sampling=spacing) <= margin_mm
    return out


def sliding_window_inferer(roi_size=ROI_SIZE, sw_batch_size: int = SW_BATCH_SIZE, overlap: float = SW_OVERLAP, mode: str = SW_MODE):
    """Stage 2's Gaussian-blended sliding-window inferer (MONAI's, through :class:`imsct.windows.PaddingSafeInferer`:
    windows fitted to the crop, replicate padding, z-score over real voxels), with the recipe's defaults."""
    from .windows import PaddingSafeInferer

    return PaddingSafeInferer(roi_size=tuple(roi_size), sw_batch_size=sw_batch_size, overlap=overlap, mode=mode)


@dataclass
class Working:
    """An image resampled onto the cascade's working grid (1 x 1 x 2 mm, SI x AP x RL)."""

    data: np.ndarray
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.data.shape[:3])  # type: ignore[return-value]


def _run_outside(call: Callable[[], None], outer_state: torch.Tensor) -> torch.Tensor:
    """Run ``call()`` with torch's random state set to ``outer_state``; returns the state it left."""
    torch.random.set_rng_state(outer_state)
    call()
    return torch.random.get_rng_state()


@dataclass
class CascadeResult:
    labelmap: np.ndarray  # on the T2w grid: 0 background, 1 tumour, 2 edema, 3 cavity
    probabilities: np.ndarray | None  # (4, ...) on the T2w grid if requested
    affine: np.ndarray
    box_working: tuple[np.ndarray, np.ndarray] | None  # stage-1 box on the working grid
    cord_found: bool
    cord_constraint: bool  # whether lesions outside the cord region were removed (on, and a cord was there)
    cord_working: np.ndarray  # stage-1 mask (largest component) on the working grid
    working_shape: tuple[int, int, int]
    working_affine: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    cord_constraint_region: str | None = None  # which region: "tight cord", "stage-1 region", "given cord" (None: not applied)
    t1_coverage: float | None = None  # share of the stage-2 box inside the T1w's field (None: T2w-only)
    t1_missing: dict | None = None  # where the cord region lacked a T1w (no lesion is called there), None if nowhere
    anatomy: "Anatomy | None" = None  # tight cord, level map and discs (when the cascade has the anatomy network)


@dataclass
class Anatomy:
    """The anatomy network's outputs on the T2w grid: the tight cord mask, the vertebral level map
    (SCT numbers on the cord, :mod:`imsct.levels`), one voxel per disc valued by its number, and
    the summary of how the levels were found."""

    cord: np.ndarray
    levels: np.ndarray
    disc_labels: np.ndarray
    summary: dict


def _no_hook(_stage: str) -> None:
    return None


class Cascade:
    """Stage 1 (cord localiser) then stage 2 (tumour network) on one T2w + T1w pair.

    Built from a models folder with :meth:`from_models`; every step is public so that a front door
    that needs only part of the work (the app's localiser and tumour tasks, Monte-Carlo scoring,
    continual learning) calls the same code: :meth:`working`, :meth:`localise`, :meth:`find_box`,
    :meth:`stage2_input`, :meth:`segment_crop`, :meth:`to_native`, :meth:`mc_dropout`. The
    options of one call are arguments of :meth:`__call__`; the object is never changed by a call.
    """

    def __init__(
        self,
        localiser: torch.nn.Module | None,
        segmenter: torch.nn.Module | None,
        inferer=None,
        threshold: float = THRESHOLD,
        min_volume_cm3: dict[str, float] | None = None,
        fill_holes: bool = True,
        keep_probabilities: bool = False,
        min_t1_coverage: float = MIN_T1_COVERAGE,
        device: str | torch.device = "cpu",
        amp: bool | str = "auto",
        field_size: tuple[int, int, int] = STAGE1_FIELD,
        fit_field: bool = True,
        safety_factor: tuple[float, float, float] = SAFETY_FACTOR,
        spacing: tuple[float, float, float] = WORKING_SPACING,
        t2_only: bool = False,
        cord_constraint: bool = CORD_CONSTRAINT,
        cord_margin_mm: float = CORD_MARGIN_MM,
        tight_cord_margin_mm: float = TIGHT_CORD_MARGIN_MM,
        backend: str | None = None,
        models: dict | None = None,
        anatomy: torch.nn.Module | None = None,
    ):
        self.device = torch.device(device)
        # the weights files and their SHA-256 (from_models fills it in; outputs' sidecars record it)
        self.models = dict(models or {})
        # localiser=None: no cascade, stage 2 runs over the whole field (the paper's baseline);
        # segmenter=None: a localiser-only cascade (continual learning's stage-1 rounds)
        self.localiser = localiser.to(self.device).eval() if localiser is not None else None
        self.segmenter = segmenter.to(self.device).eval() if segmenter is not None else None
        # anatomy=None: no tight cord, no levels (a models folder without anatomy.pt)
        self.anatomy = anatomy.to(self.device).eval() if anatomy is not None else None
        # every stage-2 window goes through the padding-safe rule of imsct.windows (a plain MONAI
        # SlidingWindowInferer given here is converted with its settings)
        self.inferer = padding_safe(inferer) if inferer is not None else sliding_window_inferer()
        self.threshold = threshold
        self.min_volume_cm3 = {**MIN_VOLUME_CM3, **(min_volume_cm3 or {})}
        self.fill_holes = fill_holes
        self.keep_probabilities = keep_probabilities  # the default of __call__'s keep_probabilities
        self.min_t1_coverage = min_t1_coverage
        # amp: bfloat16 autocast for both networks; "auto" = where the hardware runs it natively
        # (held-out phantoms: same Dice as float32; README, "Performance"); see imsct.precision
        self.amp = use_bf16(amp, self.device)
        self.field_size = tuple(int(v) for v in field_size)
        # fit_field: run the localiser on the image rounded up to 16 voxels (at most field_size)
        # instead of always on the full field_size
        self.fit_field = bool(fit_field)
        self.safety_factor = tuple(float(v) for v in safety_factor)
        self.spacing = tuple(float(v) for v in spacing)
        # t2_only: the segmenter was trained with the T1w channel zeroed; any T1w given is
        # ignored and the channel is fed as zeros
        self.t2_only = bool(t2_only)
        # what runs the networks, as reports and logs name it (from_models passes its backend)
        self.backend = backend or "eager" + (" bf16" if self.amp else "")
        # cord_constraint: remove lesions that do not overlap the cord region before the volume
        # thresholds: the anatomy network's tight cord dilated by tight_cord_margin_mm where it runs
        # and finds a cord, else the stage-1 mask (or the cord given to the call) dilated by
        # cord_margin_mm; with no cord (stage 1 found none, or no localiser) everything is kept, with a warning
        self.cord_constraint = bool(cord_constraint)
        self.cord_margin_mm = float(cord_margin_mm)
        self.tight_cord_margin_mm = float(tight_cord_margin_mm)

    @classmethod
    def from_models(cls, models_dir: str | Path | None = None, *, t2_only: bool = False, device: str | torch.device = "cpu",
                    precision: str = "auto", backend: str = "auto", **kw) -> "Cascade":
        """The cascade of a models folder (default: the shipped ``bundle/models``): the localiser and
        the two-contrast stage-2 network, or with ``t2_only`` the T2w-only one. ``precision``:
        ``auto`` (bfloat16 where native), ``float32`` or ``bfloat16``; ``backend``: ``auto`` (the
        fastest accurate one here, :func:`imsct.weights.auto_backend`), ``eager`` PyTorch (needed
        for Monte-Carlo dropout), ``openvino``, or the ``torchscript`` / ``onnx`` exports beside the weights."""
        from . import weights

        if precision not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"precision {precision!r}: expected auto, float32 or bfloat16")
        if backend == "auto":
            backend = weights.auto_backend(device)
        keys = weights.CASCADE_MODELS[bool(t2_only)]
        weights.check_present(keys, models_dir)
        amp = kw.pop("amp", {"auto": "auto", "float32": False, "bfloat16": True}[precision])
        bf16 = use_bf16(amp, torch.device(device))
        loc, seg = (weights.load_backend(k, models_dir, backend, bf16=bf16) for k in keys)
        anatomy = None
        if kw.pop("with_anatomy", True) and "anatomy" in weights.cascade_keys(t2_only, models_dir):
            anatomy = weights.load_backend("anatomy", models_dir, backend, bf16=bf16)
            keys = (*keys, "anatomy")
        if backend == "openvino" and "inferer" not in kw:
            # one window per call: as fast as four through OpenVINO (paper-sized case, AVX2: 1.62 vs 1.65 s)
            # and 0.5 GiB less memory (1.70 vs 2.22 GiB)
            kw["inferer"] = sliding_window_inferer(sw_batch_size=OPENVINO_SW_BATCH_SIZE)
        # an exported graph runs in its own precision (OpenVINO: bf16 as asked; the others float32)
        label = backend + (" bf16" if bf16 and backend in ("eager", "openvino") else "")
        return cls(loc, seg, device=device, t2_only=t2_only, amp=amp if backend == "eager" else False, backend=label,
                   models=weights.record(keys, models_dir), anatomy=anatomy, **kw)

    def settings(self) -> dict:
        """What made this cascade's masks, for provenance: models, runtime and every option that
        changes the answer."""
        return {"models": self.models, "backend": self.backend, "t2_only": self.t2_only, "threshold": self.threshold,
                "min_volume_cm3": dict(self.min_volume_cm3), "fill_holes": self.fill_holes,
                "cord_constraint": self.cord_constraint, "cord_margin_mm": self.cord_margin_mm,
                "tight_cord_margin_mm": self.tight_cord_margin_mm,
                "fit_field": self.fit_field, "window": list(self.inferer.roi_size)}

    def _autocast(self):
        if self.amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    # ---- the steps -------------------------------------------------------------------------------

    def working(self, image: Volume) -> Working:
        """``image`` resampled onto its working grid (trilinear)."""
        w_shape, w_aff = working_grid(image.affine, image.shape, self.spacing)
        return Working(resample_image(image.data, image.affine, w_shape, w_aff).numpy(), w_aff)

    @torch.no_grad()
    def localise(self, t2w: np.ndarray) -> np.ndarray:
        """Stage 1 on the working T2w: binary cord-region mask (largest component) on the working grid."""
        field = fitted_field(t2w.shape, self.field_size) if self.fit_field else tuple(self.field_size)
        long_field = t2w.shape[0] > self.field_size[0]
        if long_field:
            # a field longer than the localiser's (a whole spine): keep every SI voxel and slide the
            # localiser along SI (Gaussian-blended, a quarter overlap), so that lesions near the
            # ends get a cord region too; AP and RL keep the central crop (256 and 64 mm)
            field = (t2w.shape[0], *field[1:])
        x, offset = stage1_input(t2w, field)
        with self._autocast():
            xt = torch.from_numpy(x)[None].to(self.device)
            if long_field:
                from monai.inferers import sliding_window_inference

                logits = sliding_window_inference(xt, (self.field_size[0], *field[1:]), 1, self.localiser,
                                                  overlap=0.25, mode="gaussian").float()
            else:
                logits = self.localiser(xt).float()
        prob = torch.sigmoid(logits)[0, 0].cpu().numpy()
        mask = largest_component(prob > self.threshold)
        # back from the field to the working grid: the field's voxel f sits at working index f + offset
        out = np.zeros(t2w.shape, np.uint8)
        lo = np.maximum(offset, 0)
        hi = np.minimum(offset + np.asarray(mask.shape), t2w.shape)
        out[box_slices(lo, hi)] = mask[box_slices(lo - offset, hi - offset)]
        return out

    def box_of(self, cord: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The box stage 2 works in around a working-grid cord mask (the whole field when it is empty)."""
        whole = (np.zeros(3, int), np.asarray(cord.shape[:3]))
        return cord_box(cord, cord.shape, self.safety_factor, tuple(self.inferer.roi_size)) or whole

    def find_box(self, t2w: np.ndarray, cord: np.ndarray | None = None) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """Stage 1 and its box on the working grid: the cord mask (``cord`` when given, else the
        localiser's; empty without a localiser) and the box stage 2 works in (the whole field when
        no cord is found or there is no localiser)."""
        if cord is None:
            cord = self.localise(t2w) if self.localiser is not None else np.zeros(t2w.shape, np.uint8)
        return cord, self.box_of(cord)

    def cord_to_working(self, cord_native: Volume | np.ndarray, t2: Volume, w: Working) -> np.ndarray:
        """A cord mask on the T2w's grid (e.g. an annotator's) onto the working grid."""
        data = cord_native.data if isinstance(cord_native, Volume) else np.asarray(cord_native)
        return to_working((data > 0.5).astype(np.uint8), t2.affine, w.shape, w.affine, label=True)

    def cord_to_native(self, cord_working: np.ndarray, w: Working, t2: Volume) -> np.ndarray:
        """The stage-1 cord mask back on the T2w's own grid (nearest neighbour)."""
        return (to_working(cord_working, w.affine, t2.shape, t2.affine, label=True) > 0).astype(np.uint8)

    def stage2_input(self, t2w: np.ndarray, w_aff: np.ndarray, box, t1: Volume | None) -> tuple[np.ndarray, float]:
        """The ``(2, ...)`` stage-2 crop of ``box``: the working T2w and the T1w resampled inside
        the box only (zeros for the T2w-only model), and the share of the box the T1w covers."""
        crop, overlap = self._stage2_input(t2w, w_aff, box, t1)
        return crop, float(overlap.mean())

    def _stage2_input(self, t2w: np.ndarray, w_aff: np.ndarray, box, t1: Volume | None) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = box
        t2_crop = t2w[box_slices(lo, hi)]
        if self.t2_only:
            return np.stack([t2_crop, np.zeros_like(t2_crop)]), np.ones(t2_crop.shape, np.float32)
        box_shape, box_aff = t2_crop.shape, shifted(w_aff, lo)
        t1_crop = resample_image(t1.data, t1.affine, box_shape, box_aff).numpy()
        overlap = field_overlap(t1.shape, t1.affine, box_shape, box_aff).numpy()
        return np.stack([t2_crop, t1_crop]), overlap

    @torch.no_grad()
    def segment_crop(self, image: np.ndarray, progress: bool = False, network: torch.nn.Module | None = None) -> np.ndarray:
        """Stage 2 by Gaussian-blended sliding window on a ``(2, ...)`` crop: ``(4, ...)`` probabilities.
        Windows are fitted to the crop and never hold zero padding (:mod:`imsct.windows`).
        ``network``: another network on the same windows (the anatomy network, on the T2w channel)."""
        inferer = self.inferer.with_progress() if progress else self.inferer  # a progress bar for this call only
        with self._autocast():
            logits = inferer(torch.from_numpy(np.ascontiguousarray(image))[None].to(self.device), network or self.segmenter)
        return torch.sigmoid(logits.float())[0].cpu().numpy()

    def tight_cord(self, t2w_crop: np.ndarray, box, w: Working) -> tuple[np.ndarray, np.ndarray]:
        """The anatomy network on stage 2's box (T2w only, the same windows): the tight cord on the
        working grid (the largest component above the threshold) and the network's box probabilities."""
        probs = self.segment_crop(t2w_crop[None], network=self.anatomy)
        cord_w = np.zeros(w.shape, np.uint8)
        cord_w[box_slices(*box)] = largest_component(probs[0] > self.threshold)
        return cord_w, probs

    def find_anatomy(self, t2w_crop: np.ndarray, box, w: Working, t2: Volume,
                     disc_label: tuple[np.ndarray, int] | None = None,
                     tight: tuple[np.ndarray, np.ndarray] | None = None) -> Anatomy:
        """The anatomy network on stage 2's box (T2w only, the same windows): the tight cord (largest
        component) and the disc probability on the working grid, the levels found from them
        (:func:`imsct.levels.find_levels`; ``disc_label``: one disc the user identified, (world
        point, number); ``tight``: :meth:`tight_cord`'s result when already computed), all brought onto the T2w grid."""
        from scipy import ndimage

        from .levels import find_levels

        lo, hi = (np.asarray(v) for v in box)
        cord_w, probs = self.tight_cord(t2w_crop, box, w) if tight is None else tight
        sl = box_slices(lo, hi)
        disc_w = np.zeros(w.shape, np.float32)
        disc_w[sl] = probs[1]
        levels = find_levels(cord_w, disc_w, w.affine, disc_label, self.threshold, region=(lo, hi))
        # onto the T2w grid: the cord from its probability (trilinear), inside the box's covering region
        cord_native = np.zeros(t2.shape[:3], np.uint8)
        levels_native = np.zeros(t2.shape[:3], np.uint8)
        n_lo, n_hi = covering_box(lo, hi, w.affine, t2.shape, t2.affine)
        if (n_hi > n_lo).all() and cord_w.any():
            n_sl = box_slices(n_lo, n_hi)
            sub_shape, sub_aff = tuple(int(b - a) for a, b in zip(n_lo, n_hi)), shifted(t2.affine, n_lo)
            p = resample(probs[:1], shifted(w.affine, lo), sub_shape, sub_aff).numpy()[0]
            cord_sub = largest_component(p > self.threshold)
            lv = to_working(levels.level_map, w.affine, sub_shape, sub_aff, label=True)
            if cord_sub.any() and lv.any():
                # every cord voxel takes the level of the nearest labelled one (grids differ at the edges)
                _, nearest = ndimage.distance_transform_edt(lv == 0, return_indices=True)
                lv = lv[tuple(nearest)]
                # but not where the working map left the level unknown on the cord (beyond the outermost discs)
                unknown = ((cord_w > 0) & (levels.level_map == 0)).astype(np.uint8)
                lv = np.where(to_working(unknown, w.affine, sub_shape, sub_aff, label=True) > 0, 0, lv)
            cord_native[n_sl] = cord_sub
            levels_native[n_sl] = np.where(cord_sub > 0, lv, 0)
        discs_native = np.zeros(t2.shape[:3], np.uint8)
        for d in levels.discs:
            if (ijk := nearest_voxel(d.world, t2.affine, t2.shape)) is not None:
                discs_native[ijk] = d.label
        return Anatomy(cord_native, levels_native, discs_native, levels.summary())

    def to_native(self, probs_crop: np.ndarray, box, w_aff: np.ndarray, t2: Volume,
                  keep_probabilities: bool = False, cord: np.ndarray | None = None,
                  margin_mm: float | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Stage 2's box probabilities back onto the T2w's exact grid, thresholded and
        post-processed there: the label map (and the ``(4, ...)`` probabilities when kept).

        ``cord`` (the working-grid cord mask, given when the constraint applies): lesions that do
        not overlap :func:`cord_region` of it (``margin_mm``, default the cascade's) are removed before holes are filled and small
        components dropped (the probabilities, when kept, are left as the network gave them).

        Probabilities are zero outside the box, so only the T2w voxels that the box reaches are
        resampled and post-processed (the same result as on the whole grid, at a fraction of it).
        Without probability maps to keep, only T2w voxels next to a working voxel above the
        threshold can become lesion (a trilinear value is a convex combination of its 8
        neighbours), so the region shrinks to those voxels plus a one-voxel margin: exact too."""
        lo, hi = (np.asarray(v) for v in box)
        r_lo, r_hi = np.zeros(3, int), hi - lo
        if not keep_probabilities:
            above = np.argwhere((probs_crop > self.threshold).any(axis=0))
            r_lo, r_hi = (np.maximum(above.min(0) - 1, 0), np.minimum(above.max(0) + 2, r_hi)) if above.size else (r_lo, r_lo)
        labelmap = np.zeros(t2.shape[:3], np.uint8)
        probs = np.zeros((probs_crop.shape[0], *t2.shape[:3]), np.float32) if keep_probabilities else None
        if (r_hi > r_lo).all():
            region = probs_crop[(slice(None), *box_slices(r_lo, r_hi))]
            n_lo, n_hi = covering_box(lo + r_lo, lo + r_hi, w_aff, t2.shape, t2.affine)
            n_sl = box_slices(n_lo, n_hi)
            sub_shape = tuple(int(b - a) for a, b in zip(n_lo, n_hi))
            probs_sub = resample(region, shifted(w_aff, lo + r_lo), sub_shape, shifted(t2.affine, n_lo)).numpy()
            # trilinear weights sum to 1 only up to float rounding: keep probabilities within [0, 1]
            np.clip(probs_sub, 0.0, 1.0, out=probs_sub)
            sub = labelmap_from_probabilities(probs_sub, self.threshold)
            if cord is not None and cord.any() and sub.any():
                margin = self.cord_margin_mm if margin_mm is None else margin_mm
                region = cord_region(cord, self.spacing, margin).astype(np.uint8)
                region_sub = to_working(region, w_aff, sub_shape, shifted(t2.affine, n_lo), label=True)
                sub = keep_touching(sub, region_sub)
            labelmap[n_sl] = postprocess_labelmap(sub, t2.voxel_volume_mm3, self.min_volume_cm3, self.fill_holes)
            if probs is not None:
                probs[(slice(None), *n_sl)] = probs_sub
        return labelmap, probs

    def mc_dropout(self, t2: Volume, t1: Volume | None, samples: int, box=None, seed: int = 0,
                   between: Callable[[], None] | None = None) -> tuple[float, tuple]:
        """Monte-Carlo dropout uncertainty: the mean voxel variance of stage 2's outputs over
        ``samples`` passes with dropout active, inside the stage-1 box (found here when ``box`` is
        None). Returns the score and the box. The networks are back in eval mode afterwards and
        torch's random state is restored. ``between()`` is called before each pass with the
        networks in eval mode and torch's random state as the caller left it (a server lets other
        users of the networks run there); the passes draw the same dropout masks either way."""
        w = self.working(t2)
        if box is None:  # the cascade's own box (the whole field when no cord is found)
            _, box = self.find_box(w.data)
        crop, _ = self.stage2_input(w.data, w.affine, box, t1)
        dropouts = [m for m in self.segmenter.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
        if not dropouts:
            raise InputError("the stage-2 network has no dropout layer: Monte-Carlo dropout is not possible")
        outer = torch.random.get_rng_state()
        torch.manual_seed(seed)
        runs = []
        try:
            for _ in range(samples):
                if between is not None:
                    mine, outer = torch.random.get_rng_state(), _run_outside(between, outer)
                    torch.random.set_rng_state(mine)
                for m in dropouts:
                    m.train()
                runs.append(self.segment_crop(crop))
                for m in dropouts:
                    m.eval()
        finally:
            for m in dropouts:
                m.eval()
            torch.random.set_rng_state(outer)
        return float(np.stack(runs).var(axis=0).mean()), box

    # ---- the whole cascade -------------------------------------------------------------------------

    def locate(self, t2: Volume, cord: Volume | np.ndarray | None = None) -> tuple[Working, np.ndarray, tuple]:
        """Resample the T2w to the working grid and run stage 1 (or take ``cord``, a mask on the
        T2w grid): the working T2w, the working cord mask and stage 2's box."""
        w = self.working(t2)
        cord_w, box = self.find_box(w.data, self._given_cord(cord, t2, w))
        return w, cord_w, box

    def _given_cord(self, cord, t2: Volume, w: Working) -> np.ndarray | None:
        if cord is None:
            return None
        given = self.cord_to_working(cord, t2, w)
        if not given.any():
            raise InputError(f"cord mask for T2w {t2.path}: empty on the working grid")
        return given

    def __call__(self, t2: Volume, t1: Volume | None, *, cord: Volume | np.ndarray | None = None,
                 keep_probabilities: bool | None = None, on_stage: Callable[[str], None] | None = None,
                 progress: bool = False, disc_label: tuple[np.ndarray, int] | None = None) -> CascadeResult:
        """Segment one case. ``cord``: a cord mask on the T2w grid that replaces stage 1 (an
        annotator's); ``keep_probabilities``: also return the probabilities on the T2w grid
        (default: the constructor's); ``on_stage``: called with "localise", "segment",
        "anatomy" (when the cascade has the anatomy network: its tight cord is the constraint's
        region), "postprocess" as each stage starts
        and "done" at the end; ``progress``: a progress bar over the sliding windows;
        ``disc_label``: ``(world point, disc number)`` of one disc, to number the levels from.

        Where the T1w does not cover the stage-2 box, stage 2 saw no contrast there: its
        probabilities are set to zero in that part (no lesion is called from a T2w alone by the
        two-contrast network) and ``t1_missing`` says which part of the cord region it was."""
        if t1 is None and not self.t2_only:
            raise InputError(f"T2w {t2.path}: no T1w given; this model needs both contrasts (use the T2w-only model)")
        keep = self.keep_probabilities if keep_probabilities is None else bool(keep_probabilities)
        stage = on_stage or _no_hook
        tm: dict[str, float] = {}
        t0 = time.perf_counter()
        w = self.working(t2)
        if not self.t2_only and not fields_intersect(t1.shape, t1.affine, w.shape, w.affine):
            raise InputError(f"T1w {t1.path}: does not overlap the T2w {t2.path} in world space (check both headers)")
        given = self._given_cord(cord, t2, w)
        tm["resample"] = time.perf_counter() - t0

        stage("localise")
        t0 = time.perf_counter()
        cord_w, box = self.find_box(w.data, given)
        tm["localise"] = time.perf_counter() - t0
        if given is None and self.localiser is not None and not cord_w.any():
            log.warning("%s: no spinal cord found by stage 1; segmenting the whole field", t2.path)
        t0 = time.perf_counter()
        crop, overlap = self._stage2_input(w.data, w.affine, box, t1)
        coverage, inside = float(overlap.mean()), overlap > 0.5
        if coverage < self.min_t1_coverage:
            raise InputError(
                f"T1w {t1.path}: covers only {coverage:.0%} of the spinal cord region found on T2w {t2.path}; "
                "the two series do not overlap (check the headers or register T1w to T2w)"
            )
        tm["resample"] += time.perf_counter() - t0

        stage("segment")
        t0 = time.perf_counter()
        probs_crop = self.segment_crop(crop, progress=progress)
        missing = None
        if not inside.all():
            probs_crop[:, ~inside] = 0.0
            missing = self._t1_missing(inside, box, cord_w, w)
        tm["segment"] = time.perf_counter() - t0

        tight = None
        if self.anatomy is not None:
            stage("anatomy")
            t0 = time.perf_counter()
            tight = self.tight_cord(crop[0], box, w)
            tm["anatomy"] = time.perf_counter() - t0
        region_cord, margin, region = None, None, None
        if self.cord_constraint:
            if given is None and tight is not None and tight[0].any():
                region_cord, margin, region = tight[0], self.tight_cord_margin_mm, "tight cord"
            elif cord_w.any():
                region_cord, region = cord_w, "given cord" if given is not None else "stage-1 region"
            else:
                ran = [name for name, net in (("stage 1", self.localiser), ("the anatomy network", self.anatomy)) if net is not None]
                log.warning("%s: no cord found %s; lesions kept without the cord constraint", t2.path,
                            "by " + " or ".join(ran) if ran else "(no localiser)")

        stage("postprocess")
        t0 = time.perf_counter()
        labelmap, probs = self.to_native(probs_crop, box, w.affine, t2, keep, region_cord, margin)
        tm["postprocess"] = time.perf_counter() - t0
        anatomy = None
        if tight is not None:
            t0 = time.perf_counter()
            anatomy = self.find_anatomy(crop[0], box, w, t2, disc_label, tight=tight)
            tm["anatomy"] += time.perf_counter() - t0
        stage("done")
        return CascadeResult(
            labelmap=labelmap,
            probabilities=probs,
            affine=t2.affine,
            box_working=box,
            cord_found=bool(cord_w.any()),
            cord_constraint=region is not None,
            cord_constraint_region=region,
            cord_working=cord_w,
            working_shape=w.shape,
            working_affine=w.affine,
            timings=tm,
            t1_coverage=None if self.t2_only else coverage,
            t1_missing=missing,
            anatomy=anatomy,
        )

    @staticmethod
    def _t1_missing(inside: np.ndarray, box, cord_w: np.ndarray, w: Working) -> dict | None:
        """Which part of the cord region (the stage-1 mask in the box, else the box) lies outside the
        T1w's field: its share and its world superior-inferior range (mm)."""
        lo, hi = (np.asarray(v) for v in box)
        region = cord_w[box_slices(lo, hi)] > 0
        if not region.any():
            region = np.ones(inside.shape, bool)
        out = region & ~inside
        if not out.any():
            return None
        z = world(np.argwhere(out) + lo, w.affine)[:, 2]
        return {"share_of_cord_region": round(float(out.sum() / region.sum()), 4),
                "z_range_mm": [round(float(z.min()), 1), round(float(z.max()), 1)]}


__all__ = ["Cascade", "CascadeResult", "Anatomy", "Working", "stage1_input", "cord_box", "zscore", "sliding_window_inferer",
           "cord_region", "CORD_CONSTRAINT", "CORD_MARGIN_MM", "TIGHT_CORD_MARGIN_MM", "STAGE1_FIELD", "ROI_SIZE", "SAFETY_FACTOR", "THRESHOLD", "SW_OVERLAP", "SW_BATCH_SIZE", "SW_MODE", "LABELS"]
