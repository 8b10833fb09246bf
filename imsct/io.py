"""Reading and writing NIfTI volumes with checks that name the file and the problem."""

from __future__ import annotations

import gzip
import logging
import os
import secrets
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np


log = logging.getLogger("imsct")


class InputError(ValueError):
    """Bad input: the message names the file and what is wrong with it."""


class WriteError(OSError):
    """An output could not be written (full disk, read-only folder, a folder where a file should
    go): the message names the path and the reason. Nothing earlier there was replaced."""


def check_writable_folder(folder: str | os.PathLike) -> Path:
    """Refuse, before any computation, an output folder that cannot be written: a file in its place
    or above it, a read-only or full file system. A missing folder is not created here: its nearest
    existing parent is tried instead (the writers create the rest)."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"output {folder}: " + ("exists and is not a folder" if probe == folder else f"{probe} is a file, not a folder"))
    try:
        _new_temp_file(probe, ".imsct-write-test-", ".tmp").unlink()
    except OSError as exc:
        raise WriteError(f"output {folder}: cannot write there ({exc.strerror or exc})") from None
    return folder


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


def world(indices: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World (RAS+, mm) coordinates of ``(n, 3)`` voxel indices."""
    a = np.asarray(affine, float)
    return np.asarray(indices, float) @ a[:3, :3].T + a[:3, 3]


def nearest_voxel(point: np.ndarray, affine: np.ndarray, shape) -> tuple[int, ...] | None:
    """The voxel of a grid nearest to a world point, or None when it falls outside the grid."""
    inv = np.linalg.inv(np.asarray(affine, float))
    ijk = np.rint(inv[:3, :3] @ np.asarray(point, float) + inv[:3, 3]).astype(int)
    return tuple(int(v) for v in ijk) if ((ijk >= 0) & (ijk < np.asarray(shape[:3]))).all() else None


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


def grid_difference(a, b) -> str:
    """How the voxel grids of ``a`` and ``b`` (objects with ``.shape`` and ``.affine``) differ, ''
    when :func:`same_grid` holds: ``shape (..) vs (..)`` and/or ``affine differs by 2.0 mm
    in translation`` (voxel size, axes and origin named)."""
    if same_grid(a, b):
        return ""
    sa, sb = tuple(int(v) for v in a.shape[:3]), tuple(int(v) for v in b.shape[:3])
    parts = [f"shape {sa} vs {sb}"] if sa != sb else []
    A, B = np.asarray(a.affine, dtype=np.float64), np.asarray(b.affine, dtype=np.float64)
    if not np.allclose(A, B, atol=GRID_ATOL_MM):
        what = []
        za, zb = _voxel_sizes(A), _voxel_sizes(B)
        if not np.allclose(za, zb, atol=GRID_ATOL_MM):
            what.append(f"voxel size {tuple(round(float(v), 4) for v in za)} vs {tuple(round(float(v), 4) for v in zb)} mm")
        turn = (A[:3, :3] / za).T @ (B[:3, :3] / zb)  # from one grid's axes to the other's
        if not np.allclose(turn, np.eye(3), atol=1e-4):
            if np.linalg.det(turn) < 0:
                what.append("axes flipped")
            else:
                angle = np.degrees(np.arccos(np.clip((np.trace(turn) - 1) / 2, -1, 1)))
                what.append(f"axes rotated by {angle:.1f} degrees")
        shift = float(np.linalg.norm(A[:3, 3] - B[:3, 3]))
        if shift > GRID_ATOL_MM:
            what.append(f"{shift:.1f} mm in translation" if shift >= 0.1 else f"{shift:.4f} mm in translation")
        if len(what) == 1 and what[0].endswith("translation"):
            parts.append(f"affine differs by {what[0]}")
        else:
            parts.append("affine differs: " + (", ".join(what) or "by less than the tolerance per element, in sum more"))
    return "; ".join(parts)


def _voxel_sizes(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


MAX_VOXEL_MM = 20.0
MIN_SLICES = 4  # an image thinner than this along any axis is a localiser or a slab, not a volume
QFORM_SFORM_TOL_MM = 1.0  # headers whose qform and sform place a voxel further apart than this are ambiguous


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
    while data.ndim > 3 and data.shape[-1] == 1:  # (x, y, z, 1) and converters' (x, y, z, 1, 1)
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{where}: expected a 3D image, got {data.ndim}D with shape {data.shape}")
    if min(data.shape) < 1:
        raise InputError(f"{where}: image has a zero-size axis {data.shape}")
    if np.iscomplexobj(data):
        raise InputError(f"{where}: complex-valued voxels ({data.dtype}); save the magnitude image")
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
    _warn_about_orientation(img, data.shape, where)
    return Volume(data=data, affine=affine, path=str(p))


def _warn_about_orientation(img, shape, where: str) -> None:
    """Accept, with a warning, headers whose orientation is missing or ambiguous: the masks are then
    written in the same header, so they overlay the image in any viewer, but left-right and position
    in the scanner may be wrong."""
    hdr = img.header
    qcode, scode = int(hdr["qform_code"]), int(hdr["sform_code"])
    if qcode == 0 and scode == 0:
        log.warning("%s: warning: the header has no orientation (qform and sform codes 0); the voxel axes are taken "
                    "as RAS with the pixdim sizes, so left-right and levels may be wrong", where)
        return
    if qcode > 0 and scode > 0:
        q, s_ = hdr.get_qform(), hdr.get_sform()
        n = np.asarray(shape[:3], float) - 1
        corners = np.array([[i, j, k, 1.0] for i in (0, n[0]) for j in (0, n[1]) for k in (0, n[2])]).T
        gap = float(np.abs((q @ corners)[:3] - (s_ @ corners)[:3]).max())
        if gap > QFORM_SFORM_TOL_MM:
            log.warning("%s: warning: qform and sform disagree by up to %.1f mm; using the sform (as nibabel does; "
                        "ITK-based tools may use the qform)", where, gap)


def load_image(path: str | os.PathLike, role: str) -> Volume:
    """Load an MR image (T2w, T1w) to segment: :func:`load_volume`'s checks, and refuse images with
    nothing to segment: a constant image (blank, or a failed export) and a slab under
    :data:`MIN_SLICES` voxels thick along any axis."""
    vol = load_volume(path, role)
    where = f"{role} {Path(path)}"
    thin = [n for n in vol.shape if n < MIN_SLICES]
    if thin:
        raise InputError(f"{where}: only {min(thin)} slice(s) along one axis {vol.shape}; a volume of at least "
                         f"{MIN_SLICES} slices is needed")
    lo, hi = float(vol.data.min()), float(vol.data.max())
    if lo == hi:
        hint = "; without a Gd-T1w, run the T2w-only model (--t2-only)" if "T1w" in role else ""
        raise InputError(f"{where}: every voxel is {lo:g} (a blank image): nothing to segment{hint}")
    return vol


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
    files this call created are removed again. Any failure is raised as :class:`WriteError` naming
    the destination."""
    staged: list[tuple[str, Path]] = []
    created: list[Path] = []
    current = None  # the destination being written, named by a write failure
    try:
        for path, write in items:
            p = current = Path(path)
            if p.is_dir():
                raise WriteError(f"output {p}: is a folder; cannot write a file there")
            suffix = ".nii.gz" if p.name.endswith(".nii.gz") else p.suffix  # writers pick the format from it
            tmp = str(_new_temp_file(p.parent, ".tmp-", suffix))
            staged.append((tmp, p))
            write(tmp)
            _fsync(tmp)
        for tmp, p in staged:
            current = p
            new = not p.exists()
            os.replace(tmp, p)
            if new:
                created.append(p)
    except BaseException as exc:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        for p in created:
            p.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise WriteError(f"output {current}: cannot write ({exc.strerror or exc})") from None
        raise
    return [p for _, p in staged]


def _nifti_writer(data: np.ndarray, affine: np.ndarray, dtype) -> Callable[[str], None]:
    img = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return lambda tmp: nib.save(img, tmp)


def _text_writer(text: str) -> Callable[[str], None]:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as fh:
            fh.write(text)
    return write


def save_volumes(items: list[tuple[np.ndarray, np.ndarray, str | os.PathLike, type]],
                 texts: list[tuple[str, str | os.PathLike]] = ()) -> list[Path]:
    """Write several NIfTI files, and ``texts`` (``(text, path)`` pairs, e.g. their JSON sidecars),
    all-or-nothing (:func:`write_all_or_nothing`)."""
    return write_all_or_nothing([(path, _nifti_writer(data, affine, dtype)) for data, affine, path, dtype in items]
                                + [(path, _text_writer(text)) for text, path in texts])


def write_texts(items: list[tuple[str, str | os.PathLike]]) -> list[Path]:
    """Write text files (``(text, path)`` pairs) all-or-nothing (:func:`write_all_or_nothing`)."""
    return write_all_or_nothing([(path, _text_writer(text)) for text, path in items])


def save_volume(data: np.ndarray, affine: np.ndarray, path: str | os.PathLike, dtype=np.uint8) -> Path:
    """Write one NIfTI file atomically (temporary file in the same folder, then rename)."""
    return save_volumes([(data, affine, path, dtype)])[0]


def strip_nifti_ext(name: str) -> str:
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name
