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

from .geometry import WORKING_SPACING, crop_or_pad, field_overlap, resample, working_grid
from .io import InputError, Volume
from .labels import LABELS, MIN_VOLUME_CM3
from .postprocess import labelmap_from_probabilities, largest_component, postprocess_labelmap

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
        amp: bool = False,
        field_size: tuple[int, int, int] = STAGE1_FIELD,
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
        self.amp = amp
        self.field_size = tuple(int(v) for v in field_size)
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
        x, offset = stage1_input(t2w, self.field_size)
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
        if self.t2_only:
            t1w = np.zeros_like(t2w)
            t1_inside = np.ones(w_shape, bool)
        else:
            t1w = resample(t1.data, t1.affine, w_shape, w_aff).numpy()
            t1_inside = field_overlap(t1.shape, t1.affine, w_shape, w_aff).numpy()
            if not t1_inside.any():
                raise InputError(f"T1w {t1.path}: does not overlap the T2w {t2.path} in world space (check both headers)")
        tm["resample"] = time.perf_counter() - t0

        self._stage("localise")
        t0 = time.perf_counter()
        if self.localiser is None:
            cord, box = np.zeros(w_shape, np.uint8), (np.zeros(3, int), np.asarray(w_shape))
        else:
            cord = self.localise(t2w)
            box = cord_box(cord, w_shape, self.safety_factor, tuple(self.inferer.roi_size))
        tm["localise"] = time.perf_counter() - t0
        if box is None:
            log.warning("%s: no spinal cord found by stage 1; segmenting the whole field", t2.path)
            box = (np.zeros(3, int), np.asarray(w_shape))
        lo, hi = box
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        coverage = float(t1_inside[sl].mean())
        if coverage < self.min_t1_coverage:
            raise InputError(
                f"T1w {t1.path}: covers only {coverage:.0%} of the spinal cord region found on T2w {t2.path}; "
                "the two series do not overlap (check the headers or register T1w to T2w)"
            )

        self._stage("segment")
        t0 = time.perf_counter()
        crop = np.stack([t2w[sl], t1w[sl]])
        probs_crop = self.segment_crop(crop)
        probs_w = np.zeros((4, *w_shape), np.float32)
        probs_w[(slice(None), *sl)] = probs_crop
        tm["segment"] = time.perf_counter() - t0

        self._stage("postprocess")
        t0 = time.perf_counter()
        probs = resample(probs_w, w_aff, t2.shape, t2.affine).numpy()
        labelmap = labelmap_from_probabilities(probs, self.threshold)
        labelmap = postprocess_labelmap(labelmap, t2.voxel_volume_mm3, self.min_volume_cm3, self.fill_holes)
        tm["postprocess"] = time.perf_counter() - t0
        self._stage("done")
        return CascadeResult(
            labelmap=labelmap,
            probabilities=probs if self.keep_probabilities else None,
            affine=t2.affine,
            box_working=box,
            cord_found=bool(cord.any()),
            cord_working=cord,
            working_shape=w_shape,
            working_affine=w_aff,
            timings=tm,
        )


__all__ = ["Cascade", "CascadeResult", "stage1_input", "cord_box", "zscore", "STAGE1_FIELD", "ROI_SIZE", "SAFETY_FACTOR", "LABELS"]
