"""Trainers for both stages, fed from what annotators save (one final label map per case).

MONAI Label runs a trainer in a subprocess (``POST /train/<name>``, or the app's automatic
trigger after N new final labels), so inference keeps answering. A round is one call of
:func:`imsct.continual.retrain_round`: persistent train/validation split per centre, replay and
EWC against forgetting, and a gate that publishes the new weights into the served model folder
(atomic rename) only when earlier centres' validation cases do not get worse beyond
``gate_tolerance``. The inference tasks notice the new file and serve it without a restart.

Stage 1 (``localiser``) learns from the same final label maps: its target is built by
:mod:`imsct.continual` (the published localiser's cord region united with the dilated annotated
lesion), or taken from the case's own cord label when one was saved with the tag ``cord``.

A round needs ``min_new_labels`` (default 1) **new final labels of training cases**: cases whose
final label this stage has not been trained on yet in a published round (a corrected label counts
as new), among those the persistent split puts in training (each centre's first labelled case,
then about one in five, is held out for validation and never trains). With fewer, the round is
refused before it starts (:meth:`StageTrainer.refusal`: HTTP 409 from ``POST /train/<trainer>``,
the same reason in the log, and the number of final labels still to save), instead of a task
that ends "DONE" having trained nothing.

Progress: the round prints a line every tenth of its iterations (iteration, Dice loss, the
latest validation number, seconds so far and about how many are left) into the task's
``details`` (``GET /train/``) and the server log, and the same as JSON into
``<state_dir>/progress-<trainer>.json``, shown in ``/info`` under ``train_stats.<trainer>.progress``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.others.generic import file_checksum

from imsct.io import grid_difference, write_text_atomically

from .config import AppConfig
from .contrasts import MissingContrast, t1_path
from .infer import CORD_TAG

log = logging.getLogger(__name__)

STAGES = {"localiser": 1, "tumor": 2}


def labelled_cases(datastore) -> tuple[list, dict[str, str]]:
    """Every datastore image with a final label, as :class:`imsct.continual.LabelledCase`, and the
    images left out with the reason (no T1w; a final or cord label not on the T2w's grid, e.g. a
    T2w replaced on disk by one on another grid: such labels are never trained on)."""
    import nibabel as nib

    from imsct.continual import LabelledCase

    cases, skipped = [], {}
    for image_id in sorted(datastore.get_labeled_images()):
        try:
            t1 = t1_path(datastore, image_id)
        except MissingContrast as exc:
            skipped[image_id] = str(exc)
            continue
        info = datastore.get_image_info(image_id)
        t2 = datastore.get_image_uri(image_id)
        final = datastore.get_label_uri(image_id, DefaultLabelTag.FINAL.value)
        cord = datastore.get_label_uri(image_id, CORD_TAG) or None
        try:
            grid = nib.load(t2)
            off = {tag: grid_difference(nib.load(uri), grid) for tag, uri in (("final", final), (CORD_TAG, cord)) if uri}
        except Exception as exc:  # noqa: BLE001 - an unreadable file: the round would fail on it
            skipped[image_id] = f"image '{image_id}': cannot read its T2w or labels ({exc})"
            continue
        off = {tag: diff for tag, diff in off.items() if diff}
        if off:
            skipped[image_id] = (f"image '{image_id}': label(s) not on the grid of its T2w {t2}: "
                                 + "; ".join(f"{tag} ({diff})" for tag, diff in off.items()) + "; set aside, not trained on")
            continue
        cases.append(LabelledCase(name=image_id, t2=t2, t1=t1, label=final, centre=str(info.get("centre") or "default"), cord=cord))
    return cases, skipped


def _read_json(path: Path, default):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return default


def labels_still_needed(split: dict, centre: str, new_now: int, needed: int, val_fraction: float = 0.2) -> int:
    """How many more final labels of ``centre`` to save until ``needed`` new training cases exist
    (the split holds some of them out for validation, :func:`imsct.continual.plan_split`)."""
    from types import SimpleNamespace

    from imsct.continual import plan_split

    for more in range(1, 10_000):
        extra = [SimpleNamespace(name=f"~more-{i:05d}", centre=centre) for i in range(more)]
        planned = plan_split(split, extra, val_fraction)
        if new_now + sum(planned[c.name]["role"] == "train" for c in extra) >= needed:
            return more
    return needed


class StageTrainer(TrainTask):
    """One retraining round of stage 1 (``localiser``) or stage 2 (``tumor``)."""

    def __init__(self, name: str, cfg: AppConfig):
        self.name, self.stage, self.cfg = name, STAGES[name], cfg
        what = "cord localiser (stage 1)" if self.stage == 1 else "tumour network (stage 2)"
        super().__init__(f"Retrain the {what} on the datastore's final labels (replay + EWC, gated publication)")

    def config(self):
        cfg = self.cfg
        return {
            "iterations": cfg.train_iterations,
            "batch_size": cfg.train_batch_size,
            "patch_size": list(cfg.localiser_patch if self.stage == 1 else cfg.tumor_patch),
            "tolerance": cfg.gate_tolerance,
            "replay": cfg.replay,
            "ewc_lambda": cfg.ewc_lambda,
        }

    # ---- state of this trainer ----------------------------------------------------------------

    @property
    def _trained_file(self) -> Path:
        """Final labels (image id -> SHA-256) this stage was trained on in a published round."""
        return Path(self.cfg.state_dir) / f"app_trained_labels-stage{self.stage}.json"

    @property
    def _progress_file(self) -> Path:
        return Path(self.cfg.state_dir) / f"progress-{self.name}.json"

    def _write_progress(self, doc: dict) -> None:
        self._progress_file.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(self._progress_file, json.dumps({"trainer": self.name, **doc, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}))

    def stats(self):
        from imsct.continual import train_stats

        out = {"stage": self.stage, **train_stats(self.cfg.state_dir, self.stage)}
        progress = _read_json(self._progress_file, None)
        if progress is not None:
            if progress.get("status") == "running" and not _training_runs():
                progress["status"] = "interrupted"  # the round's process ended without a word (killed)
            out["progress"] = progress
        return out

    # ---- may a round start -----------------------------------------------------------------------

    def readiness(self, datastore) -> dict:
        """What a round would train on now: the cases with a final label and a T1w, the split they
        would get (nothing written), and which training cases have a final label this stage has
        not been trained on (new or changed since)."""
        from imsct.continual import load_split, plan_split

        cases, skipped = labelled_cases(datastore)
        split = plan_split(load_split(self.cfg.state_dir), cases)
        trained = _read_json(self._trained_file, {})
        train = [c for c in cases if split[c.name]["role"] == "train"]
        digests = {c.name: file_checksum(c.label) for c in train}
        return {"cases": cases, "skipped": skipped, "split": split, "digests": digests,
                "validation": sorted(c.name for c in cases if split[c.name]["role"] == "validation"),
                "train": sorted(c.name for c in train), "new": sorted(n for n, d in digests.items() if trained.get(n) != d)}

    def refusal(self, datastore, ready: dict | None = None) -> str | None:
        """Why a round cannot train usefully now (too few new final labels of training cases:
        the count, what is missing, how many more labels to save), or None when it can.
        ``ready``: :meth:`readiness`, when the caller has it."""
        r = ready or self.readiness(datastore)
        needed, new = self.cfg.min_new_labels, len(r["new"])
        if new >= needed:
            return None
        centres = [c.centre for c in r["cases"]]
        centre = max(set(centres), key=centres.count) if centres else "default"
        more = labels_still_needed(r["split"], centre, new, needed)
        n_cases = len(r["cases"])
        old = len(r["train"]) - new
        why = (f"{self.name}: retraining refused: {new} new final label(s) to train on, at least {needed} needed "
               f"(--conf min_new_labels). Of the {n_cases} case(s) with a final label and a T1w, {len(r['validation'])} "
               f"{'is' if len(r['validation']) == 1 else 'are'} held out for validation (each centre's first labelled case, then "
               f"about one in five; they never train) and {old} {'was' if old == 1 else 'were'} trained on already, unchanged")
        if r["skipped"]:
            why += f"; {len(r['skipped'])} labelled case(s) set aside: " + "; ".join(f"{k}: {v}" for k, v in sorted(r["skipped"].items())[:3])
        return why + f". Save {more} more final label(s) (centre '{centre}'), then start the round again."

    # ---- one round -----------------------------------------------------------------------------------

    def __call__(self, request, datastore):
        from imsct.continual import retrain_round

        ready = self.readiness(datastore)
        for image_id, why in ready["skipped"].items():
            print(f"skipped {image_id}: {why}", flush=True)
        reason = self.refusal(datastore, ready)
        if reason:  # started some other way than POST /train/<name> (which refuses it first)
            print(reason, flush=True)
            self._write_progress({"status": "refused", "reason": reason})
            raise RuntimeError(reason)
        cases = ready["cases"]
        opts = self.config()
        for key in opts:
            if key in request:
                opts[key] = request[key]
        iterations = int(opts["iterations"])
        print(f"{self.name}: round on {len(cases)} labelled case(s) ({len(ready['new'])} new final label(s) to train on: "
              f"{', '.join(ready['new'])}) with {opts}", flush=True)
        self._write_progress({"status": "running", "iteration": 0, "iterations": iterations})
        result = retrain_round(cases, self.cfg.models_dir, self.cfg.state_dir, stage=self.stage,
                               iterations=iterations, batch_size=int(opts["batch_size"]),
                               patch_size=tuple(int(p) for p in opts["patch_size"]), tolerance=float(opts["tolerance"]),
                               replay=float(opts["replay"]), ewc_lambda=float(opts["ewc_lambda"]),
                               validations=self.cfg.train_validations, log=lambda m: print(m, flush=True),
                               progress=lambda info: self._write_progress({"status": "running", **info}))
        if result.published:
            trained = _read_json(self._trained_file, {})
            trained.update({n: ready["digests"][n] for n in result.metrics.get("fresh_cases", []) if n in ready["digests"]})
            write_text_atomically(self._trained_file, json.dumps(trained, indent=1))
        last = _read_json(self._progress_file, {})
        self._write_progress({**{k: v for k, v in last.items() if k not in ("trainer", "updated")},
                              "status": "published" if result.published else "not published", "reason": result.reason,
                              "eta_s": 0.0, "seconds": result.seconds})
        print(f"{self.name}: {'PUBLISHED' if result.published else 'NOT published'}: {result.reason} ({result.seconds} s)", flush=True)
        return {**asdict(result), "skipped": ready["skipped"]}


def _training_runs() -> bool:
    """Whether MONAI Label runs a training task in this (server) process now."""
    from monailabel.utils.async_tasks.utils import processes

    return bool(processes("train"))
