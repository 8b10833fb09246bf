"""Active learning: which unlabelled case should an annotator correct next.

``uncertainty`` ranks the unlabelled cases by Monte-Carlo dropout on the cascade (Gal and
Ghahramani 2016): the stage-2 network keeps its dropout layers (p = 0.3 in every context module)
active for ``mc_samples`` passes over the stage-1 box, and a case's score is the voxel-wise
variance of the four sigmoid outputs across passes, averaged over the box. A case whose T1w is
missing cannot be scored and is listed under ``skipped``.

Scores are computed **in the background** (:class:`UncertaintyScores`, one thread of the
server), never inside a request: at start, within ``POLL_S`` seconds of an image upload and of
a publication of new weights (a retrained model makes every score stale), one case at a time,
letting annotators' inferences use the networks first. They are cached in each image's info
(``"uncertainty"``), keyed by the served weights and the number of passes. A request ranks the
cases scored for the served weights; while some unlabelled case is not scored yet, it answers
one of those (the least recently offered is the likeliest, as ``random``), with
``"scored": false`` and the list under ``pending``, so an annotator always gets a case at once.
The stage-1 box found by an earlier inference with the same localiser is reused (stage 1 is
deterministic).
"""

from __future__ import annotations

import logging
import random
import threading
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
        return self.pick(datastore, images, request["strategy"])

    @staticmethod
    def pick(datastore, images: list[str], strategy: str) -> dict:
        """One of ``images``, weighted by the seconds since ``strategy`` last offered it (at least 1)."""
        now = int(time.time())
        weights = [max(1, now - datastore.get_image_info(i).get("strategy", {}).get(strategy, {}).get("ts", 0)) for i in images]
        k = random.choices(range(len(images)), weights=weights)[0]
        return {"id": images[k], "weight": weights[k]}


class UncertaintyScores:
    """Monte-Carlo dropout scores of the unlabelled cases, computed by a background thread.

    ``start()`` (the server does it) launches the thread; it looks every ``poll_s`` seconds (or
    when :meth:`wake` is called) for unlabelled cases without a score for the served weights and
    scores them, one at a time, each after no annotator's request waits for the networks (and
    between two Monte-Carlo passes, an annotator's request that arrived meanwhile goes first). A case
    that cannot be scored (no T1w, unreadable) is tried again after ``retry_s`` seconds or when the
    weights change."""

    POLL_S = 2.0
    RETRY_S = 60.0

    def __init__(self, store: ModelStore, datastore, samples: int = 4, poll_s: float = POLL_S, retry_s: float = RETRY_S):
        self.store, self.datastore, self.samples = store, datastore, samples
        self.poll_s, self.retry_s = poll_s, retry_s
        self.skipped: dict[str, tuple[str, float, str]] = {}  # image id -> (weights, when, reason)
        self.current: str | None = None  # the case being scored now
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the cache -----------------------------------------------------------------------------

    def cached(self, datastore, image_id: str, version: str | None = None) -> float | None:
        """The case's score for the served weights, None when it has none yet."""
        cached = datastore.get_image_info(image_id).get("uncertainty") or {}
        version = version or self.store.version_key()
        if cached.get("model") == version and cached.get("samples") == self.samples and "score" in cached:
            return float(cached["score"])
        return None

    def skip_reason(self, image_id: str, version: str) -> str | None:
        entry = self.skipped.get(image_id)
        if entry is None or entry[0] != version:
            return None
        return entry[2]

    def compute(self, datastore, image_id: str) -> float:
        """Score one case now (the networks under the store's lock) and cache it in the image info."""
        info = datastore.get_image_info(image_id)
        t1 = load_image(t1_path(datastore, image_id), "T1w")  # a missing T1w fails first, before any reading
        t2 = load_image(datastore.get_image_uri(image_id), "T2w")
        with self.store.lock:
            cascade = self.store.cascade()
            version = self.store.version_key()
            loc_sha = self.store.version()["localiser"]["sha256"]
            b = info.get("imsct_stage1_box") or {}
            box = (np.asarray(b["lo"]), np.asarray(b["hi"])) if b.get("localiser") == loc_sha else None
            t0 = time.perf_counter()
            score, box_used = cascade.mc_dropout(t2, t1, self.samples, box, between=self._annotators_first)
        if box is None:
            remember_box(datastore, image_id, box_used, loc_sha)
        datastore.update_image_info(image_id, {"uncertainty": {
            "score": score, "model": version, "samples": self.samples, "seconds": round(time.perf_counter() - t0, 2)}})
        return score

    def _annotators_first(self) -> None:
        """Between two Monte-Carlo passes (the caller holds the store's lock once): while an
        annotator's request waits for the networks, let it have them."""
        if not self.store.interactive_waiting():
            return
        self.store.lock.release()
        try:
            while self.store.interactive_waiting() and not self._stop.is_set():
                time.sleep(0.05)
        finally:
            self.store.lock.acquire()

    # ---- the background thread -------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, daemon=True, name="uncertainty-scores")
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def todo(self, datastore, version: str) -> list[str]:
        """Unlabelled cases without a score for ``version`` (and not failed lately)."""
        now = time.monotonic()
        out = []
        for image_id in sorted(datastore.get_unlabeled_images()):
            if self.cached(datastore, image_id, version) is not None:
                continue
            entry = self.skipped.get(image_id)
            if entry is not None and entry[0] == version and now - entry[1] < self.retry_s:
                continue
            out.append(image_id)
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._score_pending()
            except Exception:  # noqa: BLE001 - keep the thread alive; the next look tries again
                log.exception("uncertainty: background scoring failed; trying again in %.0f s", self.poll_s)
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def _score_pending(self) -> None:
        if not self.store.is_valid():
            return
        datastore = self.datastore()
        version = self.store.version_key()
        todo = self.todo(datastore, version)
        if todo:
            log.info("uncertainty: scoring %d unlabelled case(s) in the background for weights %s", len(todo), version)
        for image_id in todo:
            while self.store.interactive_waiting() and not self._stop.is_set():
                time.sleep(0.2)  # an annotator's inference goes first
            if self._stop.is_set() or self.store.version_key() != version:
                return  # new weights: the next look starts over with them
            if image_id not in datastore.get_unlabeled_images():
                continue  # labelled meanwhile
            self.current = image_id
            t0 = time.perf_counter()
            try:
                score = self.compute(datastore, image_id)
            except (InputError, MissingContrast) as exc:
                self.skipped[image_id] = (version, time.monotonic(), str(exc))
                log.info("uncertainty: %s not scored: %s", image_id, exc)
            else:
                self.skipped.pop(image_id, None)
                log.info("uncertainty: %s scored %.6f (%.1f s)", image_id, score, time.perf_counter() - t0)
            finally:
                self.current = None


class MCDropoutUncertainty(Strategy):
    """Most uncertain unlabelled case first (Monte-Carlo dropout on the cascade), from the
    background scores of :class:`UncertaintyScores`; never computes inside the request."""

    def __init__(self, scores: UncertaintyScores):
        super().__init__(f"Most uncertain unlabelled case: Monte-Carlo dropout ({scores.samples} passes of stage 2 in the "
                         "stage-1 box), scored in the background; a case not scored yet is offered first")
        self.scores = scores

    def __call__(self, request, datastore):
        images = sorted(datastore.get_unlabeled_images())
        if not images:
            return None
        version = self.scores.store.version_key()
        ranking, skipped, pending = [], {}, []
        for image_id in images:
            score = self.scores.cached(datastore, image_id, version)
            why = self.scores.skip_reason(image_id, version)
            if score is not None:
                ranking.append((image_id, score))
            elif why is not None:
                skipped[image_id] = why
            else:
                pending.append(image_id)
        ranking.sort(key=lambda r: -r[1])
        out = {"ranking": [{"id": i, "score": s} for i, s in ranking], "skipped": skipped, "pending": pending,
               "weights": version}
        if pending:
            self.scores.wake()
            pick = RandomStrategy.pick(datastore, pending, request["strategy"])
            log.info("uncertainty: %d unlabelled case(s) not scored yet (scoring in the background); offering %s", len(pending), pick["id"])
            return {"id": pick["id"], "uncertainty_score": None, "scored": False, **out}
        if not ranking:
            log.warning("uncertainty: no unlabelled case can be scored: %s", skipped)
            return None
        return {"id": ranking[0][0], "uncertainty_score": ranking[0][1], "scored": True, **out}
