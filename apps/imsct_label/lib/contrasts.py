"""Where the second contrast (Gd-T1w) of a datastore case lives.

MONAI Label's datastores know one image per case; IMSCT needs two. The datastore image is always
the **T2w**; its **Gd-T1w** is found by the datastore itself, ``datastore.t1_path(image_id)``, a
method of each of the app's datastore classes (no datastore module imports another):

* local folder datastore (``--studies DIR``, :class:`lib.datastore.TwoContrastDatastore`):
  ``DIR/<image id>.nii.gz`` is the T2w and ``DIR/T1w/<image id>.nii.gz`` (or ``.nii``) its T1w,
  same file name in the sibling folder ``T1w`` (:func:`local_t1_path`);
* DICOMweb datastore (``--studies http://.../dicom-web``, :class:`lib.dicomweb.ImsctDICOMWebDatastore`):
  the study's series described ``T1w Gd``, fetched once into a local NIfTI cache.

A case without its T1w is refused with a message naming the expected file (HTTP 422), never a crash.
"""

from __future__ import annotations

from pathlib import Path

T1_DIR = "T1w"
NIFTI_EXTS = (".nii.gz", ".nii")


class MissingContrast(LookupError):
    """The case has no usable T1w; the message says where it was expected."""


def local_t1_candidates(root: str | Path, image_id: str) -> list[Path]:
    folder = Path(root) / T1_DIR
    return [folder / f"{image_id}{ext}" for ext in NIFTI_EXTS]


def local_t1_path(root: str | Path, image_id: str) -> str:
    """The Gd-T1w of image ``image_id`` in the studies folder ``root`` (:class:`MissingContrast` when absent)."""
    candidates = local_t1_candidates(root, image_id)
    for p in candidates:
        if p.is_file():
            return str(p)
    raise MissingContrast(
        f"image '{image_id}': its Gd-T1w was not found (expected {candidates[0]}); "
        f"upload it with params {{\"contrast\": \"T1w\"}} under the same image id, or copy it there"
    )


def t1_path(datastore, image_id: str) -> str:
    """Local file path of the Gd-T1w of datastore image ``image_id`` (its T2w), from the datastore's
    own lookup. Raises :class:`MissingContrast` when the case has none."""
    lookup = getattr(datastore, "t1_path", None)
    if lookup is None:
        raise MissingContrast(f"datastore {type(datastore).__name__}: cannot find a case's Gd-T1w (not an IMSCT datastore)")
    return lookup(image_id)


def t1_destination(root: str | Path, image_id: str, uploaded_name: str) -> Path:
    """Where an uploaded T1w of ``image_id`` is stored in the studies folder ``root`` (extension kept)."""
    ext = next((e for e in NIFTI_EXTS if uploaded_name.endswith(e)), ".nii.gz")
    return Path(root) / T1_DIR / f"{image_id}{ext}"


__all__ = ["t1_path", "local_t1_path", "MissingContrast", "T1_DIR", "local_t1_candidates", "t1_destination"]
