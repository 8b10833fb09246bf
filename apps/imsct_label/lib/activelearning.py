"""Active learning: which unlabelled case should an annotator correct next.

``uncertainty`` ranks the unlabelled cases by Monte-Carlo dropout on the cascade (Gal and
Ghahramani 2016): the stage-2 network keeps its dropout layers (p = 0.3 in every context module)
active for ``mc_samples`` passes over the stage-1 box, and a case's score is the voxel-wise
variance of the four sigmoid outputs across passes, averaged over the box. A case whose T1w is
missing cannot be scored and is listed under ``skipped``.

Scores are cached in each image's info (``"uncertainty"``), keyed by the served weights: a retrained
model makes every score stale, and the next request recomputes them. The stage-1 box found by an
earlier cascade inference with the same localiser is reused (stage 1 is deterministic).
"""

from __future__ import annotations

import logging
import random
import time

import numpy as np
from monailabel.interfaces.tasks.strategy import Strategy

from imsct.io import InputError, load_image

from .contrasts import MissingContrast, t1_path
from .infer import remember_box
from .models import ModelStore

log = logging.getLogger(__name__)


class RandomStrategy(Strategy):
    """A random unlabelled image, weighted by the seconds since it was last offered (so that
    annotators working at once tend to get different cases). Unlike MONAI Label 0.8.5's ``Random``,
    whose weights are all 0 (and ``random.choices`` raises, HTTP 500) when every candidate was
    offered within the current second, e.g. a one-image datastore asked twice, every weight is at
    least 1."""

    def __init__(self):
        super().__init__("Random unlabelled image, least recently offered more likely")

    def __call__(self, request, datastore):
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        now = int(time.time())
        strategy = request["strategy"]
        weights = [max(1, now - datastore.get_image_info(i).get("strategy", {}).get(strategy, {}).get("ts", 0)) for i in images]
        k = random.choices(range(len(images)), weights=weights)[0]
        return {"id": images[k], "weight": weights[k]}


class MCDropoutUncertainty(Strategy):
    """Most uncertain unlabelled case first (Monte-Carlo dropout on the cascade)."""

    def __init__(self, store: ModelStore, samples: int = 4):
        super().__init__(f"Most uncertain unlabelled case: Monte-Carlo dropout ({samples} passes of stage 2 in the stage-1 box)")
        self.store, self.samples = store, samples

    def score(self, datastore, image_id: str) -> float:
        info = datastore.get_image_info(image_id)
        version = self.store.version_key()
        cached = info.get("uncertainty") or {}
        if cached.get("model") == version and cached.get("samples") == self.samples:
            return float(cached["score"])
        t2 = load_image(datastore.get_image_uri(image_id), "T2w")
        t1 = load_image(t1_path(datastore, image_id), "T1w")
        with self.store.lock:
            cascade = self.store.cascade()
            loc_sha = self.store.version()["localiser"]["sha256"]
            b = info.get("imsct_stage1_box") or {}
            box = (np.asarray(b["lo"]), np.asarray(b["hi"])) if b.get("localiser") == loc_sha else None
            t0 = time.perf_counter()
            score, box_used = cascade.mc_dropout(t2, t1, self.samples, box)
        if box is None:
            remember_box(datastore, image_id, box_used, loc_sha)
        datastore.update_image_info(image_id, {"uncertainty": {
            "score": score, "model": version, "samples": self.samples, "seconds": round(time.perf_counter() - t0, 2)}})
        return score

    def __call__(self, request, datastore):
        images = sorted(datastore.get_unlabeled_images())
        if not images:
            return None
        ranking, skipped = [], {}
        for image_id in images:
            try:
                ranking.append((image_id, self.score(datastore, image_id)))
            except (InputError, MissingContrast) as exc:
                skipped[image_id] = str(exc)
        if not ranking:
            log.warning("uncertainty: no unlabelled case can be scored: %s", skipped)
            return None
        ranking.sort(key=lambda r: -r[1])
        return {"id": ranking[0][0], "uncertainty_score": ranking[0][1],
                "ranking": [{"id": i, "score": s} for i, s in ranking], "skipped": skipped}
