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

Crash safety (MONAI Label 0.8.5's ``LocalDatastore`` truncates and rewrites its files in place): a
label file and the datastore JSON (``datastore_v2.json``) are written through a temporary file and
renamed over the old one (:func:`imsct.io.replace_atomically`), so a reader, or a server or
trainer killed at any instant, finds the old or the new file, never a partial one. Every
read-modify-write of the listing holds the datastore's file lock, so a listing reloaded from disk
meanwhile (another process wrote it) does not swallow the change. A datastore JSON that does not
parse (left by an older version) is set aside as ``datastore_v2.json.unreadable-<time>`` and the
listing is rebuilt from the image and label files, instead of the server refusing to start.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path

import nibabel as nib
import numpy as np

from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, LocalDatastore

from imsct.io import InputError, copy_atomically, load_volume, replace_atomically, same_grid
from imsct.labels import LABELS

from .contrasts import local_t1_candidates, local_t1_path, t1_destination

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

    def __init__(self, datastore_path: str, *args, datastore_config: str = "datastore_v2.json", **kwargs):
        set_aside_unreadable(Path(datastore_path) / datastore_config)
        # one lock object: re-entrant within a thread (LocalDatastore's methods take a new FileLock
        # each time, which would wait for itself when nested); still exclusive between threads and processes
        self._write_lock = FileLock(os.path.join(datastore_path, ".lock"))
        self.studies_root = Path(datastore_path)  # kept here: LocalDatastore has no public accessor
        super().__init__(datastore_path, *args, datastore_config=datastore_config, **kwargs)

    def t1_path(self, image_id: str) -> str:
        """The case's Gd-T1w: ``<studies>/T1w/<image id>.nii.gz`` (see :mod:`lib.contrasts`)."""
        return local_t1_path(self.studies_root, image_id)
        handler = getattr(self, "_handler", None)  # auto reload: the listing is now renamed into place, not modified
        if handler is not None:
            handler.on_moved = self._on_moved_event

    def _on_moved_event(self, event) -> None:
        if os.path.realpath(getattr(event, "dest_path", "")) == os.path.realpath(self._datastore_config_path):
            self._init_from_datastore_file()  # reloads only when another process wrote it

    def _update_datastore_file(self, lock=True):
        """The listing, written atomically (the caller holds the lock when ``lock`` is False)."""
        with self._write_lock if lock else nullcontext():
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str).encode()
            replace_atomically(self._datastore_config_path, lambda fh: fh.write(text))
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

    def update_image_info(self, image_id: str, info: dict) -> None:
        with self._write_lock:
            super().update_image_info(image_id, info)

    def update_label_info(self, label_id: str, label_tag: str, info: dict) -> None:
        with self._write_lock:
            super().update_label_info(label_id, label_tag, info)

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
            existing = [p for p in local_t1_candidates(self.studies_root, image_id) if p.exists()]
            if existing and not overwrite:
                raise HTTPException(409, f"image '{image_id}' already has a T1w ({existing[0]}); pass {{\"overwrite\": true}} to replace it")
            dest = t1_destination(self.studies_root, image_id, os.path.basename(image_filename))
            copy_atomically(image_filename, dest)
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
        return self._store_label(image_id, label_filename, label_tag, label_info)

    def _store_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict) -> str:
        """``LocalDatastore.save_label`` with the file written atomically and the image looked up
        under the lock (the listing may have been reloaded since the checks)."""
        _, ext = self._to_id(os.path.basename(label_filename))
        name = self._filename(image_id, ext)
        info = dict(label_info or {})
        with self._write_lock:
            obj = self._datastore.objects.get(image_id)
            if obj is None:
                raise HTTPException(404, f"image '{image_id}': not in the datastore; upload it before saving its label")
            copy_atomically(label_filename, Path(self._datastore.label_path(label_tag)) / name)
            info.update(ts=int(time.time()), name=name)
            obj.labels[label_tag] = DataModel(info=info, ext=ext)
            self._update_datastore_file(lock=False)
        log.info("label %s of %s stored (%s)", label_tag, image_id, name)
        return image_id

    def remove_image(self, image_id: str) -> None:
        super().remove_image(image_id)
        for p in local_t1_candidates(self.studies_root, image_id):
            Path(p).unlink(missing_ok=True)


def set_aside_unreadable(listing: Path) -> Path | None:
    """Move a datastore JSON that does not parse out of the way (``<name>.unreadable-<time>``), so
    that the datastore rebuilds its listing from the files; returns where it went."""
    if not listing.exists():
        return None
    with FileLock(str(listing.parent / ".lock")):
        try:
            json.loads(listing.read_bytes())
            return None
        except ValueError as exc:
            dest = listing.with_name(f"{listing.name}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}")
            os.replace(listing, dest)
            log.error("datastore listing %s does not parse (%s): kept as %s; rebuilding it from the image and label files",
                      listing, exc, dest)
            return dest


def check_label(label_file: str, image_file: str, image_id: str, tag: str) -> None:
    """A label must lie on its image's grid and hold only the values its tag allows."""
    role = f"{tag} label of '{image_id}'"
    lab = load_volume(label_file, role)
    img = nib.load(image_file)
    if not same_grid(lab, img):
        raise InputError(f"{role}: grid {lab.shape} does not match its T2w {tuple(img.shape[:3])} ({image_file}); "
                         "a label must be saved on its image's grid")
    allowed = LABEL_VALUES.get(tag)
    if allowed is not None:
        values = set(np.unique(np.rint(lab.data)).astype(int).tolist())
        if not values <= allowed:
            raise InputError(f"{role}: values {sorted(values - allowed)[:8]} are not allowed (expected {sorted(allowed)}: "
                             + ("tumor 1, edema 2, cavity 3)" if tag != "cord" else "cord region 1)"))
