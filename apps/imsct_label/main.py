"""IMSCT MONAI Label app: ``monailabel start_server --app apps/imsct_label --studies DIR --host 127.0.0.1``.

Models ``cascade`` (tumor 1, edema 2, cavity 3), ``localiser`` (cord region) and ``tumor``
(stage 2 inside the case's saved cord label), ``clicks`` (deepedit: click correction); trainers ``tumor`` and ``localiser``; strategies
``random``, ``first``, ``uncertainty``; scoring ``dice``. See README.md beside this file.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sys
import threading
from contextlib import contextmanager

from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.tasks.activelearning.first import First
from monailabel.utils.others.generic import file_checksum

from imsct.io import write_text_atomically
from imsct.labels import COLOURS, LABELS

from lib.activelearning import MCDropoutUncertainty, RandomStrategy, UncertaintyScores
from lib.config import AppConfig
from lib.contrasts import T1_DIR
from lib.datastore import TwoContrastDatastore, discard_upload
from lib.clicks import ClickInfer
from lib.infer import CascadeInfer, LocaliserInfer, TumorInfer
from lib.models import ModelStore, seed_models
from lib.scoring import MulticlassDice, score_image
from lib.train import StageTrainer
from lib.web import install as install_web_rules

log = logging.getLogger(__name__)

FINAL = DefaultLabelTag.FINAL.value
TUMOR_MODELS = ("cascade", "tumor")  # models whose output is a tumour label map (kept as 'original')


class IMSCTApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.cfg = AppConfig.from_conf(conf, app_dir, studies)
        install_web_rules(self.cfg.allow_origins)  # web origins, 4xx for malformed requests (lib/web.py)
        if "start_server" in sys.argv and not any(a in ("--host", "-i") or a.startswith("--host=") for a in sys.argv):
            log.warning("monailabel start_server without --host listens on 0.0.0.0 (every interface); "
                        "use --host 127.0.0.1 or apps/imsct_label/serve.py unless the server must be reachable from the network")
        seed_models(self.cfg.models_dir, self.cfg.shipped_models)
        self.store = ModelStore(self.cfg.models_dir, device=self.cfg.device)
        self._retrain_lock = threading.Lock()
        super().__init__(
            app_dir=app_dir, studies=studies, conf=conf, name="IMSCT",
            description="Intramedullary spinal cord tumour segmentation (T2w + Gd-T1w cascade) with active learning and retraining",
            version="1.0", labels=dict(LABELS),
        )

    # ---- datastore -----------------------------------------------------------------------------

    def init_datastore(self):
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        return TwoContrastDatastore(
            self.studies, extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD, read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_remote_datastore(self):
        """DICOMweb (Orthanc): MR T2w series as images, T1w from the same study (lib/dicomweb.py)."""
        from lib.dicomweb import init_datastore

        return init_datastore(self)

    # ---- tasks -----------------------------------------------------------------------------------

    def init_infers(self):
        return {
            "cascade": CascadeInfer(self.store, self.datastore),
            "localiser": LocaliserInfer(self.store, self.datastore),
            "tumor": TumorInfer(self.store, self.datastore),
            "clicks": ClickInfer(self.store, self.datastore, self.cfg.shipped_models),  # deepedit: click correction
        }

    def init_trainers(self):
        return {name: StageTrainer(name, self.cfg) for name in ("tumor", "localiser")}

    def init_strategies(self):
        self.uncertainty_scores = UncertaintyScores(self.store, self.datastore, self.cfg.mc_samples)  # started in server mode
        return {"random": RandomStrategy(), "first": First(), "uncertainty": MCDropoutUncertainty(self.uncertainty_scores)}

    def server_mode(self, mode: bool):
        """The web server starts (not a training subprocess): uncertainty scores in the background."""
        super().server_mode(mode)
        if mode and getattr(self, "uncertainty_scores", None) is not None:
            self.uncertainty_scores.start()

    def init_scoring_methods(self):
        return {"dice": MulticlassDice()}

    def info(self):
        out = super().info()
        # a list in index order, as MONAI Label lists labels itself: OHIF's MONAI Label panel appends the
        # models' labels to it (with a {name: index} object it stopped at "Connecting" and listed no model)
        out["labels"] = sorted(LABELS, key=LABELS.get)
        out["label_colors"] = {k: list(v) for k, v in COLOURS.items()}
        out["imsct"] = {
            "models_dir": str(self.cfg.models_dir),
            "t1_convention": f"<studies>/{T1_DIR}/<image id>.nii.gz (upload with params {{\"contrast\": \"T1w\"}})",
            "retrain_after": self.cfg.retrain_after,
            "retrain_models": list(self.cfg.retrain_models),
            "new_final_labels": len(self._label_state().get("pending", [])),
        }
        return out

    # ---- inference -------------------------------------------------------------------------------

    def infer(self, request, datastore=None):
        request = dict(request)
        image = request.get("image")
        if isinstance(image, str) and image and not os.path.exists(image):
            request["image_id"] = image  # the T1w is looked up by the datastore id
            if request.get("model") in TUMOR_MODELS:
                request.setdefault("save_label", True)  # the model's label is what the final label is scored against
        try:
            return super().infer(request, datastore)
        except BaseException:
            for key in ("image", "label"):  # files sent with a refused request: MONAI Label removes them on success only
                discard_upload(request.get(key))
            raise

    # ---- scoring and automatic retraining ----------------------------------------------------------

    def async_scoring(self, method, params=None):
        """Per-class Dice is cheap: computed in a thread of the server, not a new process per call."""
        if not self._server_mode or not self._scoring_methods:
            return {}
        methods = [method] if method else list(self._scoring_methods)
        for m in methods:
            threading.Thread(target=self._scoring_methods[m], args=({"method": m}, self.datastore()), daemon=True, name=f"scoring-{m}").start()
        return {m: "started" for m in methods}

    @contextmanager
    def _state_file(self):
        path = self.cfg.state_dir / "app_labels.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = json.loads(path.read_text()) if path.exists() else {"counted": {}, "pending": []}
            yield state
            write_text_atomically(path, json.dumps(state, indent=1))

    def _label_state(self) -> dict:
        path = self.cfg.state_dir / "app_labels.json"
        return json.loads(path.read_text()) if path.exists() else {"counted": {}, "pending": []}

    def on_save_label(self, image_id, label_id):
        """After an annotator saves a label: score it against the model's, count new final labels,
        and start the background retraining once ``retrain_after`` new ones arrived."""
        res: dict = {}
        ds = self.datastore()
        label_id = ds.get_label_by_image_id(image_id, FINAL)
        final = ds.get_label_uri(label_id, FINAL) if label_id else ""
        if not final:
            return res
        dice = score_image(ds, image_id)
        if dice is not None:
            res["dice"] = dice
        digest = file_checksum(final)
        with self._state_file() as state:
            if state["counted"].get(image_id) != digest:
                state["counted"][image_id] = digest
                if image_id not in state["pending"]:
                    state["pending"].append(image_id)
            pending = list(state["pending"])
            start = self.cfg.retrain_after > 0 and len(pending) >= self.cfg.retrain_after
            if start:
                state["pending"] = []
        res["new_final_labels"] = 0 if start else len(pending)
        if start:
            res["retrain"] = self._start_retraining(pending)
            if all(res["retrain"].get(n, {}).get("status") == "REFUSED" for n in self.cfg.retrain_models):
                with self._state_file() as state:  # nothing started: these labels still count for the next try
                    state["pending"] = list(dict.fromkeys([*pending, *state["pending"]]))
                res["new_final_labels"] = len(pending)
        return res

    def training_refusal(self, name: str) -> str | None:
        """Why trainer ``name`` would train nothing new now (lib/train.py), or None; POST /train/<name>
        answers it with HTTP 409 (lib/web.py)."""
        trainer = self._trainers.get(name)
        return trainer.refusal(self.datastore()) if hasattr(trainer, "refusal") else None

    def _start_retraining(self, images: list[str]) -> dict:
        log.info("%d new final label(s) (%s): starting retraining of %s", len(images), images, self.cfg.retrain_models)
        out = {"after_labels": images}
        for name in self.cfg.retrain_models:
            reason = self.training_refusal(name)
            if reason:
                log.warning("automatic retraining: %s", reason)
                out[name] = {"status": "REFUSED", "reason": reason}
                continue
            task = self.async_training(name, enqueue=True)
            out[name] = {k: task.get(k) for k in ("id", "status", "start_ts")} if isinstance(task, dict) else task
        return out
