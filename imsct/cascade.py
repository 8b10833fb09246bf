"""The two-stage cascade of Lemay et al. 2021: locate the cord, crop, label the tumour, paste back.

All geometry happens on the working grid of :mod:`imsct.geometry`; the final masks are resampled
onto the T2w's own grid from the probabilities (not from hard labels) and post-processed there,
so volume thresholds use the native voxel size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer

from .geometry import WORKING_SPACING, covering_box, crop_or_pad, field_overlap, fields_intersect, resample, shifted, working_grid
from .io import InputError, Volume
from .labels import LABELS, MIN_VOLUME_CM3
from .postprocess import labelmap_from_probabilities, largest_component, postprocess_labelmap
from .precision import bf16_native, use_bf16

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


@dataclass
class CascadeResult:
    labelmap: np.ndarray  # on the T2w grid: 0 background, 1 tumour, 2 edema, 3 cavity
    probabilities: np.ndarray | None  # (4, ...) on the T2w grid if requested
    affine: np.ndarray
    box_working: tuple[np.ndarray, np.ndarray] | None  # stage-1 box on the working grid
    cord_found: bool
    cord_working: np.ndarray  # stage-1 mask (largest component) on the working grid
    working_shape: tuple[int, int, int]
    working_affine: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)


class Cascade:
    """Stage 1 (cord localiser) then stage 2 (tumour network) on one T2w + T1w pair."""

    def __init__(
        self,
        localiser: torch.nn.Module | None,
        segmenter: torch.nn.Module,
        inferer: SlidingWindowInferer | None = None,
        threshold: float = 0.5,
        min_volume_cm3: dict[str, float] | None = None,
        fill_holes: bool = True,
        keep_probabilities: bool = False,
        min_t1_coverage: float = 0.5,
        device: str | torch.device = "cpu",
        amp: bool | str = "auto",
        field_size: tuple[int, int, int] = STAGE1_FIELD,
        fit_field: bool = True,
        safety_factor: tuple[float, float, float] = SAFETY_FACTOR,
        spacing: tuple[float, float, float] = WORKING_SPACING,
        t2_only: bool = False,
    ):
        self.device = torch.device(device)
        # localiser=None: no cascade, stage 2 runs over the whole field (the paper's baseline)
        self.localiser = localiser.to(self.device).eval() if localiser is not None else None
        self.segmenter = segmenter.to(self.device).eval()
        self.inferer = inferer or SlidingWindowInferer(roi_size=ROI_SIZE, sw_batch_size=4, overlap=0.25, mode="gaussian")
        self.threshold = threshold
        self.min_volume_cm3 = {**MIN_VOLUME_CM3, **(min_volume_cm3 or {})}
        self.fill_holes = fill_holes
        self.keep_probabilities = keep_probabilities
        self.min_t1_coverage = min_t1_coverage
        # amp: bfloat16 autocast for both networks; "auto" = where the hardware runs it natively
        # (held-out phantoms: same Dice as float32; README, "Performance")
        self.amp = use_bf16(amp, self.device)
        self.field_size = tuple(int(v) for v in field_size)
        # fit_field: run the localiser on the image rounded up to 16 voxels (at most field_size)
        # instead of always on the full field_size
        self.fit_field = bool(fit_field)
        self.safety_factor = tuple(float(v) for v in safety_factor)
        self.spacing = tuple(float(v) for v in spacing)
        # t2_only: the segmenter was trained with the T1w channel zeroed (model_t2only.pt); any
        # T1w given is ignored and the channel is fed as zeros
        self.t2_only = bool(t2_only)
        # optional progress hook: called with "localise", "segment", "postprocess" as each stage
        # starts and "done" at the end (the command line's progress bar uses it)
        self.on_stage: Callable[[str], None] | None = None

    def _stage(self, name: str) -> None:
        if self.on_stage is not None:
            self.on_stage(name)

    def _autocast(self):
        if self.amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    @torch.no_grad()
    def localise(self, t2w: np.ndarray) -> np.ndarray:
        """Stage 1 on the working T2w: binary cord-region mask (largest component) on the working grid."""
        x, offset = stage1_input(t2w, fitted_field(t2w.shape, self.field_size) if self.fit_field else self.field_size)
        with self._autocast():
            logits = self.localiser(torch.from_numpy(x)[None].to(self.device)).float()
        prob = torch.sigmoid(logits)[0, 0].cpu().numpy()
        mask = largest_component(prob > self.threshold)
        # back from the field to the working grid: the field's voxel f sits at working index f + offset
        out = np.zeros(t2w.shape, np.uint8)
        lo = np.maximum(offset, 0)
        hi = np.minimum(offset + np.asarray(mask.shape), t2w.shape)
        out[tuple(slice(a, b) for a, b in zip(lo, hi))] = mask[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offset))]
        return out

    def find_box(self, t2w: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """Stage 1 and its box on the working grid: the cord mask (empty without a localiser) and
        the box stage 2 works in (the whole field when no cord is found or there is no localiser)."""
        whole = (np.zeros(3, int), np.asarray(t2w.shape))
        if self.localiser is None:
            return np.zeros(t2w.shape, np.uint8), whole
        cord = self.localise(t2w)
        return cord, cord_box(cord, t2w.shape, self.safety_factor, tuple(self.inferer.roi_size)) or whole

    def stage2_input(self, t2w: np.ndarray, w_aff: np.ndarray, box, t1: Volume | None) -> tuple[np.ndarray, float]:
        """The ``(2, ...)`` stage-2 crop of ``box``: the working T2w and the T1w resampled inside
        the box only (zeros for the T2w-only model), and the share of the box the T1w covers."""
        lo, hi = box
        t2_crop = t2w[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))]
        if self.t2_only:
            return np.stack([t2_crop, np.zeros_like(t2_crop)]), 1.0
        box_shape, box_aff = t2_crop.shape, shifted(w_aff, lo)
        t1_crop = resample(t1.data, t1.affine, box_shape, box_aff).numpy()
        coverage = float(field_overlap(t1.shape, t1.affine, box_shape, box_aff).numpy().mean())
        return np.stack([t2_crop, t1_crop]), coverage

    @torch.no_grad()
    def segment_crop(self, image: np.ndarray) -> np.ndarray:
        """Stage 2 by Gaussian-blended sliding window on a ``(2, ...)`` crop: ``(4, ...)`` probabilities."""
        with self._autocast():
            logits = self.inferer(torch.from_numpy(np.ascontiguousarray(image))[None].to(self.device), self.segmenter)
        return torch.sigmoid(logits.float())[0].cpu().numpy()

    def __call__(self, t2: Volume, t1: Volume | None) -> CascadeResult:
        import time

        if t1 is None and not self.t2_only:
            raise InputError(f"T2w {t2.path}: no T1w given; this model needs both contrasts (use the T2w-only model)")
        tm: dict[str, float] = {}
        t0 = time.perf_counter()
        w_shape, w_aff = working_grid(t2.affine, t2.shape, self.spacing)
        t2w = resample(t2.data, t2.affine, w_shape, w_aff).numpy()
        if not self.t2_only and not fields_intersect(t1.shape, t1.affine, w_shape, w_aff):
            raise InputError(f"T1w {t1.path}: does not overlap the T2w {t2.path} in world space (check both headers)")
        tm["resample"] = time.perf_counter() - t0

        self._stage("localise")
        t0 = time.perf_counter()
        cord, box = self.find_box(t2w)
        tm["localise"] = time.perf_counter() - t0
        if self.localiser is not None and not cord.any():
            log.warning("%s: no spinal cord found by stage 1; segmenting the whole field", t2.path)
        lo, hi = box
        t0 = time.perf_counter()
        crop, coverage = self.stage2_input(t2w, w_aff, box, t1)
        if coverage < self.min_t1_coverage:
            raise InputError(
                f"T1w {t1.path}: covers only {coverage:.0%} of the spinal cord region found on T2w {t2.path}; "
                "the two series do not overlap (check the headers or register T1w to T2w)"
            )
        tm["resample"] += time.perf_counter() - t0

        self._stage("segment")
        t0 = time.perf_counter()
        probs_crop = self.segment_crop(crop)
        tm["segment"] = time.perf_counter() - t0

        self._stage("postprocess")
        t0 = time.perf_counter()
        # Probabilities are zero outside the box, so only the T2w voxels that the box reaches are
        # resampled and post-processed (the same result as on the whole grid, at a fraction of it).
        # Without probability maps to keep, only T2w voxels next to a working voxel above the
        # threshold can become lesion (a trilinear value is a convex combination of its 8
        # neighbours), so the region shrinks to those voxels plus a one-voxel margin: exact too.
        r_lo, r_hi = np.zeros(3, int), hi - lo
        if not self.keep_probabilities:
            above = np.argwhere((probs_crop > self.threshold).any(axis=0))
            r_lo, r_hi = (np.maximum(above.min(0) - 1, 0), np.minimum(above.max(0) + 2, r_hi)) if above.size else (r_lo, r_lo)
        labelmap = np.zeros(t2.shape[:3], np.uint8)
        probs = np.zeros((4, *t2.shape[:3]), np.float32) if self.keep_probabilities else None
        if (r_hi > r_lo).all():
            region = probs_crop[(slice(None), *[slice(a, b) for a, b in zip(r_lo, r_hi)])]
            n_lo, n_hi = covering_box(lo + r_lo, lo + r_hi, w_aff, t2.shape, t2.affine)
            n_sl = tuple(slice(a, b) for a, b in zip(n_lo, n_hi))
            sub_shape = tuple(int(b - a) for a, b in zip(n_lo, n_hi))
            probs_sub = resample(region, shifted(w_aff, lo + r_lo), sub_shape, shifted(t2.affine, n_lo)).numpy()
            sub = labelmap_from_probabilities(probs_sub, self.threshold)
            labelmap[n_sl] = postprocess_labelmap(sub, t2.voxel_volume_mm3, self.min_volume_cm3, self.fill_holes)
            if probs is not None:
                probs[(slice(None), *n_sl)] = probs_sub
        tm["postprocess"] = time.perf_counter() - t0
        self._stage("done")
        return CascadeResult(
            labelmap=labelmap,
            probabilities=probs,
            affine=t2.affine,
            box_working=box,
            cord_found=bool(cord.any()),
            cord_working=cord,
            working_shape=w_shape,
            working_affine=w_aff,
            timings=tm,
        )


__all__ = ["Cascade", "CascadeResult", "stage1_input", "cord_box", "zscore", "STAGE1_FIELD", "ROI_SIZE", "SAFETY_FACTOR", "LABELS"]
