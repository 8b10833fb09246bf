"""Per-class Dice between the model's label and the annotator's final label of each image.

MONAI Label's built-in Dice scoring treats a label map as one foreground; here every class is
scored (tumor, edema, cavity, and the whole tumour = any of them) with :func:`imsct.metrics.dice`,
and the result is stored in the datastore's image info under ``"dice"``::

    {"dice": {"tumor": 0.81, "edema": 0.64, "cavity": 1.0, "whole-tumor": 0.79,
              "original_ts": ..., "final_ts": ..., "model": "cascade"}}
"""

from __future__ import annotations

import logging
import time

import numpy as np
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.tasks.scoring import ScoringMethod

from imsct.io import InputError, load_volume
from imsct.metrics import dice
from imsct.labels import split_masks

log = logging.getLogger(__name__)

ORIGINAL, FINAL = DefaultLabelTag.ORIGINAL.value, DefaultLabelTag.FINAL.value


def label_dice(original_file: str, final_file: str) -> dict[str, float]:
    """Dice of each class between two label maps on the same grid."""
    orig = load_volume(original_file, "model label")
    final = load_volume(final_file, "final label")
    if orig.shape != final.shape:
        raise InputError(f"final label {final_file}: grid {final.shape} differs from the model label's {orig.shape} ({original_file})")
    pm = split_masks(np.rint(orig.data).astype(np.uint8))
    fm = split_masks(np.rint(final.data).astype(np.uint8))
    return {name: round(dice(pm[name], fm[name]), 4) for name in pm}


def score_image(datastore, image_id: str, force: bool = False) -> dict | None:
    """Score one image if it has both labels (and they changed since the last score); stores and
    returns the scores, or None when there is nothing to score."""
    labels = datastore.get_labels_by_image_id(image_id)
    if ORIGINAL not in labels or FINAL not in labels:
        return None
    o_info = datastore.get_label_info(labels[ORIGINAL], ORIGINAL) or {}
    f_info = datastore.get_label_info(labels[FINAL], FINAL) or {}
    stamp = {"original_ts": o_info.get("ts"), "final_ts": f_info.get("ts")}
    old = datastore.get_image_info(image_id).get("dice") or {}
    if not force and old and all(old.get(k) == v for k, v in stamp.items()) and None not in stamp.values():
        return old
    try:
        scores = label_dice(datastore.get_label_uri(labels[ORIGINAL], ORIGINAL), datastore.get_label_uri(labels[FINAL], FINAL))
    except InputError as exc:
        log.warning("dice of %s not computed: %s", image_id, exc)
        entry = {"error": str(exc), **stamp}
    else:
        entry = {**scores, **stamp, "model": o_info.get("model"), "scored_ts": int(time.time())}
    datastore.update_image_info(image_id, {"dice": entry})
    return entry


class MulticlassDice(ScoringMethod):
    """Per-class Dice (model label vs final label) for every image that has both."""

    def __init__(self):
        super().__init__("Per-class Dice (tumor, edema, cavity, whole tumour) between the model's label and the final label")

    def __call__(self, request, datastore):
        force = bool(request.get("force", False))
        out = {}
        for image_id in datastore.list_images():
            entry = score_image(datastore, image_id, force)
            if entry is not None:
                out[image_id] = entry
        return out
