"""Post-processing of the masks (Lemay et al. 2021): threshold, fill holes, drop small components."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .labels import LABELS


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 26-connected component of a binary mask (empty stays empty)."""
    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(sizes.argmax())


def remove_small(mask: np.ndarray, min_voxels: float) -> np.ndarray:
    """Drop 26-connected components smaller than ``min_voxels``."""
    if min_voxels <= 0 or not mask.any():
        return mask.astype(bool)
    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[lab]


def labelmap_from_probabilities(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Exclusive label map from the four sigmoid channels [tumour, edema, cavity, whole tumour].

    A voxel is lesion when the whole-tumour channel or any class channel passes ``threshold``;
    its class is the most probable of tumour, edema and cavity. The whole tumour is therefore
    always the union of the three classes.
    """
    classes = probs[:3]
    lesion = (probs[3] > threshold) | (classes > threshold).any(axis=0)
    return np.where(lesion, classes.argmax(axis=0) + 1, 0).astype(np.uint8)


def postprocess_labelmap(
    labelmap: np.ndarray, voxel_mm3: float, min_volume_cm3: dict[str, float], fill_holes: bool = True
) -> np.ndarray:
    """Fill holes in each class and in the whole tumour, then remove components smaller than the
    class's minimum volume (cm3, converted with the voxel volume in mm3)."""
    out = labelmap.copy()
    box = ndimage.find_objects((out > 0).astype(np.uint8))
    if not box:
        return out
    sub = out[box[0]]  # a view: every step works inside the lesions' bounding box only
    if fill_holes:
        holes = ndimage.binary_fill_holes(sub > 0) & (sub == 0)
        if holes.any():  # a hole takes the class of its nearest labelled voxel
            idx = ndimage.distance_transform_edt(sub == 0, return_distances=False, return_indices=True)
            sub[holes] = sub[tuple(i[holes] for i in idx)]
    for name, value in LABELS.items():
        mask = sub == value
        kept = remove_small(mask, min_volume_cm3.get(name, 0.0) * 1000.0 / voxel_mm3)
        sub[mask & ~kept] = 0
    return out


def keep_touching(labelmap: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The intramedullary constraint: drop every lesion that does not overlap ``region`` (the cord
    region, a binary mask on the same grid). A lesion is a 26-connected component of the whole
    tumour (any label), judged as a whole and kept whole: tumour, edema and cavity of one lesion are
    contiguous, so an edema or a syrinx that extends beyond the region from a tumour inside it is
    kept with it, and a large tumour that widens the cord past the region survives as long as any
    voxel of it touches the region. Labels are kept as they are; returns a new label map."""
    out = np.asarray(labelmap).copy()
    if not out.any():
        return out
    lab, n = ndimage.label(out > 0, structure=np.ones((3, 3, 3), bool))
    touching = np.unique(lab[(lab > 0) & (np.asarray(region) > 0)])
    keep = np.zeros(n + 1, bool)
    keep[touching] = True
    keep[0] = False
    out[~keep[lab]] = 0
    return out
