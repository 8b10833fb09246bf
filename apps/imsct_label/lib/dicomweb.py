"""DICOMweb (e.g. Orthanc) as the IMSCT app's datastore.

What the app does (``main.py``)::

    from lib.dicomweb import is_dicomweb, make_datastore

    def init_datastore(self):
        if is_dicomweb(self.studies):
            return make_datastore(self.studies, self.conf)
        return super().init_datastore()

and, to find the Gd-T1w of a T2w image id on such a datastore, ``fetch_t1(datastore, image_id)``.

Conventions (written by :mod:`imsct.dicom`, ``bids_to_dicom`` / ``write_study``): one study per
subject holding an MR series with ``SeriesDescription`` ``"T2w"`` and one with ``"T1w Gd"``.

- Image ids are the SeriesInstanceUIDs of the **T2w** series only: the datastore searches
  ``Modality=MR`` (monailabel's default filter is ``Modality=CT``) and keeps the series whose
  description is the T2w one (case-insensitive). ``--conf dicomweb_t2_description`` /
  ``--conf dicomweb_t1_description`` change the two descriptions; a JSON
  ``MONAI_LABEL_DICOMWEB_SEARCH_FILTER`` other than monailabel's CT default is added to the query.
- Final labels are stored back as DICOM SEG (written with pydicom-seg by :func:`imsct.dicom.write_seg`,
  segments tumor / edema / cavity with the IMSCT colours), referencing the T2w series. This
  replaces monailabel's own converter, which needs dcmqi's ``itkimage2segimage`` binary (and tries
  to download it at start-up).
- Downloaded series are cached under the datastore's cache folder
  (``MONAI_LABEL_DICOMWEB_CACHE_PATH`` or ``~/.cache/monailabel/dicom/<hash>``); T1w volumes go to
  ``<cache>/t1/<T2w series uid>.nii.gz``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional

from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.dicom import dicom_web_download_series, dicom_web_upload_dcm
from monailabel.interfaces.datastore import DefaultLabelTag

from imsct.dicom import T1W_DESCRIPTION, T2W_DESCRIPTION, series_to_nifti, write_seg
from imsct.io import InputError

from .contrasts import MissingContrast

logger = logging.getLogger(__name__)

MONAILABEL_DEFAULT_FILTER = {"Modality": "CT"}
LIST_CACHE_SECONDS = 5.0


class MissingT1(MissingContrast, InputError):
    """The study of a T2w series holds no Gd-T1w series (or the series is unknown)."""


def is_dicomweb(studies: str) -> bool:
    return str(studies).startswith(("http://", "https://"))


def _norm(text: Any) -> str:
    return " ".join(str(text or "").split()).lower()


def _value(ds_json: dict, tag: str, default: Any = "") -> Any:
    v = ds_json.get(tag, {}).get("Value")
    return v[0] if v else default


class ImsctDICOMWebDatastore(DICOMWebDatastore):
    """monailabel's DICOMweb datastore listing T2w MR series only and saving labels as IMSCT DICOM SEG."""

    def t1_path(self, image_id: str) -> str:
        """The case's Gd-T1w as a local NIfTI (:func:`fetch_t1`)."""
        with self._fetch_lock:
            return fetch_t1(self, image_id)

    def get_image_uri(self, image_id: str) -> str:
        """The T2w series as a local NIfTI, downloaded once. Requests run in worker threads (and the
        uncertainty scores in the background): one download into the cache at a time, so two
        users of one series never write its cache folder together."""
        with self._fetch_lock:
            return super().get_image_uri(image_id)

    def __init__(self, client, t2_description: str = T2W_DESCRIPTION, t1_description: str = T1W_DESCRIPTION,
                 extra_filter: Optional[Dict[str, Any]] = None, cache_path: Optional[str] = None):
        self.t2_description = t2_description
        self.t1_description = t1_description
        search = {"Modality": "MR", **(extra_filter or {})}
        self._listed: tuple[float, List[dict]] = (0.0, [])  # (when, QIDO records of the T2w series)
        self.client = client  # DICOMWebDatastore keeps it only as a private attribute
        self._fetch_lock = threading.RLock()
        super().__init__(client=client, search_filter=search, cache_path=cache_path, fetch_by_frame=False, convert_to_nifti=True)
        # the app's own cache of T1w series (monailabel's cache folder is a private attribute)
        base = pathlib.Path(cache_path) if cache_path else pathlib.Path.home() / ".cache" / "imsct-label"
        self.cache_root = base / "dicomweb-t1" / hashlib.sha256(str(client.base_url).encode()).hexdigest()[:16]

    def _t2_series(self) -> List[dict]:
        """QIDO-RS records of the T2w series (asked again after ``LIST_CACHE_SECONDS``)."""
        stamp, cached = self._listed
        if time.monotonic() - stamp < LIST_CACHE_SECONDS:
            return cached
        want = _norm(self.t2_description)
        series = [s for s in _series_query(self, search_filters=self._search_filter) if _norm(_value(s, "0008103E")) == want]
        self._listed = (time.monotonic(), series)
        logger.info(f"DICOMweb: {len(series)} {self.t2_description!r} MR series")
        return series

    def list_images(self) -> List[str]:  # type: ignore[override]
        return [str(_value(s, "0020000E")) for s in self._t2_series()]

    def json(self):
        """The datastore as ``GET /datastore?output=all`` shows it: every T2w series on the server.
        monailabel's DICOMweb datastore answers with its local cache only (LocalDatastore.json), so a
        fresh app listed 0 objects while ``/info`` (``status()``, from :meth:`list_images`) counted
        every series. Series already downloaded keep their cached entry; a series with a SEG on the
        server and no cached label shows a ``final`` label with the SEG's modality only."""
        out = super().json()
        cached = out.get("objects", {})
        labelled = set(self.get_labeled_images())
        objects = {}
        for s in self._t2_series():
            uid = str(_value(s, "0020000E"))
            if uid in cached:
                obj = cached[uid]
            else:
                info = {"SeriesInstanceUID": uid, "StudyInstanceUID": str(_value(s, "0020000D")),
                        "PatientID": str(_value(s, "00100020")), "SeriesDescription": str(_value(s, "0008103E")),
                        "Modality": "MR"}
                obj = {"image": {"ext": "", "info": info}, "labels": {}}
            if uid in labelled and DefaultLabelTag.FINAL.value not in obj["labels"]:
                obj = {**obj, "labels": {**obj["labels"], DefaultLabelTag.FINAL.value: {"ext": "", "info": {"Modality": "SEG"}}}}
            objects[uid] = obj
        return {**out, "objects": objects}

    def get_labeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:  # type: ignore[override]
        """T2w series with a SEG in the server, asked afresh each time: monailabel caches this for
        ``MONAI_LABEL_DICOMWEB_CACHE_EXPIRY`` (2 h), so a label saved a minute ago still showed the image
        as unlabelled to the active-learning strategies."""
        # monailabel exposes no switch for that cache: call the undecorated method (functools.wraps
        # keeps it as __wrapped__; the only way in without copying monailabel's code)
        return DICOMWebDatastore.get_labeled_images.__wrapped__(self, label_tag, labels)

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """A label already in the local cache is served from there. monailabel's DICOMweb datastore
        treats every final label id as a SEG series UID, but the ids that ``save_label`` returns
        (and ``get_label_by_image_id`` gives) are the local ones, i.e. the image id."""
        local = LocalDatastore.get_label_uri(self, label_id, label_tag)
        if local and os.path.exists(local):
            return local
        return super().get_label_uri(label_id, label_tag, image_id)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any], label_id: str = "") -> str:
        """Final labels go to the DICOMweb server as one DICOM SEG; every tag is kept in the local cache."""
        if label_tag != DefaultLabelTag.FINAL:
            return super().save_label(image_id, label_filename, label_tag, label_info)
        image_nii = self.get_image_uri(image_id)  # downloads the T2w series into the cache if needed
        label_nii, made = _as_nifti(label_filename, image_nii)
        image_dir = os.path.join(self._datastore.image_path(), image_id)
        seg_path = tempfile.NamedTemporaryFile(suffix=".dcm", delete=False).name
        try:
            try:
                write_seg(label_nii, image_dir, seg_path, algorithm=str(label_info.get("model", "") or "IMSCT"))
            except InputError as exc:
                if "label map is empty" not in str(exc):
                    raise
                logger.warning(f"{image_id}: empty label map saved locally only (DICOM SEG cannot be empty)")
                return LocalDatastore.save_label(self, image_id, label_nii, label_tag, label_info)
            seg_series = dicom_web_upload_dcm(seg_path, self.client)
            info = self.get_image_info(image_id)
            label_info = {**label_info, "SeriesInstanceUID": seg_series, "Modality": "SEG",
                          "PatientID": info.get("PatientID"), "StudyInstanceUID": info.get("StudyInstanceUID")}
            logger.info(f"{image_id}: DICOM SEG series {seg_series} stored")
            # skip DICOMWebDatastore.save_label (dcmqi converter); keep the cached copy
            return LocalDatastore.save_label(self, image_id, label_nii, label_tag, label_info)
        finally:
            os.unlink(seg_path)
            if made:
                os.unlink(label_nii)


def _as_nifti(label_file: str, image_nii: str) -> tuple[str, bool]:
    """NIfTI path for an uploaded label (.nii/.nii.gz kept; .bin as OHIF sends it, or .nrrd, converted)."""
    ext = "".join(pathlib.Path(label_file).suffixes)
    if ext.endswith((".nii", ".nii.gz")):
        return label_file, False
    if ext == ".bin":
        from monailabel.datastore.utils.convert import binary_to_image

        return binary_to_image(image_nii, label_file), True
    import SimpleITK as sitk

    out = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
    try:
        sitk.WriteImage(sitk.ReadImage(label_file), out)
    except RuntimeError as exc:
        os.unlink(out)
        raise InputError(f"{label_file}: label cannot be read ({exc})") from None
    return out, True


def make_datastore(studies: str, conf: Optional[Dict[str, str]] = None) -> ImsctDICOMWebDatastore:
    """The app's datastore for ``--studies http(s)://.../dicom-web`` (see the module docstring)."""
    conf = conf or {}
    session = None
    user = settings.MONAI_LABEL_DATASTORE_USERNAME or settings.MONAI_LABEL_DICOMWEB_USERNAME
    password = settings.MONAI_LABEL_DATASTORE_PASSWORD or settings.MONAI_LABEL_DICOMWEB_PASSWORD
    if user and password:
        from dicomweb_client.session_utils import create_session_from_user_pass

        session = create_session_from_user_pass(user, password)
    client = DICOMwebClientX(url=studies.rstrip("/"), session=session,
                             qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                             wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
                             stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)
    extra = dict(settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER or {})
    if extra == MONAILABEL_DEFAULT_FILTER:
        extra = {}
    if conf.get("dicomweb_search_filter"):
        extra.update(json.loads(conf["dicomweb_search_filter"]))
    extra.pop("Modality", None)  # images are MR; SEG results are found separately
    cache = (settings.MONAI_LABEL_DATASTORE_CACHE_PATH or settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip() or None
    return ImsctDICOMWebDatastore(
        client,
        t2_description=conf.get("dicomweb_t2_description", T2W_DESCRIPTION),
        t1_description=conf.get("dicomweb_t1_description", T1W_DESCRIPTION),
        extra_filter=extra,
        cache_path=cache,
    )


def _series_query(datastore, **kwargs) -> List[dict]:
    return datastore.client.search_for_series(fields=["SeriesDescription", "SeriesNumber", "PatientID"], **kwargs)


def study_of(datastore, series_uid: str) -> str:
    """StudyInstanceUID of a series on the datastore's DICOMweb server."""
    found = [s for s in datastore.client.search_for_series(search_filters={"SeriesInstanceUID": series_uid})
             if _value(s, "0020000E") == series_uid]
    if not found:
        raise MissingT1(f"DICOMweb {datastore.name()}: series {series_uid} not found")
    return str(_value(found[0], "0020000D"))


def t1_series_of(datastore, image_id: str) -> tuple[str, str]:
    """(StudyInstanceUID, SeriesInstanceUID) of the Gd-T1w series in the study of T2w series ``image_id``."""
    description = getattr(datastore, "t1_description", T1W_DESCRIPTION)
    study = study_of(datastore, image_id)
    series = _series_query(datastore, study_instance_uid=study, search_filters={"Modality": "MR"})
    match = [s for s in series if _norm(_value(s, "0008103E")) == _norm(description)]
    if not match:
        have = sorted({str(_value(s, "0008103E", "<none>")) for s in series})
        raise MissingT1(
            f"DICOMweb {datastore.name()}: study {study} of T2w series {image_id} has no MR series described "
            f"{description!r} (the Gd-T1w the cascade needs); MR series in the study: {have}")
    if len(match) > 1:
        match.sort(key=lambda s: int(_value(s, "00200011", 0) or 0))
        logger.warning(f"Study {study}: {len(match)} {description!r} series; using the last (highest SeriesNumber)")
    return study, str(_value(match[-1], "0020000E"))


def fetch_t1(datastore, image_id: str) -> str:
    """Local NIfTI path of the Gd-T1w series in the same study as the T2w series ``image_id``.

    Works with the app's DICOMweb datastore (:class:`ImsctDICOMWebDatastore`; the series description
    comes from ``datastore.t1_description``). The series is downloaded once into
    ``<datastore cache>/t1/`` and converted to ``<datastore cache>/t1/<image_id>.nii.gz``.
    Raises :class:`MissingT1` (a ``contrasts.MissingContrast``) naming the study and the series
    it holds when there is no T1w.
    """
    if not isinstance(datastore, ImsctDICOMWebDatastore):
        raise TypeError(f"fetch_t1 needs the app's DICOMweb datastore, got {type(datastore).__name__}")
    cache = datastore.cache_root / "t1"
    out = cache / f"{image_id}.nii.gz"
    if out.exists():
        return str(out)
    study, t1_uid = t1_series_of(datastore, image_id)
    series_dir = cache / t1_uid
    if not series_dir.exists() or not any(series_dir.iterdir()):
        dicom_web_download_series(study, t1_uid, str(series_dir), datastore.client)
    return str(series_to_nifti(series_dir, out))


def init_datastore(app) -> ImsctDICOMWebDatastore:
    """Hook called by ``IMSCTApp.init_remote_datastore`` for ``--studies http(s)://...``."""
    return make_datastore(app.studies, getattr(app, "conf", None))
