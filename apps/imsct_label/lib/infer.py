"""Inference tasks: the full cascade, the cord localiser alone, and the tumour stage alone.

Written on MONAI Label's abstract ``InferTask`` (``BasicInferTask`` would pull MONAI Label's
transform modules); the work is :class:`imsct.cascade.Cascade` on the case's T2w + Gd-T1w.
Every output is one label map on the T2w's grid. Bad input (missing T1w, unreadable file,
series that do not overlap) is answered with HTTP 422 and the library's message.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from typing import Any, Callable

import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from imsct.io import InputError, Volume, grid_difference, load_image, load_volume, save_volume, voxel_volume_mm3
from imsct.labels import COLOURS, LABELS

from .contrasts import MissingContrast, t1_path
from .models import ModelStore

log = logging.getLogger(__name__)

CORD_LABELS = {"cord": 1}
CORD_COLOURS = {"cord": (60, 180, 75)}
CORD_TAG = "cord"  # tag of an annotator's cord-region label (labels/cord/<id>.nii.gz locally)


def bad_input(message: str) -> HTTPException:
    """The HTTP answer to a case that cannot be processed: 422 with the message for the user."""
    return HTTPException(status_code=422, detail=message)


def load_case(datastore, request: dict) -> tuple[str | None, Volume, Volume]:
    """The request's image id, T2w and T1w volumes (HTTP 422 with a clear message otherwise)."""
    image_id = request.get("image_id")
    t2_file = request.get("image")
    if not isinstance(t2_file, str) or not t2_file:
        named = f": {image_id!r} is not an image of the datastore" if image_id else ""
        raise bad_input(f"no image given{named}; infer on a datastore image id")
    if not image_id:
        raise bad_input("an uploaded file has no Gd-T1w; upload the case (T2w and T1w) to the datastore and infer by its image id")
    try:
        t1_file = t1_path(datastore, image_id)
        return image_id, load_image(t2_file, "T2w"), load_image(t1_file, "T1w")
    except (InputError, MissingContrast) as exc:
        raise bad_input(str(exc)) from None


_results = {"dir": None}
_results_lock = threading.Lock()


def _results_dir() -> str:
    """This server's own folder for results. MONAI Label sends a result under its base name and
    removes the file after the response; its Python client saves what it receives as
    ``<client tmpdir>/<that name>``, by default the system temp folder. A result written straight
    into that folder had the very path the client writes to, and the server's clean-up removed the
    client's copy now and then."""
    with _results_lock:
        if _results["dir"] is None or not os.path.isdir(_results["dir"]):
            _results["dir"] = tempfile.mkdtemp(prefix="imsct-label-results-")
        return _results["dir"]


def write_label(labelmap: np.ndarray, affine: np.ndarray) -> str:
    """The label map as a temporary NIfTI file (MONAI Label moves or deletes it)."""
    fd, path = tempfile.mkstemp(prefix="imsct-", suffix=".nii.gz", dir=_results_dir())
    os.close(fd)
    save_volume(labelmap.astype(np.uint8), affine, path)
    return path


def class_volumes_cm3(labelmap: np.ndarray, affine: np.ndarray, labels: dict[str, int]) -> dict[str, float]:
    vox = voxel_volume_mm3(affine)
    return {name: round(float((labelmap == v).sum()) * vox / 1000.0, 4) for name, v in labels.items()}


# what annotators and admins read in /info: the shipped weights never saw a patient scan
WEIGHTS_NOTE = ("; weights shipped with IMSCT are trained on synthetic phantoms only (no patient data) until this "
                "server publishes a version retrained on its own final labels (see the model's version in /info)")


class _IMSCTInfer(InferTask):
    """Shared plumbing: weights from a :class:`ModelStore`, T1w by the datastore convention."""

    labels_map: dict[str, int] = LABELS
    colours: dict[str, tuple[int, int, int]] = COLOURS

    def __init__(self, store: ModelStore, datastore: Callable[[], Any], description: str, type=InferType.SEGMENTATION):
        super().__init__(type=type, labels=dict(self.labels_map), dimension=3, description=description + WEIGHTS_NOTE)
        self.store = store
        self.datastore = datastore

    def is_valid(self) -> bool:
        return self.store.is_valid()

    def get_path(self, validate=True):
        p = self.store.paths()["tumor"]
        return str(p) if (p.exists() or not validate) else None

    def info(self) -> dict:
        out = super().info()
        out["label_colors"] = {k: list(v) for k, v in self.colours.items()}
        out["weights"] = self.store.version() if self.store.is_valid() else {}
        if self.store.refused is not None:
            out["weights_refused"] = self.store.refused["reason"]  # a changed file that did not load
        return out

    def __call__(self, request) -> tuple[str | None, dict]:
        t0 = time.perf_counter()
        image_id, t2, t1 = load_case(self.datastore(), request)  # file reading outside the networks' lock
        with self.store.interactive():
            cascade = self.store.cascade()
            version = self.store.version()
            try:
                labelmap, extra = self.run(cascade, image_id, t2, t1)
            except InputError as exc:
                raise bad_input(str(exc)) from None
        path = write_label(labelmap, t2.affine)
        params = {
            "label_names": dict(self.labels_map),
            "label_colors": {k: list(v) for k, v in self.colours.items()},
            "volumes_cm3": class_volumes_cm3(labelmap, t2.affine, self.labels_map),
            "model_version": version,
            "latencies": {"total": round(time.perf_counter() - t0, 2)},
            **extra,
        }
        return path, params

    def run(self, cascade, image_id: str, t2: Volume, t1: Volume) -> tuple[np.ndarray, dict]:
        raise NotImplementedError


def remember_box(datastore, image_id: str, box, localiser_sha: str) -> None:
    """Keep stage 1's box in the image info (the uncertainty strategy reuses it)."""
    if box is None:
        return
    try:
        datastore.update_image_info(image_id, {"imsct_stage1_box": {
            "lo": [int(v) for v in box[0]], "hi": [int(v) for v in box[1]], "localiser": localiser_sha}})
    except Exception as exc:  # a read-only or remote datastore: the box is only a cache
        log.debug("could not store the stage-1 box of %s: %s", image_id, exc)


class CascadeInfer(_IMSCTInfer):
    """Stage 1 finds the cord, stage 2 labels tumour (1), edema (2), cavity (3) inside its box."""

    def __init__(self, store, datastore):
        super().__init__(store, datastore, "IMSCT cascade: cord localiser, then tumour / edema / cavity on T2w + Gd-T1w")

    def run(self, cascade, image_id, t2, t1):
        res = cascade(t2, t1)
        remember_box(self.datastore(), image_id, res.box_working, self.store.version()["localiser"]["sha256"])
        box = {"lo": [int(v) for v in res.box_working[0]], "hi": [int(v) for v in res.box_working[1]]}
        return res.labelmap, {"cord_found": res.cord_found, "stage1_box": box, "timings": res.timings}


class LocaliserInfer(_IMSCTInfer):
    """Stage 1 alone: the cord region (the localiser's target) on the T2w grid."""

    labels_map = CORD_LABELS
    colours = CORD_COLOURS

    def __init__(self, store, datastore):
        super().__init__(store, datastore, "IMSCT stage 1 alone: spinal cord region from the T2w")

    def run(self, cascade, image_id, t2, t1):
        w, cord_w, box = cascade.locate(t2)  # the box the cascade would crop
        remember_box(self.datastore(), image_id, box, self.store.version()["localiser"]["sha256"])
        return cascade.cord_to_native(cord_w, w, t2), {"cord_found": bool(cord_w.any())}


class TumorInfer(_IMSCTInfer):
    """Stage 2 alone, inside the case's saved cord label (tag ``cord``) instead of stage 1's."""

    def __init__(self, store, datastore):
        super().__init__(store, datastore, "IMSCT stage 2 alone: tumour / edema / cavity inside the case's saved cord label (tag 'cord')")

    def run(self, cascade, image_id, t2, t1):
        uri = self.datastore().get_label_uri(image_id, CORD_TAG)
        if not uri:
            raise InputError(f"image '{image_id}': no cord label (tag '{CORD_TAG}'); save one with that tag, or use the cascade model")
        cord = load_volume(uri, "cord label")
        diff = grid_difference(cord, t2)
        if diff:
            raise InputError(f"cord label {uri}: label grid differs from the T2w ({t2.path}): {diff}; a label must be on its image's grid")
        if not (cord.data > 0.5).any():
            raise InputError(f"cord label {uri}: empty")
        res = cascade(t2, t1, cord=cord)  # same networks; stage 1 replaced by the annotator's cord
        box = {"lo": [int(v) for v in res.box_working[0]], "hi": [int(v) for v in res.box_working[1]]}
        return res.labelmap, {"cord_label": uri, "stage1_box": box, "timings": res.timings}
