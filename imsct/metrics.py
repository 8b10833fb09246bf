"""Segmentation metrics, written once for the bundle, the app and the scripts."""

from __future__ import annotations

import numpy as np


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient of two binary masks; 1.0 when both are empty, 0.0 when only one is."""
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    denom = int(p.sum()) + int(t.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int((p & t).sum()) / denom


def box_coverage(mask: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    """Share of the voxels of ``mask`` that lie inside the box ``[lo, hi)``; 1.0 for an empty mask."""
    total = int(np.count_nonzero(mask))
    if total == 0:
        return 1.0
    inside = int(np.count_nonzero(mask[tuple(slice(a, b) for a, b in zip(lo, hi))]))
    return inside / total
