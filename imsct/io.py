"""Reading and writing NIfTI volumes with checks that name the file and the problem."""

from __future__ import annotations

import gzip
import os
import secrets
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np


class InputError(ValueError):
    """Bad input: the message names the file and what is wrong with it."""


@dataclass
class Volume:
    """A 3D image with its voxel-to-world (RAS+, mm) affine."""

    data: np.ndarray
    affine: np.ndarray
    path: str = "<memory>"

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    @property
    def voxel_sizes(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    @property
    def voxel_volume_mm3(self) -> float:
        return voxel_volume_mm3(self.affine)


def voxel_volume_mm3(affine: np.ndarray) -> float:
    """Volume of one voxel (mm3) of a grid with this voxel-to-world affine."""
    return float(abs(np.linalg.det(np.asarray(affine)[:3, :3])))


GRID_ATOL_MM = 1e-3  # affines closer than this (per element) describe the same grid


def _grid(g) -> tuple[tuple[int, ...], np.ndarray]:
    if isinstance(g, tuple) and len(g) == 2 and not isinstance(g[0], (int, np.integer)):
        shape, affine = g
    else:
        shape, affine = g.shape, g.affine
    return tuple(int(v) for v in tuple(shape)[:3]), np.asarray(affine, dtype=np.float64)


def same_grid(a, b, atol: float = GRID_ATOL_MM) -> bool:
    """Whether two images lie on one voxel grid: same 3D shape and affines equal within ``atol``.
    Each of ``a`` and ``b`` is an object with ``.shape`` and ``.affine`` (a :class:`Volume`, a
    nibabel image) or a ``(shape, affine)`` pair."""
    (sa, aa), (sb, ab) = _grid(a), _grid(b)
    return sa == sb and np.allclose(aa, ab, atol=atol)


MAX_VOXEL_MM = 20.0


def load_volume(path: str | os.PathLike, role: str = "image") -> Volume:
    """Load a 3D NIfTI image as float32, refusing anything that cannot be segmented safely."""
    p = Path(path)
    where = f"{role} {p}"
    if not p.exists():
        raise InputError(f"{where}: file not found")
    if p.stat().st_size == 0:
        raise InputError(f"{where}: file is empty")
    try:
        img = nib.load(str(p))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise InputError(f"{where}: not a NIfTI image ({type(img).__name__})")
        if 0 in tuple(img.shape):  # the header's shape: nibabel reads such data as a flat empty array
            raise InputError(f"{where}: image has a zero-size axis {tuple(int(s) for s in img.shape)}")
        data = np.asanyarray(img.dataobj)
    except InputError:
        raise
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise InputError(f"{where}: file is truncated or corrupt ({exc})") from None
    except Exception as exc:  # nibabel raises many types for non-NIfTI content
        raise InputError(f"{where}: cannot be read as NIfTI ({exc})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{where}: expected a 3D image, got {data.ndim}D with shape {data.shape}")
    if min(data.shape) < 1:
        raise InputError(f"{where}: image has a zero-size axis {data.shape}")
    if not np.issubdtype(data.dtype, np.number):
        raise InputError(f"{where}: unsupported voxel type {data.dtype}")
    data = np.asarray(data, dtype=np.float32)
    bad = ~np.isfinite(data)
    if bad.any():
        raise InputError(f"{where}: {int(bad.sum())} voxels are NaN or infinite")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(f"{where}: the header's affine is singular or not finite")
    sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if (sizes > MAX_VOXEL_MM).any() or (sizes < 0.01).any():
        raise InputError(f"{where}: absurd voxel size {np.round(sizes, 4).tolist()} mm")
    return Volume(data=data, affine=affine, path=str(p))


def _new_temp_file(folder: Path, prefix: str, suffix: str) -> Path:
    """Create an empty ``folder/<prefix><random><suffix>`` that did not exist, with the mode ``open``
    would give (``tempfile.mkstemp`` makes 0600 files, and the rename into place keeps the mode)."""
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = folder / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomically(target: str | Path, write: Callable) -> None:
    """Write ``target`` through a temporary file in its folder (``.<name>.<random>.tmp``, created
    with the mode ``open`` would give), flushed to disk, then ``os.replace``: a reader, or a crash
    at any instant, finds the old file or the new one, never a partial one. ``write(fh)`` fills the
    binary file object ``fh``."""
    target = Path(target)
    tmp = _new_temp_file(target.parent, f".{target.name}.", ".tmp")
    try:
        with open(tmp, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomically(target: str | Path, text: str) -> None:
    """``text`` (UTF-8) into ``target`` by :func:`replace_atomically`."""
    replace_atomically(target, lambda out: out.write(text.encode("utf-8")))


def copy_atomically(source: str | Path, target: str | Path) -> None:
    """Copy ``source`` over ``target`` by :func:`replace_atomically`."""
    with open(source, "rb") as src:
        replace_atomically(target, lambda out: shutil.copyfileobj(src, out))


def write_all_or_nothing(items: list[tuple[str | os.PathLike, Callable[[str], None]]]) -> list[Path]:
    """Write several files all-or-nothing: ``write(tmp)`` fills a temporary file in each
    destination's folder (mode as ``open`` gives, flushed to disk); only when every one was
    written are they renamed into place. A
    destination that is a folder fails before anything is renamed; should a rename still fail, the
    files this call created are removed again."""
    staged: list[tuple[str, Path]] = []
    created: list[Path] = []
    try:
        for path, write in items:
            p = Path(path)
            if p.is_dir():
                raise IsADirectoryError(f"{p}: is a folder; cannot write a file there")
            suffix = ".nii.gz" if p.name.endswith(".nii.gz") else p.suffix  # writers pick the format from it
            tmp = str(_new_temp_file(p.parent, ".tmp-", suffix))
            staged.append((tmp, p))
            write(tmp)
            _fsync(tmp)
        for tmp, p in staged:
            new = not p.exists()
            os.replace(tmp, p)
            if new:
                created.append(p)
    except BaseException:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        for p in created:
            p.unlink(missing_ok=True)
        raise
    return [p for _, p in staged]


def _nifti_writer(data: np.ndarray, affine: np.ndarray, dtype) -> Callable[[str], None]:
    img = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return lambda tmp: nib.save(img, tmp)


def save_volumes(items: list[tuple[np.ndarray, np.ndarray, str | os.PathLike, type]]) -> list[Path]:
    """Write several NIfTI files all-or-nothing (:func:`write_all_or_nothing`)."""
    return write_all_or_nothing([(path, _nifti_writer(data, affine, dtype)) for data, affine, path, dtype in items])


def write_texts(items: list[tuple[str, str | os.PathLike]]) -> list[Path]:
    """Write text files (``(text, path)`` pairs) all-or-nothing (:func:`write_all_or_nothing`)."""

    def writer(text: str) -> Callable[[str], None]:
        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as fh:
                fh.write(text)
        return write

    return write_all_or_nothing([(path, writer(text)) for text, path in items])


def save_volume(data: np.ndarray, affine: np.ndarray, path: str | os.PathLike, dtype=np.uint8) -> Path:
    """Write one NIfTI file atomically (temporary file in the same folder, then rename)."""
    return save_volumes([(data, affine, path, dtype)])[0]


def strip_nifti_ext(name: str) -> str:
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name
