"""Interactive correction: a DeepEdit-type infer task over :mod:`imsct.clicks` (model ``clicks``).

3D Slicer's and OHIF's MONAI Label plugins drive a model of type ``deepedit`` with the clicks in the
request: the label names as keys, each with a list of ``[i, j, k]`` voxel indices of the image
(the T2w as the datastore holds it), plus ``background`` (DeepGrow's ``foreground`` with
``label`` is read too). Each request carries all the clicks so far; the answer is the whole label
map on the T2w grid:

* without a click, the click network's answer over the cascade's box (stage 1 finds the cord; the
  click network with empty click maps, which at initialisation is exactly stage 2);
* with clicks, that answer with the box around the clicks (at least 64 x 64 x 32 working voxels,
  :func:`imsct.clicks.click_box`) re-predicted from the T2w, the T1w and the click maps.

The no-click answer of an image is kept in memory (a few images, keyed by the image file and the
weights), so a click costs only the crop's forward pass. Post-processing is the cascade's (holes
filled, small components removed); the intramedullary constraint is not applied (the annotator
decides). A click outside the image is answered with HTTP 422 naming it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferType

from imsct import weights
from imsct.clicks import CLICK_CLASSES, CROP_SIZE, check_inside, click_box, correct, count, parse_points, predict_large, to_working_points
from imsct.geometry import box_slices
from imsct.io import InputError

from .infer import _IMSCTInfer, bad_input

log = logging.getLogger(__name__)

MODEL_KEY = "clicks"
CACHED_IMAGES = 4
DESCRIPTION = ("IMSCT interactive correction (DeepEdit-type): click tumor / edema / cavity / background points on the T2w; "
               "the region around the clicks is re-segmented from T2w + Gd-T1w. Weights trained on synthetic phantoms only "
               "(no patient data), fine-tuned from the shipped stage 2 with simulated clicks (bundle/models/provenance_clicks.json)")


class ClickInfer(_IMSCTInfer):
    """Model ``clicks``: the weights ``clicks.pt`` of the served models folder, else of the shipped one."""

    def __init__(self, store, datastore, shipped_dir: str | Path | None = None):
        super().__init__(store, datastore, DESCRIPTION, type=InferType.DEEPEDIT)
        self.description = DESCRIPTION  # not the retrained-weights note: this model is never retrained by the server
        self.shipped_dir = Path(shipped_dir) if shipped_dir else weights.DEFAULT_MODELS_DIR
        self._net = None
        self._net_stamp = None
        self._base: OrderedDict = OrderedDict()
        self._lock = threading.RLock()
        self._request = threading.local()

    # ---- weights -------------------------------------------------------------------------------------

    def weights_file(self) -> Path | None:
        for folder in (self.store.models_dir, self.shipped_dir):
            p = weights.path(MODEL_KEY, folder)
            if p.is_file():
                return p
        return None

    def is_valid(self) -> bool:
        return self.store.is_valid() and self.weights_file() is not None

    def get_path(self, validate=True):
        p = self.weights_file()
        return str(p) if p is not None else (None if validate else str(weights.path(MODEL_KEY, self.store.models_dir)))

    def network(self):
        p = self.weights_file()
        if p is None:
            raise InputError(f"no {weights.spec(MODEL_KEY).filename} in {self.store.models_dir} or {self.shipped_dir}")
        st = p.stat()
        stamp = (str(p), st.st_mtime_ns, st.st_size)
        with self._lock:
            if self._net is None or stamp != self._net_stamp:
                self._net = weights.load(MODEL_KEY, file=p).to(self.store.device)
                self._net_stamp = stamp
                self._base.clear()
            return self._net

    def info(self) -> dict:
        out = super().info()
        p = self.weights_file()
        if p is not None:
            out["weights"] = {**out.get("weights", {}), MODEL_KEY: {"file": str(p), "sha256": weights.checksum(MODEL_KEY, p.parent)[:16]}}
        out["click_classes"] = list(CLICK_CLASSES)
        out["crop_working_voxels"] = list(CROP_SIZE)
        return out

    # ---- one request ------------------------------------------------------------------------------------

    def __call__(self, request):
        try:
            self._request.points = parse_points(request)
        except InputError as exc:
            raise bad_input(str(exc)) from None
        return super().__call__(request)

    def _base_answer(self, cascade, net, t2, t1):
        """The image's no-click answer (working image, box, probabilities in the box), cached."""
        st = os.stat(t2.path) if os.path.exists(str(t2.path)) else None
        key = (str(t2.path), st.st_mtime_ns if st else None, self._net_stamp, self.store.version_key())
        with self._lock:
            if key in self._base:
                self._base.move_to_end(key)
                return self._base[key], 0.0
        t0 = time.perf_counter()
        w = cascade.working(t2)
        _, box = cascade.find_box(w.data)
        crop, _ = cascade.stage2_input(w.data, w.affine, box, t1)
        with cascade._autocast():
            probs = predict_large(net, crop, inferer=cascade.inferer)
        value = (w, box, probs)
        with self._lock:
            self._base[key] = value
            while len(self._base) > CACHED_IMAGES:
                self._base.popitem(last=False)
        return value, time.perf_counter() - t0

    def run(self, cascade, image_id, t2, t1):
        points = self._request.points
        check_inside(points, t2.shape, f"T2w {os.path.basename(str(t2.path))}")
        net = self.network()
        (w, box, base), base_s = self._base_answer(cascade, net, t2, t1)
        t0 = time.perf_counter()
        lo, hi = (np.asarray(v) for v in box)
        extra = {"clicks": {k: len(v) for k, v in points.items()},
                 "stage1_box": {"lo": [int(v) for v in lo], "hi": [int(v) for v in hi]}}
        if count(points) == 0:
            region, probs = (lo, hi), base
        else:
            pts = to_working_points(points, t2.affine, w.affine)
            pts = {k: np.clip(v, 0, np.asarray(w.shape) - 1) for k, v in pts.items()}  # the native edge may fall just outside
            c_lo, c_hi = click_box(pts, w.shape)
            r_lo, r_hi = np.minimum(lo, c_lo), np.maximum(hi, c_hi)  # the box and the clicks' crop
            probs = np.zeros((base.shape[0], *(r_hi - r_lo)), np.float32)
            probs[(slice(None), *box_slices(lo - r_lo, hi - r_lo))] = base
            image, _ = cascade.stage2_input(w.data, w.affine, (r_lo, r_hi), t1)
            with cascade._autocast():
                probs, _ = correct(net, image, probs, {k: v - r_lo for k, v in pts.items()}, cascade.spacing,
                                   inferer=cascade.inferer)
            region = (r_lo, r_hi)
            extra["click_box"] = {"lo": [int(v) for v in c_lo], "hi": [int(v) for v in c_hi]}
        labelmap, _ = cascade.to_native(probs, region, w.affine, t2)
        extra["timings"] = {"no_click_answer": round(base_s, 3), "correction": round(time.perf_counter() - t0, 3)}
        return labelmap, extra
