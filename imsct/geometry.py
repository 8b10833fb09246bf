"""World-space geometry: the working grid of the method and resampling between grids.

Every array the networks see lives on a *working grid*: axis 0 runs inferior to superior, axis 1
posterior to anterior, axis 2 left to right (nibabel axis codes ``S, A, R``), with voxels of
1 mm (SI) x 1 mm (AP) x 2 mm (RL) as in Lemay et al. 2021. The grid is aligned with the T2w's own
voxel axes (so an oblique acquisition is not rotated twice) and covers the T2w's field of view.
Any file orientation therefore gives the same working arrays, and results are resampled back onto
the T2w's exact grid (shape and affine) from the headers alone.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

WORKING_SPACING = (1.0, 1.0, 2.0)  # mm along SI, AP, RL
# World (RAS+) axis that each working axis follows: S is world z (2), A is y (1), R is x (0).
_WORLD_AXIS_OF_WORKING = (2, 1, 0)


def working_grid(
    affine: np.ndarray, shape: tuple[int, ...], spacing: tuple[float, float, float] = WORKING_SPACING
) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of the working grid that covers an image of ``shape`` and ``affine``."""
    affine = np.asarray(affine, dtype=np.float64)
    m = affine[:3, :3]
    units = m / np.linalg.norm(m, axis=0, keepdims=True)
    # For each world axis pick the voxel axis most aligned with it (a permutation).
    used: set[int] = set()
    directions = np.zeros((3, 3))
    for w_axis, world in enumerate(_WORLD_AXIS_OF_WORKING):
        order = np.argsort(-np.abs(units[world]))
        vox_axis = next(int(a) for a in order if int(a) not in used)
        used.add(vox_axis)
        u = units[:, vox_axis]
        directions[:, w_axis] = u if u[world] > 0 else -u
    # Field of view: voxel-edge corners of the image, projected onto the working directions.
    n = np.asarray(shape[:3], dtype=np.float64)
    corners = np.array([[i, j, k] for i in (-0.5, n[0] - 0.5) for j in (-0.5, n[1] - 0.5) for k in (-0.5, n[2] - 0.5)])
    world = corners @ m.T + affine[:3, 3]
    proj = world @ directions  # coordinates along each working direction
    lo, hi = proj.min(axis=0), proj.max(axis=0)
    sp = np.asarray(spacing, dtype=np.float64)
    w_shape = np.maximum(1, np.round((hi - lo) / sp)).astype(int)
    first_centre = (lo + hi) / 2 - (w_shape - 1) * sp / 2
    w_affine = np.eye(4)
    w_affine[:3, :3] = directions * sp
    w_affine[:3, 3] = directions @ first_centre
    return tuple(int(s) for s in w_shape), w_affine  # type: ignore[return-value]


def _normaliser(shape: tuple[int, ...]) -> np.ndarray:
    """Matrix from grid_sample's normalised coordinates (align_corners=False) to voxel indices."""
    size = np.asarray(shape[:3], dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = np.diag(size / 2.0)
    m[:3, 3] = (size - 1.0) / 2.0
    return m


def resample(
    data: np.ndarray | torch.Tensor,
    src_affine: np.ndarray,
    dst_shape: tuple[int, ...],
    dst_affine: np.ndarray,
    mode: str = "bilinear",
    padding_value: float = 0.0,
) -> torch.Tensor:
    """Resample ``data`` (``(X, Y, Z)`` or ``(C, X, Y, Z)``) from one grid onto another.

    The voxel-to-voxel map comes from the two affines only. ``mode`` is ``bilinear`` (trilinear in
    3D) or ``nearest``. Points outside the source field get ``padding_value``. Returns a float32
    tensor of shape ``dst_shape`` (with the channel axis if the input had one).
    """
    t = data.float() if isinstance(data, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    squeeze = t.ndim == 3
    if squeeze:
        t = t[None]
    src_shape = tuple(t.shape[1:])
    vox = np.linalg.inv(np.asarray(src_affine, np.float64)) @ np.asarray(dst_affine, np.float64)
    theta_ijk = np.linalg.inv(_normaliser(src_shape)) @ vox @ _normaliser(dst_shape)
    rev = np.eye(4)[[2, 1, 0, 3]]  # grid_sample's (x, y, z) index (W, H, D): reverse the axes
    theta = rev @ theta_ijk @ rev
    grid = F.affine_grid(
        torch.as_tensor(theta[:3], dtype=torch.float32)[None],
        size=(1, t.shape[0], *dst_shape[:3]),
        align_corners=False,
    )
    if padding_value != 0.0:
        t = t - padding_value
    out = F.grid_sample(t[None], grid, mode=mode, padding_mode="zeros", align_corners=False)[0]
    if padding_value != 0.0:
        out = out + padding_value
    return out[0] if squeeze else out


def resample_image(data: np.ndarray | torch.Tensor, src_affine: np.ndarray, dst_shape: tuple[int, ...],
                   dst_affine: np.ndarray) -> torch.Tensor:
    """An intensity image onto another grid (trilinear), with the image's own minimum, its
    background, where the grid reaches outside the image's field (the half voxel beyond the outer
    voxel centres, the corners of an oblique field). Zero there would make the result depend on an
    intensity offset: an image stored 3000 lower would get a bright rim that the z-score keeps."""
    n = data.numel() if isinstance(data, torch.Tensor) else np.size(data)
    low = float(data.min()) if n else 0.0
    return resample(data, src_affine, dst_shape, dst_affine, padding_value=low)


def _corners_in(lo, hi, src_affine: np.ndarray, dst_affine: np.ndarray) -> np.ndarray:
    """The 8 corners of the index box ``[lo, hi]`` of one grid as ``(8, 3)`` indices of another."""
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    corners = np.array([[a, b, c, 1.0] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    return (np.linalg.inv(np.asarray(dst_affine, np.float64)) @ np.asarray(src_affine, np.float64) @ corners.T)[:3].T


def covering_box(
    lo: np.ndarray, hi: np.ndarray, src_affine: np.ndarray, dst_shape: tuple[int, ...], dst_affine: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Index box ``(lo, hi)`` (hi exclusive) on the destination grid holding every voxel that
    trilinear resampling of the source box ``[lo, hi)`` can reach: outside it, resampling an
    array that is zero outside the source box gives exactly zero."""
    # voxel centres from lo - 1 to hi (one voxel of interpolation support on each side)
    ijk = _corners_in(np.asarray(lo, np.float64) - 1, hi, src_affine, dst_affine)
    shape = np.asarray(dst_shape[:3])
    out_lo = np.clip(np.floor(ijk.min(0)).astype(int) - 1, 0, shape)
    out_hi = np.clip(np.ceil(ijk.max(0)).astype(int) + 2, 0, shape)
    return out_lo, out_hi


def box_slices(lo, hi) -> tuple[slice, ...]:
    """The index of the box ``[lo, hi)`` (voxel corners, one per axis): ``array[box_slices(lo, hi)]``."""
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def shifted(affine: np.ndarray, lo) -> np.ndarray:
    """Affine of the sub-grid whose first voxel is index ``lo`` of the grid of ``affine``."""
    t = np.eye(4)
    t[:3, 3] = np.asarray(lo, np.float64)
    return np.asarray(affine, np.float64) @ t


def fields_intersect(src_shape: tuple[int, ...], src_affine: np.ndarray, dst_shape: tuple[int, ...], dst_affine: np.ndarray) -> bool:
    """Whether the source field's bounding box (in destination voxel space, from its 8 corners)
    meets the destination grid: a cheap test that is False only when the fields cannot overlap."""
    ijk = _corners_in(np.full(3, -0.5), np.asarray(src_shape[:3], np.float64) - 0.5, src_affine, dst_affine)
    return bool(np.all(ijk.max(0) > -0.5) and np.all(ijk.min(0) < np.asarray(dst_shape[:3]) - 0.5))


def field_overlap(
    src_shape: tuple[int, ...], src_affine: np.ndarray, dst_shape: tuple[int, ...], dst_affine: np.ndarray
) -> torch.Tensor:
    """Boolean mask on the destination grid: voxels whose centre lies inside the source field."""
    ones = torch.ones(tuple(src_shape[:3]), dtype=torch.float32)
    return resample(ones, src_affine, dst_shape, dst_affine, mode="nearest") > 0.5


def to_working(
    data: np.ndarray, affine: np.ndarray, w_shape: tuple[int, ...], w_affine: np.ndarray, label: bool = False
) -> np.ndarray:
    """Bring an image (linear) or a binary/label mask onto the working grid.

    Label maps are resampled per class as one-hot channels (linear) and the most probable class
    kept, which follows the partial-volume boundary better than nearest-neighbour.
    """
    if not label:
        return resample_image(data, affine, w_shape, w_affine).numpy()
    values = np.unique(data)
    values = values[values != 0]
    if values.size == 0:
        return np.zeros(w_shape, dtype=np.uint8)
    onehot = np.stack([data == 0] + [data == v for v in values]).astype(np.float32)
    probs = resample(onehot, affine, w_shape, w_affine).numpy()
    probs[0] += 1e-6  # empty (outside) voxels fall to background
    lut = np.concatenate([[0], values]).astype(np.uint8)
    return lut[probs.argmax(axis=0)]


def crop_or_pad(array: np.ndarray, size: tuple[int, ...], value: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Centre crop / pad the last three axes to ``size``. Returns the array and the offset of the
    output's first voxel in the input's index space (negative where padded)."""
    spatial = array.shape[-3:]
    offset = np.array([(s - t) // 2 for s, t in zip(spatial, size)], dtype=int)
    out = np.full(array.shape[:-3] + tuple(size), value, dtype=array.dtype)
    src_lo = np.maximum(offset, 0)
    src_hi = np.minimum(offset + np.asarray(size), spatial)
    dst_lo = src_lo - offset
    dst_hi = src_hi - offset
    out[(..., *box_slices(dst_lo, dst_hi))] = array[(..., *box_slices(src_lo, src_hi))]
    return out, offset
