"""Stage-2 windows that never show padding to the network as if it were anatomy.

One rule, used by every place that feeds stage 2 (inference in :meth:`imsct.cascade.Cascade.segment_crop`,
the bundle's validation inferer in ``train.json``, training patches in :mod:`imsct.training`, and so
the app's Monte-Carlo scoring, which calls ``segment_crop``):

1. **The window is fitted to the crop.** Along each axis the window is the configured size (128 x
   128 x 32 on the working grid) or, where the crop is shorter, the crop's length rounded *down* to
   a multiple of 16 (the U-Net downsamples four times), and never below 32 (the 5-level network's
   bottom is then 2 voxels, the least instance normalisation can work on). A crop at least 32 long
   along an axis is therefore covered by overlapping windows that lie wholly inside it: no window
   holds a voxel that is not in the image.
2. **What must still be padded is replicated, never zeros.** Only an axis shorter than 32 voxels
   (e.g. a 52 mm wide crop is 26 voxels at 2 mm right-left) needs padding; it is padded by
   repeating the edge voxel (``replicate``), which adds no edge, no dark slab and no fake intensity
   step for the network to read as a boundary. (Zeros become a bright/dark slab after the z-score:
   on a healthy real crop such padding, 84 % of the window, produced ~3 cm3 of false tumour.)
   ``reflect`` would also create no edge, but it needs the crop to be longer than the padding and
   mirrors structures (a lesion near the edge would appear twice); replicate works for any length.
3. **The z-score uses real voxels only.** The window is given to the network with one more
   channel, the validity mask (1 = a voxel of the image, 0 = padding), which
   :class:`imsct.networks.PatchNormalised` uses to take each channel's mean and standard deviation
   over real voxels only and then drops. Padding therefore changes neither the statistics nor,
   thanks to rule 2, the convolutions' view of an edge.

Training follows the same rule (:func:`pad_replicate` with its mask): a training patch larger than
the region it is drawn from is replicate-padded and carries the same validity channel, and the
random affine augmentation samples outside the patch with the border value and marks it invalid,
so the network is trained on exactly the kind of input it is given at inference.

Why fit rather than pad to the full window: a fully convolutional network needs no fixed input
size, and a window that holds only real voxels is the input closest to training; padding a 60 x 55
voxel crop to 128 x 128 would make three quarters of each window a replicated streak.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

MULTIPLE = 16  # 4 stride-2 downsamplings
MIN_WINDOW = 32  # 5 levels: the bottom is 32 / 16 = 2 voxels
PAD_MODE = "replicate"


def fitted_window(shape, roi_size, multiple: int = MULTIPLE, minimum: int = MIN_WINDOW) -> tuple[int, ...]:
    """The window for a crop of spatial ``shape``: ``roi_size``, or the crop's length rounded down
    to ``multiple`` where it is shorter, at least ``minimum`` (see the module docstring)."""
    out = []
    for n, r in zip(shape, roi_size):
        w = min(int(r), (int(n) // multiple) * multiple)
        out.append(max(w, minimum, 0) if int(r) >= minimum else int(r))
    return tuple(out)


def pad_replicate(x, size) -> tuple:
    """Pad the trailing 3 spatial axes of ``x`` (numpy ``(C, ...)`` or torch ``(B, C, ...)``) at their
    far end up to ``size`` by replicating the edge voxel; returns the padded array and the validity
    mask of its spatial grid (1 real, 0 padding; numpy ``(...)``, or torch ``(B, 1, ...)``)."""
    is_np = isinstance(x, np.ndarray)
    t = torch.from_numpy(np.ascontiguousarray(x)) if is_np else x
    spatial = tuple(int(s) for s in t.shape[-3:])
    pad = [max(0, int(s) - n) for n, s in zip(spatial, size)]
    valid_shape = (*t.shape[:-4], 1, *spatial) if not is_np else spatial
    valid = torch.ones(valid_shape, dtype=torch.float32, device=t.device)
    if any(pad):
        # F.pad orders the last axis first; pad only the far side so that index 0 stays index 0
        spec = [0, pad[2], 0, pad[1], 0, pad[0]]
        lead = t.shape[:-3]
        flat = t.reshape(1, -1, *spatial).float() if t.dim() != 5 else t.float()
        padded = F.pad(flat, spec, mode=PAD_MODE).to(t.dtype)
        t = padded.reshape(*lead, *padded.shape[-3:])
        valid = F.pad(valid if valid.dim() == 5 else valid[None, None], spec, value=0.0)
        if is_np:
            valid = valid[0, 0]
    if is_np:
        return t.numpy(), valid.numpy()
    return t, valid


def accepts_validity(network) -> bool:
    """Whether ``network`` takes the validity channel (imsct's :class:`PatchNormalised`, possibly
    wrapped in DistributedDataParallel). Exported TorchScript / ONNX models do not: they get the
    image only (windows still fitted and replicate-padded; the z-score then includes the few
    replicated voxels of an axis shorter than 32)."""
    net = getattr(network, "module", network)
    return bool(getattr(net, "accepts_validity", False))


class PaddingSafeInferer:
    """MONAI's Gaussian-blended :class:`~monai.inferers.SlidingWindowInferer` with the window fitted
    to the input, the input replicate-padded where it is shorter than the smallest window, and the
    validity channel appended for networks that use it (module docstring). Takes and returns
    ``(B, C, ...)`` tensors on the input's grid; a thin wrapper, not a second sliding window."""

    def __init__(self, roi_size, sw_batch_size: int = 4, overlap: float = 0.25, mode: str = "gaussian",
                 progress: bool = False, **kw):
        self.roi_size = tuple(int(v) for v in roi_size)
        self.sw_batch_size, self.overlap, self.mode = int(sw_batch_size), overlap, mode
        self.progress = bool(progress)
        self.kw = kw
        self._inferers: dict = {}  # one MONAI inferer per fitted window, built on first use

    def window_for(self, spatial) -> tuple[int, ...]:
        return fitted_window(spatial, self.roi_size)

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        from monai.inferers import SlidingWindowInferer

        spatial = tuple(int(s) for s in inputs.shape[2:])
        window = self.window_for(spatial)
        x, valid = pad_replicate(inputs, window)
        if accepts_validity(network):
            x = torch.cat([x, valid.to(x.dtype)], dim=1)
        sw = self._inferers.get(window)
        if sw is None:
            sw = self._inferers[window] = SlidingWindowInferer(
                roi_size=window, sw_batch_size=self.sw_batch_size, overlap=self.overlap, mode=self.mode,
                padding_mode=PAD_MODE, progress=self.progress, **self.kw)
        out = sw(x, network, *args, **kwargs)
        return out[(..., *[slice(0, n) for n in spatial])]

    def with_progress(self) -> "PaddingSafeInferer":
        other = copy.copy(self)
        other.progress, other._inferers = True, {}
        return other


def padding_safe(inferer) -> PaddingSafeInferer:
    """``inferer`` as a :class:`PaddingSafeInferer` (a MONAI SlidingWindowInferer is converted with
    its window, batch, overlap and blending; anything else with a ``roi_size`` likewise)."""
    if isinstance(inferer, PaddingSafeInferer):
        return inferer
    roi = getattr(inferer, "roi_size", None)
    if roi is None:
        raise TypeError(f"stage-2 inferer {inferer!r}: expected a sliding-window inferer with a roi_size")
    return PaddingSafeInferer(roi, sw_batch_size=getattr(inferer, "sw_batch_size", 4), overlap=getattr(inferer, "overlap", 0.25),
                              mode=getattr(inferer, "mode", "gaussian"), progress=bool(getattr(inferer, "progress", False)))


__all__ = ["PaddingSafeInferer", "padding_safe", "fitted_window", "pad_replicate", "accepts_validity", "MIN_WINDOW", "MULTIPLE"]
