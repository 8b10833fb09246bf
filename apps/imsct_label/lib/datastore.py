"""The local folder datastore with a second contrast per case.

Uploads (``PUT /datastore/image``, ``MONAILabelClient.upload_image``) take a ``contrast`` param:

* ``{"contrast": "T1w"}`` stores the file as the Gd-T1w of ``image`` (``DIR/T1w/<id>.nii.gz``); it
  does not become a datastore image of its own;
* anything else (default ``T2w``) adds the case's T2w as the datastore image; a ``centre`` param
  (default ``"default"``) is kept in the image info and used by retraining's per-centre split.

Every upload is read as NIfTI first (a bad file is refused with HTTP 422 naming the problem), and an
existing image or T1w is never replaced unless ``{"overwrite": true}`` is given (HTTP 409). An image
id (or label tag) with path components (``../x``, ``a/b``, an absolute path, a leading dot) is
refused with HTTP 422 before anything touches the disk, and an upload larger than ``--conf
max_upload_mb`` (default 1024) with HTTP 413.

Saved labels are checked before they replace anything: on the T2w's grid (shape and affine), and
with values 0..3 (tumor 1, edema 2, cavity 3) for ``final`` / ``original`` or 0/1 for ``cord``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore

from imsct.io import InputError, load_volume
from imsct.labels import LABELS

from .contrasts import local_t1_candidates, t1_destination

log = logging.getLogger(__name__)

CONTRASTS = {"t2w": "T2w", "t1w": "T1w"}
LABEL_VALUES = {"final": set(range(len(LABELS) + 1)), "original": set(range(len(LABELS) + 1)), "cord": {0, 1}}


DEFAULT_MAX_UPLOAD_MB = 1024.0


def _truthy(v) -> bool:
    return str(v).lower() in ("1", "true", "yes")


def check_name(value: str, what: str) -> None:
    """An image id or label tag becomes a file name in the studies folder: refuse path components."""
    v = str(value)
    if ("/" in v or "\\" in v or "\0" in v or v.startswith(".") or os.path.isabs(v)
            or any(ord(ch) < 32 for ch in v)):
        raise HTTPException(422, f"{what} {v!r}: must be a plain name (no '/', '\\', leading '.', "
                                 "absolute path or control characters)")


def upload_limit_mb() -> float:
    """``--conf max_upload_mb`` of the running app (:class:`lib.config.AppConfig`), else the default."""
    try:
        from monailabel.interfaces.utils.app import app_instance

        cfg = getattr(app_instance(), "cfg", None)
    except Exception:  # no app running (a datastore used on its own)
        cfg = None
    return float(getattr(cfg, "max_upload_mb", DEFAULT_MAX_UPLOAD_MB))


def check_size(filename: str, what: str, limit_mb: float) -> None:
    size = os.path.getsize(filename)
    if size > limit_mb * 1024 * 1024:
        raise HTTPException(413, f"{what}: {size / 1024 / 1024:.2f} MB is larger than the limit of {limit_mb:g} MB "
                                 "(--conf max_upload_mb)")


class TwoContrastDatastore(LocalDatastore):
    """``LocalDatastore`` whose uploads may carry the case's T1w (see the module docstring)."""

    max_upload_mb: float | None = None  # None: the app's --conf max_upload_mb

    def _limit_mb(self) -> float:
        return self.max_upload_mb if self.max_upload_mb is not None else upload_limit_mb()

    def add_image(self, image_id: str, image_filename: str, image_info: dict) -> str:
        if image_id:
            check_name(image_id, "image id")
        check_size(image_filename, f"upload of '{image_id}'", self._limit_mb())
        info = dict(image_info or {})
        contrast = CONTRASTS.get(str(info.pop("contrast", "T2w")).lower())
        if contrast is None:
            raise HTTPException(422, f"upload of '{image_id}': contrast {image_info.get('contrast')!r} is not T2w or T1w")
        overwrite = _truthy(info.pop("overwrite", False))
        try:
            load_volume(image_filename, f"uploaded {contrast} of '{image_id}'")
        except InputError as exc:
            raise HTTPException(422, str(exc)) from None
        if contrast == "T1w":
            if not image_id:
                raise HTTPException(422, "a T1w upload needs the image id of its T2w")
            existing = [p for p in local_t1_candidates(self, image_id) if p.exists()]
            if existing and not overwrite:
                raise HTTPException(409, f"image '{image_id}' already has a T1w ({existing[0]}); pass {{\"overwrite\": true}} to replace it")
            dest = t1_destination(self, image_id, os.path.basename(image_filename))
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=dest.name, dir=dest.parent)
            os.close(fd)
            shutil.copyfile(image_filename, tmp)
            os.replace(tmp, dest)
            for p in existing:  # a replaced T1w with the other extension
                if p != dest:
                    p.unlink(missing_ok=True)
            log.info("T1w of %s stored at %s", image_id, dest)
            return image_id
        if image_id and image_id in self._datastore.objects and not overwrite:
            raise HTTPException(409, f"image '{image_id}' exists; pass {{\"overwrite\": true}} to replace its T2w")
        info["contrast"] = "T2w"
        info.setdefault("centre", "default")
        return super().add_image(image_id, image_filename, info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict) -> str:
        check_name(image_id, "image id")
        check_name(label_tag, "label tag")
        check_size(label_filename, f"label of '{image_id}'", self._limit_mb())
        image_uri = self.get_image_uri(image_id)
        if not image_uri:
            raise HTTPException(404, f"image '{image_id}': not in the datastore; upload it before saving its label")
        try:
            check_label(label_filename, image_uri, image_id, label_tag)
        except InputError as exc:
            raise HTTPException(422, str(exc)) from None
        return super().save_label(image_id, label_filename, label_tag, label_info)

    def remove_image(self, image_id: str) -> None:
        super().remove_image(image_id)
        for p in local_t1_candidates(self, image_id):
            Path(p).unlink(missing_ok=True)


def check_label(label_file: str, image_file: str, image_id: str, tag: str) -> None:
    """A label must lie on its image's grid and hold only the values its tag allows."""
    role = f"{tag} label of '{image_id}'"
    lab = load_volume(label_file, role)
    img = nib.load(image_file)
    if lab.shape != tuple(img.shape[:3]) or not np.allclose(lab.affine, img.affine, atol=1e-3):
        raise InputError(f"{role}: grid {lab.shape} does not match its T2w {tuple(img.shape[:3])} ({image_file}); "
                         "a label must be saved on its image's grid")
    allowed = LABEL_VALUES.get(tag)
    if allowed is not None:
        values = set(np.unique(np.rint(lab.data)).astype(int).tolist())
        if not values <= allowed:
            raise InputError(f"{role}: values {sorted(values - allowed)[:8]} are not allowed (expected {sorted(allowed)}: "
                             + ("tumor 1, edema 2, cavity 3)" if tag != "cord" else "cord region 1)"))
