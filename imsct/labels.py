"""Label names, indices, colours and file suffixes shared by every front door."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Index of each class in the single label map (``_seg-imsct``); 0 is background.
LABELS: dict[str, int] = {"tumor": 1, "edema": 2, "cavity": 3}

# The classes IMSCT reports, in order; also the output channels of the stage-2 network (sigmoid
# each; whole tumour contains the other three).
CLASSES: tuple[str, ...] = ("tumor", "edema", "cavity", "whole-tumor")
STAGE2_CHANNELS: tuple[str, ...] = CLASSES
WHOLE = CLASSES[3]
# outputs of the anatomy network (model 'anatomy'): the tight spinal cord and the intervertebral discs
ANATOMY_CHANNELS: tuple[str, ...] = ("cord", "discs")
REPORT_ORDER: tuple[str, ...] = (WHOLE, *CLASSES[:3])  # tables lead with whole tumour

# RGB colours used in viewers and QC overlays.
COLOURS: dict[str, tuple[int, int, int]] = {
    "tumor": (230, 25, 75),
    "edema": (255, 225, 25),
    "cavity": (0, 130, 200),
}

# File suffixes, identical to the Spinal Cord Toolbox's ``sct_deepseg tumor_edema_cavity_t1_t2``.
SEG_SUFFIXES: dict[str, str] = {name: f"_seg-{name}" for name in STAGE2_CHANNELS}
LABELMAP_SUFFIX = "_seg-imsct"
PROB_PREFIX = "_prob-"  # soft outputs: <T2w name>_prob-<class>.nii.gz, float32 in [0, 1]
CORD_BOX_SUFFIX = "_sc-mask"  # stage-1 target: 30 mm cylinder around the cord centreline
CORD_SUFFIX = "_seg-cord"  # tight cord mask
LEVELS_SUFFIX = "_seg-levels"  # vertebral level of each cord voxel (SCT: value = level, 2 = C2, 8 = T1)
DISCS_SUFFIX = "_seg-discs"  # intervertebral disc tissue (phantom truth; the anatomy network's second output)
DISC_LABELS_SUFFIX = "_label-discs"  # one voxel per disc on the cord, value = disc number (SCT: 3 = C2/C3)

# Default minimum component volumes kept by post-processing, in cm3 (Lemay et al. 2021).
MIN_VOLUME_CM3: dict[str, float] = {"tumor": 0.2, "edema": 0.5, "cavity": 0.5}


def output_paths(case_name: str, output_dir: str | Path, probabilities: bool = False, anatomy: bool = False) -> dict[str, Path]:
    """Where a case's outputs go: the four SCT-named masks (keys = class names), the label map
    (``"labelmap"``), its JSON sidecar (``"sidecar"``: provenance), with ``probabilities`` the
    soft maps (``"prob-<class>"``) and with ``anatomy`` the tight cord (``"cord"``), the level map
    (``"levels"``) and the disc labels (``"discs"``)."""
    out = Path(output_dir)
    paths = {name: out / f"{case_name}{suffix}.nii.gz" for name, suffix in SEG_SUFFIXES.items()}
    paths["labelmap"] = out / f"{case_name}{LABELMAP_SUFFIX}.nii.gz"
    paths["sidecar"] = out / f"{case_name}{LABELMAP_SUFFIX}.json"  # provenance, BIDS-style beside the label map
    if anatomy:
        for key, suffix in (("cord", CORD_SUFFIX), ("levels", LEVELS_SUFFIX), ("discs", DISC_LABELS_SUFFIX)):
            paths[key] = out / f"{case_name}{suffix}.nii.gz"
    if probabilities:
        paths.update({f"prob-{name}": out / f"{case_name}{PROB_PREFIX}{name}.nii.gz" for name in STAGE2_CHANNELS})
    return paths


def split_masks(labelmap: np.ndarray) -> dict[str, np.ndarray]:
    """Binary masks of every class of :data:`CLASSES` from a label map (whole tumour = any lesion)."""
    masks = {name: labelmap == value for name, value in LABELS.items()}
    masks[WHOLE] = labelmap > 0
    return masks
