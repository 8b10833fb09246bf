"""Segmentation metrics of Lemay et al. 2021 (Table 4), written once for the bundle, the app and
the scripts.

Conventions for empty masks (a class absent from a subject is common):

* Dice is 1 when truth and prediction are both empty, 0 when only one is.
* Precision is undefined (NaN) for an empty prediction, recall for an empty truth; both are 1 when
  the two are empty.
* Relative volume difference ``(truth - prediction) / truth`` (negative = over-segmentation) and
  its absolute value are NaN for an empty truth with a non-empty prediction, 0 when both are empty.
* Detection: a structure (26-connected component) is detected when prediction and truth overlap by
  at least ``min_overlap_mm3`` (6 mm3 in the paper). The true-positive detection rate is the share
  of true structures detected (NaN with no true structure); the false-positive detection rate is the
  share of predicted structures that overlap no true structure by that much (NaN with no
  predicted structure).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .labels import split_masks


DETECTION_MIN_OVERLAP_MM3 = 6.0
_STRUCT = np.ones((3, 3, 3), bool)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient of two binary masks; 1.0 when both are empty, 0.0 when only one is."""
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    denom = int(p.sum()) + int(t.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int((p & t).sum()) / denom


def precision_recall(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    tp, np_, nt = int((p & t).sum()), int(p.sum()), int(t.sum())
    if np_ == 0 and nt == 0:
        return 1.0, 1.0
    return (tp / np_ if np_ else math.nan), (tp / nt if nt else math.nan)


def volume_difference(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(relative, absolute) volume difference, ``(truth - prediction) / truth``."""
    vp, vt = int(np.count_nonzero(pred)), int(np.count_nonzero(truth))
    if vt == 0:
        return (0.0, 0.0) if vp == 0 else (math.nan, math.nan)
    rel = (vt - vp) / vt
    return rel, abs(rel)


def detection_rates(pred: np.ndarray, truth: np.ndarray, voxel_mm3: float, min_overlap_mm3: float = DETECTION_MIN_OVERLAP_MM3) -> tuple[float, float, int, int]:
    """(true-positive rate, false-positive rate, number of true structures, number predicted)."""
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    min_vox = min_overlap_mm3 / voxel_mm3
    lt, nt = ndimage.label(t, _STRUCT)
    lp, np_ = ndimage.label(p, _STRUCT)
    tpr = math.nan
    if nt:
        overlap_t = np.bincount(lt[p], minlength=nt + 1)[1:]  # overlap of each true structure
        tpr = float(np.mean(overlap_t >= min_vox - 1e-9))
    fpr = math.nan
    if np_:
        overlap_p = np.bincount(lp[t], minlength=np_ + 1)[1:]
        fpr = float(np.mean(overlap_p < min_vox - 1e-9))
    return tpr, fpr, nt, np_


def box_counts(mask: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[int, int]:
    """Voxels of ``mask`` inside the box ``[lo, hi)``, and in all."""
    inside = int(np.count_nonzero(mask[tuple(slice(a, b) for a, b in zip(lo, hi))]))
    return inside, int(np.count_nonzero(mask))


def box_coverage(mask: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    """Share of the voxels of ``mask`` that lie inside the box ``[lo, hi)``; 1.0 for an empty mask."""
    inside, total = box_counts(mask, lo, hi)
    return inside / total if total else 1.0


def case_metrics(pred_labelmap: np.ndarray, truth_labelmap: np.ndarray, voxel_mm3: float) -> dict[str, float]:
    """Every Table-4 metric per class (tumor, edema, cavity, whole-tumor) for one case, as a flat
    dict ``{"<class>_<metric>": value}``, plus truth/prediction volumes in mm3."""
    out: dict[str, float] = {}
    pm, tm = split_masks(pred_labelmap), split_masks(truth_labelmap)
    for name in pm:
        p, t = pm[name], tm[name]
        prec, rec = precision_recall(p, t)
        rvd, avd = volume_difference(p, t)
        tpr, fpr, nt, npred = detection_rates(p, t, voxel_mm3)
        out.update({
            f"{name}_dice": dice(p, t), f"{name}_precision": prec, f"{name}_recall": rec,
            f"{name}_rvd": rvd, f"{name}_avd": avd, f"{name}_tpr_detection": tpr, f"{name}_fpr_detection": fpr,
            f"{name}_n_true": nt, f"{name}_n_pred": npred,
            f"{name}_vol_true_mm3": float(t.sum() * voxel_mm3), f"{name}_vol_pred_mm3": float(p.sum() * voxel_mm3),
        })
    return out
