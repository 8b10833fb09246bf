"""The local folder datastore with a second contrast per case.

Uploads (``PUT /datastore/image``, ``MONAILabelClient.upload_image``) take a ``contrast`` param:

* ``{"contrast": "T1w"}`` stores the file as the Gd-T1w of ``image`` (``DIR/T1w/<id>.nii.gz``); it
  does not become a datastore image of its own;
* anything else (default ``T2w``) adds the case's T2w as the datastore image; a ``centre`` param
  (default ``"default"``) is kept in the image info and used by retraining's per-centre split.

Every upload is checked before anything is stored, and a refused one changes nothing in the
studies folder and leaves nothing behind (MONAI Label's upload routes copy the request's file to
the system temp folder and remove that copy only after a call that succeeded; a refused call
removes it here, :func:`discard_upload`):

* the image id (and a label tag): one rule (:func:`check_name`), HTTP 400: 1 to
  :data:`ID_MAX_CHARS` letters, digits, ``.``, ``_``, ``-``, starting with a letter or digit, not
  containing ``.nii``; every file name derived from it (``<id>.nii.gz``, ``T1w/<id>.nii.gz``,
  ``labels/<tag>/<id>.nii.gz``, the retraining caches and the temporary files of atomic writes)
  then stays far below the file systems' 255-byte limit;
* the size, HTTP 413 (:func:`check_size`): the NIfTI header's voxel count times voxel size, and
  the bytes the file holds once decompressed (read as a stream, stopped at the limit: a small
  gzip bomb is never decompressed whole) are at most ``--conf max_upload_mb`` (MiB, default 512);
* the content, HTTP 422: a readable 3D NIfTI (:func:`imsct.io.load_volume`); a label also on
  its image's grid, shape and affine (the message says which differs and by how much), with
  whole-number values of the label table only: 0..3 (:data:`imsct.labels.LABELS`: tumor 1, edema
  2, cavity 3) for every tag, 0/1 for ``cord`` (a probability map is refused);
* an existing image or T1w is never replaced unless ``{"overwrite": true}`` is given (HTTP 409);
  a T2w whose image has labels is replaced only by one on the labels' grid (else HTTP 409 naming
  the labels and the difference: labels are never attached to another grid; remove them first or
  use a new image id). A T2w replaced on the same grid keeps its labels.

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

import gzip
import io
import json
import logging
import os
import re
import tempfile
import time
import zlib
from contextlib import nullcontext
from pathlib import Path

import nibabel as nib
import numpy as np

from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore
from monailabel.interfaces.exception import LabelNotFoundException

from imsct.io import InputError, copy_atomically, grid_difference, load_image, load_volume, replace_atomically
from imsct.labels import LABELS

from .contrasts import local_t1_candidates, local_t1_path, t1_destination

log = logging.getLogger(__name__)

CONTRASTS = {"t2w": "T2w", "t1w": "T1w"}
TUMOUR_VALUES = {0, *LABELS.values()}  # background and the label table's classes
LABEL_VALUES = {"cord": {0, 1}}  # other tags (final, original, ...) hold TUMOUR_VALUES
MiB = 1024 * 1024
DEFAULT_MAX_UPLOAD_MB = 512.0
ID_MAX_CHARS = 128  # the longest derived name (a cache's temporary file) adds < 40 characters
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _truthy(v) -> bool:
    return str(v).lower() in ("1", "true", "yes")


def check_name(value: str, what: str) -> None:
    """An image id or label tag becomes file and folder names in the studies folder: the one rule
    of the module docstring (HTTP 400 naming the problem)."""
    v = str(value)
    if not v:
        problem = "is empty"
    elif len(v) > ID_MAX_CHARS:
        problem = f"has {len(v)} characters, more than {ID_MAX_CHARS}"
    elif not _ID.fullmatch(v):
        bad = sorted({c for c in v if not (c.isascii() and (c.isalnum() or c in "._-"))})
        problem = f"has characters not allowed: {''.join(bad)!r}" if bad else "starts with '.', '_' or '-'"
    elif ".nii" in v.lower():
        problem = "contains '.nii' (file names are <id>.nii.gz)"
    else:
        return
    shown = v if len(v) <= 60 else v[:40] + "..." + v[-8:]
    raise HTTPException(400, f"{what} {shown!r} {problem}: it must be a plain name of 1 to {ID_MAX_CHARS} letters, digits, "
                             "'.', '_' or '-', starting with a letter or digit (no '/', '\\', spaces or control characters)")


def discard_upload(path) -> None:
    """Remove the temporary copy MONAI Label 0.8.5's routes made of a request's file
    (``<system temp folder>/tmp<random><ext>``, removed by MONAI Label only after a successful
    call). Any other file is left alone."""
    if not isinstance(path, str) or not path:
        return
    p = os.path.abspath(path)
    if os.path.dirname(p) == os.path.abspath(tempfile.gettempdir()) and os.path.basename(p).startswith("tmp") and os.path.isfile(p):
        os.unlink(p)


def upload_limit_mb() -> float:
    """``--conf max_upload_mb`` of the running app (:class:`lib.config.AppConfig`), else the default."""
    try:
        from monailabel.interfaces.utils.app import app_instance

        cfg = getattr(app_instance(), "cfg", None)
    except Exception:  # no app running (a datastore used on its own)
        cfg = None
    return float(getattr(cfg, "max_upload_mb", DEFAULT_MAX_UPLOAD_MB))


def _is_gzip(filename: str) -> bool:
    with open(filename, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _open(filename: str):
    return gzip.open(filename, "rb") if _is_gzip(filename) else open(filename, "rb")


def declared_size(filename: str) -> tuple[int, str] | None:
    """Bytes a NIfTI file's header says it holds (data offset + voxels x voxel size) and the shape
    and type in words; None when the first bytes are no NIfTI header (load_volume says why later)."""
    try:
        with _open(filename) as fh:
            raw = fh.read(540)
        for cls in (nib.Nifti1Header, nib.Nifti2Header):
            try:
                hdr = cls.from_fileobj(io.BytesIO(raw), check=False)
            except Exception:  # noqa: BLE001 - not this header type
                continue
            if int(hdr["sizeof_hdr"]) != cls.sizeof_hdr:
                continue
            shape = tuple(int(d) for d in hdr.get_data_shape())
            dtype = hdr.get_data_dtype()
            return int(hdr.get_data_offset()) + int(np.prod(shape, dtype=object)) * dtype.itemsize, f"{shape} voxels of {dtype}"
    except (OSError, EOFError, zlib.error, ValueError, TypeError):
        pass
    return None


def decompressed_size(filename: str, limit: int) -> int | None:
    """Bytes of ``filename`` once decompressed, counted in 1 MiB steps and no further than past
    ``limit``; None when the stream is corrupt (load_volume names the problem later)."""
    if not _is_gzip(filename):
        return os.path.getsize(filename)
    total = 0
    try:
        with gzip.open(filename, "rb") as fh:
            while total <= limit:
                chunk = fh.read(MiB)
                if not chunk:
                    break
                total += len(chunk)
    except (OSError, EOFError, zlib.error):
        return None
    return total


def check_size(filename: str, what: str, limit_mb: float) -> None:
    """HTTP 413 when the upload holds more than ``limit_mb`` MiB once decompressed (module docstring)."""
    limit = int(limit_mb * MiB)
    rule = f"the limit of {limit_mb:g} MiB (--conf max_upload_mb)"
    size = os.path.getsize(filename)
    if size > limit:
        raise HTTPException(413, f"{what}: {size / MiB:.2f} MiB is larger than {rule}")
    declared = declared_size(filename)
    if declared is not None and declared[0] > limit:
        raise HTTPException(413, f"{what}: its NIfTI header declares {declared[1]}, {declared[0] / MiB:.1f} MiB once "
                                 f"decompressed, more than {rule}")
    total = decompressed_size(filename, limit)
    if total is not None and total > limit:
        raise HTTPException(413, f"{what}: the {size / MiB:.2f} MiB file decompresses to more than {rule} "
                                 "(reading stopped there)")


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
        handler = getattr(self, "_handler", None)  # auto reload: the listing is now renamed into place, not modified
        if handler is not None:
            handler.on_moved = self._on_moved_event

    def t1_path(self, image_id: str) -> str:
        """The case's Gd-T1w: ``<studies>/T1w/<image id>.nii.gz`` (see :mod:`lib.contrasts`)."""
        return local_t1_path(self.studies_root, image_id)

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
        try:
            return self._add_image(image_id, image_filename, image_info)
        except BaseException:
            discard_upload(image_filename)  # a refused upload leaves no copy behind
            raise

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict) -> str:
        try:
            return self._save_label(image_id, label_filename, label_tag, label_info)
        except BaseException:
            discard_upload(label_filename)
            raise

    def _add_image(self, image_id: str, image_filename: str, image_info: dict) -> str:
        image_id = image_id or self._to_id(os.path.basename(image_filename))[0]  # as LocalDatastore names it
        check_name(image_id, "image id")
        info = _params(image_info, f"upload of '{image_id}'")
        check_size(image_filename, f"upload of '{image_id}'", self._limit_mb())
        contrast = CONTRASTS.get(str(info.pop("contrast", "T2w")).lower())
        if contrast is None:
            raise HTTPException(422, f"upload of '{image_id}': contrast {image_info.get('contrast')!r} is not T2w or T1w")
        overwrite = _truthy(info.pop("overwrite", False))
        try:
            volume = load_image(image_filename, f"uploaded {contrast} of '{image_id}'")
        except InputError as exc:
            raise HTTPException(422, str(exc)) from None
        if contrast == "T1w":
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
        if image_id in self._datastore.objects:
            if not overwrite:
                raise HTTPException(409, f"image '{image_id}' exists; pass {{\"overwrite\": true}} to replace its T2w")
            self._check_labels_fit(image_id, volume)
        info["contrast"] = "T2w"
        info.setdefault("centre", "default")
        return self._store_image(image_id, image_filename, info, volume)

    def _check_labels_fit(self, image_id: str, volume) -> None:
        """HTTP 409 when the image's labels are not on the grid of ``volume`` (its new T2w)."""
        obj = self._datastore.objects.get(image_id)
        off = {}
        for tag in sorted(obj.labels if obj else {}):
            uri = self.get_label_uri(image_id, tag)
            if uri and os.path.exists(uri):
                diff = grid_difference(volume, nib.load(uri))
                if diff:
                    off[tag] = diff
        if off:
            raise HTTPException(409, (
                f"image '{image_id}': the new T2w is not on the grid of its label(s) "
                + "; ".join(f"'{tag}' ({diff})" for tag, diff in off.items())
                + f". Labels are never attached to another grid: remove them first (DELETE /datastore/label?id={image_id}"
                "&tag=TAG) or upload the new T2w under a new image id"))

    def _store_image(self, image_id: str, image_filename: str, info: dict, volume) -> str:
        """``LocalDatastore.add_image`` with the file written atomically; a replaced T2w (on its
        labels' grid, :meth:`_check_labels_fit`) keeps its labels, checked again under the lock."""
        _, ext = self._to_id(os.path.basename(image_filename))
        name = self._filename(image_id, ext)
        dest = Path(self._datastore.image_path()) / name
        info.update(ts=int(time.time()), name=name)
        with self._write_lock:
            old = self._datastore.objects.get(image_id)
            if old is not None:
                self._check_labels_fit(image_id, volume)  # labels saved meanwhile
            copy_atomically(image_filename, dest)
            if old is not None and old.image.ext != ext:  # the replaced T2w had the other extension
                (Path(self._datastore.image_path()) / self._filename(image_id, old.image.ext)).unlink(missing_ok=True)
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext),
                                                                labels=dict(old.labels) if old is not None else {})
            self._update_datastore_file(lock=False)
        log.info("T2w of %s stored (%s)", image_id, name)
        return image_id

    def _save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict) -> str:
        check_name(image_id, "image id")
        check_name(label_tag, "label tag")
        info = _params(label_info, f"label of '{image_id}'")
        check_size(label_filename, f"label of '{image_id}'", self._limit_mb())
        image_uri = self.get_image_uri(image_id)
        if not image_uri:
            raise HTTPException(404, f"image '{image_id}': not in the datastore; upload it before saving its label")
        try:
            check_label(label_filename, image_uri, image_id, label_tag)
        except InputError as exc:
            raise HTTPException(422, str(exc)) from None
        return self._store_label(image_id, label_filename, label_tag, info)

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

    def remove_label(self, label_id: str, label_tag: str) -> None:
        """The label file and its listing entry at once (LocalDatastore leaves the listing to the
        file watcher, so an upload right after still saw the removed label)."""
        with self._write_lock:
            obj = self._datastore.objects.get(label_id)
            if obj is None or label_tag not in obj.labels:
                raise LabelNotFoundException(f"image '{label_id}' has no label '{label_tag}'")
            Path(self.get_label_uri(label_id, label_tag)).unlink(missing_ok=True)
            del obj.labels[label_tag]
            self._update_datastore_file(lock=False)
        log.info("label %s of %s removed", label_tag, label_id)

    def remove_image(self, image_id: str) -> None:
        super().remove_image(image_id)
        for p in local_t1_candidates(self.studies_root, image_id):
            Path(p).unlink(missing_ok=True)


def _params(value, what: str) -> dict:
    """An upload's ``params``: a JSON object (HTTP 400 otherwise)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise HTTPException(400, f"{what}: params must be a JSON object, e.g. {{\"contrast\": \"T1w\"}}, not {type(value).__name__}")
    return dict(value)


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
    """A label must lie on its image's grid (shape and affine) and hold whole-number values of its
    tag: the label table's (0 and :data:`imsct.labels.LABELS`), or 0/1 for ``cord``."""
    role = f"{tag} label of '{image_id}'"
    lab = load_volume(label_file, role)
    img = nib.load(image_file)
    diff = grid_difference(lab, img)
    if diff:
        raise InputError(f"{role}: label grid differs from the image ({image_file}): {diff}; a label must be saved on "
                         "its image's grid")
    allowed = LABEL_VALUES.get(tag, TUMOUR_VALUES)
    classes = "cord region 1" if allowed == LABEL_VALUES["cord"] else ", ".join(f"{k} {v}" for k, v in LABELS.items())
    fractional = lab.data != np.rint(lab.data)
    if fractional.any():
        examples = [round(float(v), 4) for v in np.unique(lab.data[fractional])[:3]]
        raise InputError(f"{role}: {int(fractional.sum())} voxels are not whole numbers (e.g. {examples}); a label map holds "
                         f"class numbers {sorted(allowed)} ({classes}), not probabilities: threshold or take the argmax first")
    values = set(np.unique(lab.data).astype(int).tolist())
    if not values <= allowed:
        raise InputError(f"{role}: values {sorted(values - allowed)[:8]} are not allowed (expected {sorted(allowed)}: {classes})")
