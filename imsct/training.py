"""Training both stages on BIDS data, with the same preprocessing the cascade uses at test time.

Cases are brought to the working grid once and cached as compressed ``.npz`` files (one per case,
read from disk at each step: no dataset is held whole in memory).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .bids import Case, find_cases
from .cascade import ROI_SIZE, STAGE1_FIELD, cord_box, stage1_input
from .precision import use_bf16
from .geometry import WORKING_SPACING, box_slices, crop_or_pad, resample_image, to_working, working_grid
from .io import Volume, load_image, load_volume, replace_atomically
from .labels import ANATOMY_CHANNELS, CORD_BOX_SUFFIX, CORD_SUFFIX, DISCS_SUFFIX, LABELS, SEG_SUFFIXES

log = logging.getLogger(__name__)


# anatomy targets (stage 3) and the label files they come from
ANATOMY_SUFFIXES = {"tight_cord": CORD_SUFFIX, "discs": DISCS_SUFFIX}


def prepare_case(case: Case, cache_dir: str | Path) -> Path:
    """Working-grid arrays of one labelled case: t2, t1 (on the T2w's working grid), the label map
    (0..3), the stage-1 target and, where the case has them (phantoms made with ``--disc-labels``),
    the anatomy targets (tight cord, disc tissue). Cached as ``<cache>/<name>.npz``."""
    out = Path(cache_dir) / f"{case.name}.npz"
    if out.exists():
        return out
    t2 = load_image(case.t2, "T2w")
    t1 = load_image(case.t1, "T1w")
    lab = np.zeros(t2.shape, np.uint8)
    for name, value in LABELS.items():
        lab[load_volume(case.labels[SEG_SUFFIXES[name]], name).data > 0.5] = value
    sc = load_volume(case.labels[CORD_BOX_SUFFIX], "cord mask").data > 0.5
    extra = {}
    if all(s in case.labels for s in ANATOMY_SUFFIXES.values()):
        extra = {k: load_volume(case.labels[s], k).data > 0.5 for k, s in ANATOMY_SUFFIXES.items()}
    return write_working_arrays(out, t2, t1, lab, sc, extra)


def write_working_arrays(out: str | Path, t2: Volume, t1: Volume, label: np.ndarray,
                         cord: np.ndarray | Callable[[np.ndarray, np.ndarray], np.ndarray],
                         extra: dict[str, np.ndarray] | None = None) -> Path:
    """The training cache of one case (``.npz`` with t2, t1, label, cord, affine on the T2w's
    working grid), written atomically. ``label`` (0..3) is on the T2w grid; ``cord`` is the stage-1
    target on the T2w grid, or a function ``(t2_working, label_working) -> cord_working``;
    ``extra``: more binary masks on the T2w grid, cached under their keys (the anatomy targets)."""
    out = Path(out)
    w_shape, w_aff = working_grid(t2.affine, t2.shape, WORKING_SPACING)
    t2w = resample_image(t2.data, t2.affine, w_shape, w_aff).numpy().astype(np.float32)
    label_w = to_working(np.asarray(label).astype(np.uint8), t2.affine, w_shape, w_aff, label=True)
    if callable(cord):
        cord_w = cord(t2w, label_w)
    else:
        cord_w = to_working(np.asarray(cord).astype(np.uint8), t2.affine, w_shape, w_aff, label=True)
    arrays = {"t2": t2w, "t1": resample_image(t1.data, t1.affine, w_shape, w_aff).numpy().astype(np.float32),
              "label": label_w, "cord": cord_w, "affine": w_aff}
    for key, mask in (extra or {}).items():
        arrays[key] = to_working(np.asarray(mask).astype(np.uint8), t2.affine, w_shape, w_aff, label=True)
    replace_atomically(out, lambda fh: np.savez(fh, **arrays))  # uncompressed: read at every step; ranks may race
    return out


def stage2_target(label: np.ndarray) -> np.ndarray:
    """Four binary channels [tumour, edema, cavity, whole tumour] from a 0..3 label map."""
    return np.stack([label == 1, label == 2, label == 3, label > 0]).astype(np.float32)


def _random_crop(arrays: list[np.ndarray], size, rng: np.random.Generator, centre=None, pad: str = "zeros") -> list[np.ndarray]:
    """Same crop of several ``(C, ...)`` arrays. Where the image is smaller than ``size`` the crop
    is padded: with zeros (``pad="zeros"``: stage 1, whose field is zero-padded by definition) or,
    for stage 2 (``pad="replicate"``), by the rule of :mod:`imsct.windows`: the edge voxel repeated
    and a validity mask (1 real, 0 padding) returned as one more array, so that the network's
    z-score ignores the padding exactly as it does at inference."""
    spatial = np.asarray(arrays[0].shape[-3:])
    size = np.asarray(size)
    if centre is None:
        lo = np.array([rng.integers(min(0, s - p), max(0, s - p) + 1) for s, p in zip(spatial, size)])
    else:
        lo = np.asarray(centre) - size // 2 + rng.integers(-size // 4, size // 4 + 1)
        lo = np.clip(lo, np.minimum(0, spatial - size), np.maximum(0, spatial - size))
    s_lo, s_hi = np.maximum(lo, 0), np.minimum(lo + size, spatial)
    if pad == "replicate":
        from .windows import pad_replicate

        # a region shorter than the patch is taken whole (lo clipped to 0) and padded at its far end
        sl = (..., *[slice(int(x), int(y)) for x, y in zip(s_lo, s_hi)])
        out, valid = [], None
        for a in arrays:
            padded, valid = pad_replicate(np.ascontiguousarray(a[sl]), size)
            out.append(padded)
        return [*out, valid.astype(np.float32)]
    out = []
    for a in arrays:
        o = np.zeros(a.shape[:-3] + tuple(size), a.dtype)
        d_lo = s_lo - lo
        o[(..., *[slice(x, y) for x, y in zip(d_lo, d_lo + s_hi - s_lo)])] = a[(..., *[slice(x, y) for x, y in zip(s_lo, s_hi)])]
        out.append(o)
    return out


def stage1_sample(npz: Path, rng: np.random.Generator, crop=(256, 128, 32)) -> tuple[np.ndarray, np.ndarray]:
    d = np.load(npz)
    x, _ = stage1_input(d["t2"])
    y, _ = crop_or_pad(d["cord"][None].astype(np.float32), STAGE1_FIELD, 0.0)  # the same crop / pad as the image
    if crop is None or tuple(crop) == STAGE1_FIELD:
        return x, y
    idx = np.argwhere(y[0] > 0)
    centre = idx[rng.integers(len(idx))] if len(idx) and rng.random() < 0.8 else None
    x, y = _random_crop([x, y], crop, rng, centre)
    return x, y


def stage2_region(d, crop_to_cord: bool = True, whole_length: bool = False) -> tuple[slice, ...]:
    """Where stage 2 works on a cached case: the true cord box grown as at test time, or the whole
    working field (``crop_to_cord=False``: the single-network baseline without the cascade).

    ``whole_length``: the box runs the whole superior-inferior length of the field (axis 0 of the
    working grid), as stage 1's region does at test time in long fields, where it reaches past the
    conus and into the brainstem; training and validating inside the true cord box only, a network
    never sees what lies beyond the cord's ends (measured: the anatomy network called the 60-95 mm
    below the conus cord on every lumbar field, so the levels could not be numbered from the conus)."""
    box = cord_box(d["cord"] > 0, d["t2"].shape) if crop_to_cord else None
    lo, hi = box if box is not None else (np.zeros(3, int), np.asarray(d["t2"].shape))
    if whole_length:
        lo, hi = np.array(lo), np.array(hi)
        lo[0], hi[0] = 0, d["t2"].shape[0]
    return box_slices(lo, hi)


def stage2_sample(npz: Path, rng: np.random.Generator, patch=ROI_SIZE, p_lesion: float = 0.67, crop_to_cord: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A patch of [T2w, T1w, validity] inside the (true) cord box, centred on a lesion voxel with
    probability ``p_lesion`` so that small classes are seen. A region smaller than the patch is
    replicate-padded and the padding marked invalid (:mod:`imsct.windows`): the third channel is
    the validity mask that :class:`imsct.networks.PatchNormalised` reads and drops."""
    d = np.load(npz)
    sl = stage2_region(d, crop_to_cord, whole_length=crop_to_cord)
    img = np.stack([d["t2"][sl], d["t1"][sl]])
    tgt = stage2_target(d["label"][sl])
    centre = None
    if rng.random() < p_lesion and tgt[3].any():
        cls = rng.choice([c for c in range(3) if tgt[c].any()])
        idx = np.argwhere(tgt[cls] > 0)
        centre = idx[rng.integers(len(idx))]
    x, y, valid = _random_crop([img, tgt], patch, rng, centre, pad="replicate")
    return np.concatenate([x, valid[None]]), y


def anatomy_target(d) -> np.ndarray:
    """The anatomy network's targets, one channel per :data:`imsct.labels.ANATOMY_CHANNELS`."""
    missing = [k for k in ANATOMY_SUFFIXES if k not in d]
    if missing:
        raise ValueError(f"training cache lacks the anatomy targets {missing}: make the phantoms with --disc-labels "
                         "and use a fresh cache folder")
    return np.stack([d[k] for k in ANATOMY_SUFFIXES]).astype(np.float32)


def anatomy_sample(npz: Path, rng: np.random.Generator, patch=ROI_SIZE, p_cord: float = 0.67) -> tuple[np.ndarray, np.ndarray]:
    """A patch of [T2w, validity] inside the cord box over the field's whole length with its [cord,
    discs] targets (stage 3: the anatomy network sees what stage 2 sees, without the T1w), centred on
    a cord voxel with probability ``p_cord``, else anywhere in the box (beyond the conus too)."""
    d = np.load(npz)
    sl = stage2_region(d, whole_length=True)
    img, tgt = d["t2"][sl][None], anatomy_target(d)[(slice(None), *sl)]
    idx = np.argwhere(tgt[0] > 0)
    centre = idx[rng.integers(len(idx))] if len(idx) and rng.random() < p_cord else None
    x, y, valid = _random_crop([img, tgt], patch, rng, centre, pad="replicate")
    return np.concatenate([x, valid[None]]), y


def _augment(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, prob: float,
             validity: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Random affine of the paper (rotation +-5 deg, scaling +-10 %, translation +-3 %), applied to a
    batch with the same warp for image (linear) and target (nearest). ``validity`` (stage 2): the
    image's last channel is the validity mask; the warp then samples outside the patch with the
    border value (no zero edge, :mod:`imsct.windows`) and the mask marks those voxels invalid."""
    if prob <= 0 or rng.random() >= prob:
        return x, y
    import torch.nn.functional as F

    n = x.shape[0]
    thetas = []
    for _ in range(n):
        a = np.deg2rad(rng.uniform(-5, 5, 3))
        rx = np.array([[1, 0, 0], [0, np.cos(a[0]), -np.sin(a[0])], [0, np.sin(a[0]), np.cos(a[0])]])
        ry = np.array([[np.cos(a[1]), 0, np.sin(a[1])], [0, 1, 0], [-np.sin(a[1]), 0, np.cos(a[1])]])
        rz = np.array([[np.cos(a[2]), -np.sin(a[2]), 0], [np.sin(a[2]), np.cos(a[2]), 0], [0, 0, 1]])
        m = rx @ ry @ rz @ np.diag(rng.uniform(0.9, 1.1, 3))
        thetas.append(np.concatenate([m, rng.uniform(-0.06, 0.06, (3, 1))], axis=1))
    theta = torch.as_tensor(np.stack(thetas), dtype=torch.float32)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    if not validity:
        return (F.grid_sample(x, grid, mode="bilinear", align_corners=False),
                F.grid_sample(y, grid, mode="nearest", align_corners=False))
    img = F.grid_sample(x[:, :-1], grid, mode="bilinear", padding_mode="border", align_corners=False)
    valid = (F.grid_sample(x[:, -1:], grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.999).to(x.dtype)
    return (torch.cat([img, valid], dim=1),
            F.grid_sample(y, grid, mode="nearest", padding_mode="border", align_corners=False))


# ---- pieces the bundle's train.json wires into MONAI's ignite workflows ----------------------


def split_cases(dataset_dir: str | Path | None = None, datalist: str | Path | None = None, cache_dir: str | Path = "cache",
                val_fraction: float = 0.2, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """Cached training and validation files from a BIDS folder (random split, persistent for a
    seed) or from a datalist JSON ``{"training": [case, ...], "validation": [case, ...]}`` where a case
    is ``{"t2": path, "t1": path, "labels": {"_seg-tumor": path, ..., "_sc-mask": path}}``."""
    if datalist:
        doc = json.loads(Path(datalist).read_text())
        base = Path(datalist).parent

        def cases(key):
            out = []
            for c in doc.get(key, []):
                t2 = (base / c["t2"]).resolve()
                out.append(Case(name=t2.name.split(".nii")[0], t2=t2, t1=(base / c["t1"]).resolve(),
                                labels={k: (base / v).resolve() for k, v in c["labels"].items()}))
            return out

        train, val = cases("training"), cases("validation")
    else:
        all_cases = [c for c in find_cases(dataset_dir) if c.labels]
        order = np.random.default_rng(seed).permutation(len(all_cases))
        n_val = max(1, int(round(val_fraction * len(all_cases)))) if len(all_cases) > 1 else 0
        val = [all_cases[i] for i in order[:n_val]]
        train = [all_cases[i] for i in order[n_val:]]
    if not train:
        raise ValueError(f"no labelled training case found in {datalist or dataset_dir}")
    return [prepare_case(c, cache_dir) for c in train], [prepare_case(c, cache_dir) for c in val]


class PatchDataset(torch.utils.data.Dataset):
    """``samples`` random training patches per epoch, read from the cached cases at each access
    (nothing held in memory). Stage 1: crops of the localiser's field around the cord; stage 2:
    lesion-centred patches inside the cord box; stage 0: the same over the whole field (the
    single-network baseline); stage 3: cord-centred [T2w, validity] patches inside the cord box
    with the anatomy targets (:func:`anatomy_sample`). Random affine augmentation per sample.

    ``t1_dropout``: probability that a stage-2 sample's T1w channel is replaced by zeros (modality
    dropout); 1.0 trains the T2w-only network that ``--t2-only`` runs (a constant channel is zero
    after the network's per-patch z-scoring, exactly what inference feeds when T1w is absent).
    ``t2_as_t1``: probability that it is replaced by a copy of the T2w instead (a T1w channel that
    carries no contrast information, as when a site passes its T2w or a non-contrast series as the
    T1w); the labels are kept, so the network learns to answer from the T2w alone then, not to
    read lesions into the copy. The two draws are exclusive (dropout first).

    Stage 0 / 2 images have three channels, [T2w, T1w, validity]: the patch-padding rule of
    :mod:`imsct.windows`, the same as the inference and validation windows."""

    def __init__(self, files, stage: int, patch, samples: int = 100, augment_prob: float = 0.5, p_lesion: float = 0.67,
                 t1_dropout: float = 0.0, t2_as_t1: float = 0.0):
        self.files, self.stage, self.patch = list(files), int(stage), tuple(int(p) for p in patch)
        self.samples, self.augment_prob, self.p_lesion = int(samples), float(augment_prob), float(p_lesion)
        self.t1_dropout, self.t2_as_t1 = float(t1_dropout), float(t2_as_t1)
        if not 0.0 <= self.t1_dropout + self.t2_as_t1 <= 1.0 or min(self.t1_dropout, self.t2_as_t1) < 0:
            raise ValueError(f"t1_dropout {t1_dropout} and t2_as_t1 {t2_as_t1}: each must be >= 0 and their sum <= 1")

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,))))
        f = self.files[int(rng.integers(len(self.files)))]
        if self.stage == 1:
            x, y = stage1_sample(f, rng, self.patch)
        elif self.stage == 3:
            x, y = anatomy_sample(f, rng, self.patch)
        else:  # stage 2, or stage 0: one network on the whole field (no cascade)
            x, y = stage2_sample(f, rng, self.patch, self.p_lesion, crop_to_cord=self.stage == 2)
            # drawn only when asked for, so runs without it keep the random stream they always had
            u = rng.random() if self.t1_dropout + self.t2_as_t1 > 0 else 1.0
            if u < self.t1_dropout:
                x[1] = 0.0
            elif u < self.t1_dropout + self.t2_as_t1:
                x[1] = x[0]
        xt, yt = _augment(torch.from_numpy(x)[None], torch.from_numpy(y)[None], rng, self.augment_prob, validity=self.stage != 1)
        return {"image": xt[0], "label": yt[0]}


class ValidationDataset(torch.utils.data.Dataset):
    """Whole validation inputs as the cascade sees them: the localiser's field (stage 1) or the
    [T2w, T1w] crop of the cord box (stage 2), with their targets (``t2_only``: T1w zeroed, as
    inference without T1w sees it). Stage 2's crop goes through the validation inferer of
    ``train.json``, :class:`imsct.windows.PaddingSafeInferer`: the windows of inference."""

    def __init__(self, files, stage: int, t2_only: bool = False):
        self.files, self.stage, self.t2_only = list(files), int(stage), bool(t2_only)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        f = self.files[index]
        if self.stage == 1:
            x, y = stage1_sample(f, np.random.default_rng(0), None)
        elif self.stage == 3:
            d = np.load(f)
            sl = stage2_region(d, whole_length=True)
            x, y = d["t2"][sl][None], anatomy_target(d)[(slice(None), *sl)]
        else:
            d = np.load(f)
            sl = stage2_region(d, crop_to_cord=self.stage == 2, whole_length=self.stage == 2)
            x, y = np.stack([d["t2"][sl], d["t1"][sl]]), stage2_target(d["label"][sl])
            if self.t2_only:
                x[1] = 0.0
        return {"image": torch.from_numpy(np.ascontiguousarray(x)), "label": torch.from_numpy(np.ascontiguousarray(y))}


class AutocastInferer:
    """Runs the network under autocast on any device (MONAI's engines only autocast on CUDA):
    bfloat16 on CPU roughly halves the time of a training step. Returns float32."""

    def __init__(self, enabled: bool | str = "auto", dtype: str = "bfloat16", inferer=None, device: str | torch.device = "cpu"):
        # "auto": bfloat16 only where the device runs it natively (emulated bf16 is slower than float32)
        self.enabled, self.dtype, self.inferer = use_bf16(enabled, device), getattr(torch, dtype), inferer

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        with torch.autocast(inputs.device.type, dtype=self.dtype, enabled=self.enabled):
            out = self.inferer(inputs, network, *args, **kwargs) if self.inferer is not None else network(inputs, *args, **kwargs)
        return out.float()


def gradients_finite(params) -> bool:
    """Whether every gradient present is free of NaN and inf."""
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def drop_gradients(params) -> None:
    """Set every gradient to None: the optimiser's next step then leaves weights and moments untouched."""
    for p in params:
        p.grad = None


class NonFiniteGradientGuard:
    """Trainer handler, after each backward pass: when a gradient is not finite, the batch's forward
    and backward are run again in float32; if the gradients are still not finite, the optimiser step
    is skipped (one NaN step would reach Adam's moments and from there every weight). Both with a
    warning; ``max_consecutive`` skipped steps in a row stop training with an error.

    Why: with bfloat16 autocast on CPU, the weight gradient of a 3x3x3 convolution on a 2x2x2
    feature map (the bottom of the U-Net on 32^3 patches) intermittently comes back with NaN entries:
    3 of 60 random 256-channel cases, never in float32; 5 of 30 backward passes of the stage-2 network
    on 32^3 patches, 3-6 of 40 on 32x32x16, none on 96x96x32. Under distributed training the
    gradients are already averaged, so every rank takes the same branch."""

    def __init__(self, max_consecutive: int = 20):
        self.max_consecutive = int(max_consecutive)
        self.retried = self.skipped = self.consecutive = 0

    def attach(self, engine) -> None:
        from monai.engines.utils import IterationEvents

        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine) -> None:
        from monai.utils import CommonKeys as Keys

        params = list(engine.network.parameters())
        if gradients_finite(params):
            self.consecutive = 0
            return
        out = engine.state.output
        engine.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(out[Keys.IMAGE].device.type, enabled=False):
            loss = engine.loss_function(engine.network(out[Keys.IMAGE]).float(), out[Keys.LABEL]).mean()
        loss.backward()
        if gradients_finite(params):
            self.retried += 1
            self.consecutive = 0
            out[Keys.LOSS] = loss.detach()
            log.warning("iteration %d: non-finite gradient under autocast, step computed again in float32 (%d so far)",
                        engine.state.iteration, self.retried)
            return
        drop_gradients(params)
        self.skipped += 1
        self.consecutive += 1
        log.warning("iteration %d: non-finite gradient also in float32, optimiser step skipped (%d so far)", engine.state.iteration, self.skipped)
        if self.consecutive >= self.max_consecutive:
            raise RuntimeError(f"gradients were non-finite on {self.consecutive} consecutive iterations: lower the learning rate")


def latest_checkpoint(directory: str | Path, pattern: str = "checkpoint*.pt") -> str | None:
    """Newest resume checkpoint in ``directory`` (None if there is none)."""
    files = sorted(Path(directory).glob(pattern), key=lambda p: p.stat().st_mtime)
    return str(files[-1]) if files else None
