"""Where the second contrast (Gd-T1w) of a datastore case lives.

MONAI Label's datastores know one image per case; IMSCT needs two. The datastore image is always
the **T2w**; its **Gd-T1w** is found by one rule, implemented only in :func:`t1_path`:

* local folder datastore (``--studies DIR``): ``DIR/<image id>.nii.gz`` is the T2w and
  ``DIR/T1w/<image id>.nii.gz`` (or ``.nii``) its T1w, same file name in the sibling folder ``T1w``;
* DICOMweb datastore (``--studies http://.../dicom-web``): delegated to
  ``lib.dicomweb.fetch_t1(datastore, image_id)``, which returns a local NIfTI path.

A case without its T1w is refused with a message naming the expected file (HTTP 422), never a crash.
"""

from __future__ import annotations

import os
from pathlib import Path

T1_DIR = "T1w"
NIFTI_EXTS = (".nii.gz", ".nii")


class MissingContrast(LookupError):
    """The case has no usable T1w; the message says where it was expected."""


def is_dicomweb(datastore) -> bool:
    from monailabel.datastore.dicom import DICOMWebDatastore

    return isinstance(datastore, DICOMWebDatastore)


def local_root(datastore) -> Path:
    """The studies folder of a local datastore."""
    return Path(datastore._datastore_path)


def local_t1_candidates(datastore, image_id: str) -> list[Path]:
    folder = local_root(datastore) / T1_DIR
    return [folder / f"{image_id}{ext}" for ext in NIFTI_EXTS]


def t1_path(datastore, image_id: str) -> str:
    """Local file path of the Gd-T1w of datastore image ``image_id`` (its T2w).

    Raises :class:`MissingContrast` when the case has none."""
    if is_dicomweb(datastore):
        from . import dicomweb  # written for the DICOMweb (Orthanc) datastore; imported only when used

        return dicomweb.fetch_t1(datastore, image_id)
    candidates = local_t1_candidates(datastore, image_id)
    for p in candidates:
        if p.is_file():
            return str(p)
    raise MissingContrast(
        f"image '{image_id}': its Gd-T1w was not found (expected {candidates[0]}); "
        f"upload it with params {{\"contrast\": \"T1w\"}} under the same image id, or copy it there"
    )


def t1_destination(datastore, image_id: str, uploaded_name: str) -> Path:
    """Where an uploaded T1w of ``image_id`` is stored in a local datastore (extension kept)."""
    ext = next((e for e in NIFTI_EXTS if uploaded_name.endswith(e)), ".nii.gz")
    return local_root(datastore) / T1_DIR / f"{image_id}{ext}"


__all__ = ["t1_path", "MissingContrast", "T1_DIR", "is_dicomweb", "local_t1_candidates", "t1_destination"]
