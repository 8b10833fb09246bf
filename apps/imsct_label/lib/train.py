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
"""

from __future__ import annotations

import logging
from dataclasses import asdict

from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask

from imsct.io import grid_difference

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

    def stats(self):
        from imsct.continual import train_stats

        return {"stage": self.stage, **train_stats(self.cfg.state_dir, self.stage)}

    def __call__(self, request, datastore):
        from imsct.continual import retrain_round

        cases, skipped = labelled_cases(datastore)
        for image_id, why in skipped.items():
            print(f"skipped {image_id}: {why}", flush=True)
        if not cases:
            return {"published": False, "reason": "no case with a final label and a T1w in the datastore", "skipped": skipped}
        opts = self.config()
        for key in opts:
            if key in request:
                opts[key] = request[key]
        print(f"{self.name}: round on {len(cases)} labelled case(s) with {opts}", flush=True)
        result = retrain_round(cases, self.cfg.models_dir, self.cfg.state_dir, stage=self.stage,
                               iterations=int(opts["iterations"]), batch_size=int(opts["batch_size"]),
                               patch_size=tuple(int(p) for p in opts["patch_size"]), tolerance=float(opts["tolerance"]),
                               replay=float(opts["replay"]), ewc_lambda=float(opts["ewc_lambda"]),
                               log=lambda m: print(m, flush=True))
        print(f"{self.name}: {'PUBLISHED' if result.published else 'NOT published'}: {result.reason} ({result.seconds} s)", flush=True)
        return {**asdict(result), "skipped": skipped}
