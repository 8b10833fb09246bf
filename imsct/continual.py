"""Continual learning for the cascade: retraining rounds fed from annotators' final label maps,
with a persistent validation split, anti-forgetting (replay + EWC) and a publication gate.

Used by the MONAI Label app's trainers and by ``scripts/continual_experiment.py``.

API
---
``LabelledCase(name, t2, t1, label, centre, cord=None)``
    One annotated case: T2w and Gd-T1w NIfTI paths, ``label`` a single 0..3 label map on the T2w
    grid (tumour 1, edema 2, cavity 3: what MONAI Label saves in ``labels/final``), the centre
    (site / scanner) it comes from and, optionally, a stage-1 target mask (``cord``) when one exists.

``retrain_round(cases, models_dir, state_dir, *, stage=2, iterations, batch_size, patch_size,
replay=0.5, ewc_lambda=..., tolerance=0.02, seed, log=print, ...) -> RoundResult``
    1. updates the persistent split (``state_dir/split.json``, see :func:`update_split`);
    2. brings every case to the working grid once (``.npz`` cache with the keys of
       :func:`imsct.training.prepare_case`, see :func:`prepare_labelled`);
    3. fine-tunes the published model of the stage (:func:`imsct.weights.stage_model`: the
       tumour network for stage 2, the localiser for stage 1) on the training cases not yet learnt ("fresh"),
       mixing into every batch a share ``replay`` of patches from a reservoir of earlier rounds'
       training cases (per-centre reservoir sampling, Vitter's algorithm R), and adding the EWC
       penalty of Kirkpatrick et al. 2017 (PNAS 114:3521, "Overcoming catastrophic forgetting in
       neural networks") anchored at the published weights, with a diagonal empirical Fisher
       information estimated on the reservoir (``state_dir/ewc-stage<k>.pt``);
    4. gates: evaluates the published and the candidate weights on every validation case, by the
       same Gaussian sliding-window inference as test time (:meth:`imsct.cascade.Cascade.segment_crop`)
       inside each case's stage-2 region; the candidate is published only when its mean
       whole-tumour Dice on the validation cases of *earlier* centres (centres known before this
       round; all validation cases in a first round) drops by at most ``tolerance`` (0.02 = 2 Dice
       points). Stage 1 is gated on the share of annotated lesion voxels inside the cord box its
       prediction gives (what the cascade needs of the localiser);
    5. publishes atomically: the gated fp16 file (written by :func:`imsct.training.save_weights`)
       is copied to a temporary file in ``models_dir`` and renamed over the old one
       (``os.replace``), so a reader sees the old or the new weights, never a partial file. When
       the gate refuses, the old file stays byte-identical and the reason is recorded.
    Every round (published or not, with the reason and the before/after metrics per centre) is
    appended to ``state_dir/rounds.json``; :func:`train_stats` summarises it for ``/info``.
    A round killed at any point (the app's trainer is a subprocess) leaves the published weights
    and every state file whole (all written by :func:`replace_atomically`) and is not recorded; the
    next round removes its temporary files and runs as the killed one would have (same split, same
    earlier centres for the gate).

Stage-1 target from a final label map
-------------------------------------
The app's annotators save one label map per case, no cord mask. The stage-1 target is then the
published localiser's own cord-region prediction (largest component, threshold 0.5) united with
the annotated whole tumour dilated by ``DILATE_MM`` (10 mm): the box drawn from it always contains
every annotated lesion, and the localiser is taught to find them where it missed them. A case that
comes with a ``cord`` mask (phantoms, imported BIDS data) uses that mask instead.

Split
-----
``state_dir/split.json`` maps each case name to ``{"role": "train"|"validation", "centre", "round"}``.
A case keeps its role forever (a validation case never trains). A new case goes to validation
when its centre has no validation case yet, or while the centre's validation share is below
``val_fraction``; new cases are taken in name order, so the split does not depend on call order
within a round.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy import ndimage

from .cascade import Cascade, cord_box
from .geometry import WORKING_SPACING
from .io import InputError, copy_atomically, load_image, load_volume, replace_atomically
from .labels import CLASSES, MIN_VOLUME_CM3, split_masks
from .metrics import box_coverage, dice
from .postprocess import labelmap_from_probabilities, postprocess_labelmap
from .precision import use_bf16
from .training import PatchDataset, drop_gradients, gradients_finite, stage2_region, write_working_arrays
from .weights import MODELS, build, load_weights, save_weights, stage_model

DILATE_MM = 10.0
# what a round's validation number is, per stage (the gated metric, over every validation case)
VALIDATION_NAMES = {1: "lesion share in the stage-1 box", 2: "whole-tumour Dice"}


@dataclass
class LabelledCase:
    name: str
    t2: Path
    t1: Path
    label: Path  # 0..3 label map on the T2w grid
    centre: str
    cord: Path | None = None  # optional stage-1 target (binary, T2w grid)


@dataclass
class RoundResult:
    published: bool
    reason: str
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0


# ---- state files --------------------------------------------------------------------------------


def _read_json(path: Path, default):
    return json.loads(path.read_text()) if path.exists() else default


def _write_json(path: Path, doc) -> None:
    replace_atomically(path, lambda fh: fh.write(json.dumps(doc, indent=1, default=lambda o: None).encode()))


@contextmanager
def _locked(state_dir: Path):
    """One round at a time per state folder (an exclusive lock on ``state_dir/.lock``)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def load_split(state_dir: str | Path) -> dict:
    return _read_json(Path(state_dir) / "split.json", {})


def plan_split(split: dict, cases, val_fraction: float = 0.2, round_index: int = 0) -> dict:
    """``split`` (name -> role, centre, round) with every case not in it yet assigned (see the
    module docstring); a new dict, nothing written. ``cases`` need ``name`` and ``centre``."""
    split = dict(split)
    for c in sorted((c for c in cases if c.name not in split), key=lambda c: c.name):
        mine = [v for v in split.values() if v["centre"] == c.centre]
        n_val = sum(v["role"] == "validation" for v in mine)
        to_val = n_val == 0 or n_val < val_fraction * (len(mine) + 1) - 1e-9
        split[c.name] = {"role": "validation" if to_val else "train", "centre": c.centre, "round": round_index}
    return split


def update_split(state_dir: str | Path, cases: list[LabelledCase], val_fraction: float = 0.2, round_index: int | None = None) -> dict:
    """Assign every case not in ``split.json`` yet (:func:`plan_split`) and save; cases already
    there keep their role. Returns the whole split."""
    state_dir = Path(state_dir)
    rnd = len(_read_json(state_dir / "rounds.json", [])) if round_index is None else round_index
    split = plan_split(load_split(state_dir), cases, val_fraction, rnd)
    _write_json(state_dir / "split.json", split)
    return split


def init_state(state_dir: str | Path, trained: list[LabelledCase] = (), validation: list[LabelledCase] = (), replay_cases: int = 32, seed: int = 0) -> None:
    """Record history that happened outside these rounds: cases the published model was already
    trained on (they join the replay reservoir and never train as "fresh" again) and cases to hold
    out for validation. Names already in the split keep their role."""
    state_dir = Path(state_dir)
    with _locked(state_dir):
        split = load_split(state_dir)
        for c in validation:
            split.setdefault(c.name, {"role": "validation", "centre": c.centre, "round": -1})
        for c in trained:
            split.setdefault(c.name, {"role": "train", "centre": c.centre, "round": -1})
        _write_json(state_dir / "split.json", split)
        res = _read_json(state_dir / "reservoir.json", {"learnt": [], "reservoir": {}, "seen": {}})
        _add_to_reservoir(res, [c for c in trained if split[c.name]["role"] == "train"], replay_cases, np.random.default_rng(seed))
        _write_json(state_dir / "reservoir.json", res)


def _add_to_reservoir(res: dict, cases, cap: int, rng: np.random.Generator) -> None:
    """Mark cases as learnt and offer them to their centre's reservoir (algorithm R: every case
    seen so far stays with equal probability ``cap / seen``)."""
    for c in cases:
        if c.name in res["learnt"]:
            continue
        res["learnt"].append(c.name)
        pool = res["reservoir"].setdefault(c.centre, [])
        seen = res["seen"].get(c.centre, 0) + 1
        res["seen"][c.centre] = seen
        if len(pool) < cap:
            pool.append(c.name)
        else:
            j = int(rng.integers(seen))
            if j < cap:
                pool[j] = c.name


# ---- data: final label maps to the training cache ------------------------------------------------


def _case_key(case: LabelledCase, extra: str = "") -> str:
    h = hashlib.sha1(extra.encode())
    for p in (case.t2, case.t1, case.label, case.cord):
        if p is not None:
            st = Path(p).stat()
            h.update(f"{Path(p).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def stage1_target(t2_working: np.ndarray, label_working: np.ndarray, localiser_net: torch.nn.Module | None, dilate_mm: float = DILATE_MM) -> np.ndarray:
    """Cord-region target on the working grid: the localiser's prediction united with the whole
    tumour dilated by ``dilate_mm`` (see the module docstring)."""
    target = np.zeros(t2_working.shape, bool)
    if localiser_net is not None:
        target |= Cascade(localiser_net, None).localise(t2_working) > 0
    wt = label_working > 0
    if wt.any():
        radius = np.maximum(1, np.round(dilate_mm / np.asarray(WORKING_SPACING)).astype(int))
        zz = np.ogrid[tuple(slice(-r, r + 1) for r in radius)]
        ball = sum((z / r) ** 2 for z, r in zip(zz, radius)) <= 1.0
        target |= ndimage.binary_dilation(wt, ball)
    return target.astype(np.uint8)


def prepare_labelled(case: LabelledCase, cache_dir: str | Path, localiser_net: torch.nn.Module | None = None, localiser_id: str = "") -> Path:
    """Working-grid arrays of one annotated case, with the keys of
    :func:`imsct.training.prepare_case` (t2, t1, label, cord, affine), cached under a name that
    changes when any input file (or the localiser giving the stage-1 target) changes."""
    out = Path(cache_dir) / f"{case.name}-{_case_key(case, '' if case.cord else localiser_id)}.npz"
    if out.exists():
        return out
    t2 = load_image(case.t2, "T2w")
    t1 = load_image(case.t1, "T1w")
    lab = load_volume(case.label, "label map")
    if lab.shape != t2.shape:
        raise InputError(f"label map {case.label}: shape {lab.shape} differs from the T2w {case.t2} {t2.shape}")
    values = np.unique(lab.data)
    if not np.all(np.isin(values, [0, 1, 2, 3])):
        raise InputError(f"label map {case.label}: values {values[:8].tolist()} are not all in 0..3 (tumour 1, edema 2, cavity 3)")
    if case.cord is not None:
        cord = load_volume(case.cord, "cord mask").data > 0.5
    else:
        def cord(t2w, label_w):
            return stage1_target(t2w, label_w, localiser_net)
    return write_working_arrays(out, t2, t1, lab.data, cord)


# ---- anti-forgetting ------------------------------------------------------------------------------


def _file_id(path: Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()[:16]


def fisher_information(net: torch.nn.Module, files: list[Path], stage: int, patch, samples: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher information (Kirkpatrick et al. 2017) of ``net`` on ``samples``
    training patches of ``files``: the mean squared gradient of the voxel-wise Bernoulli
    log-likelihood (binary cross-entropy of the sigmoid outputs) at the annotated labels. Normalised
    to mean 1 over all parameters, so that ``ewc_lambda`` does not depend on the loss scale."""
    torch.manual_seed(seed)
    ds = PatchDataset(files, stage, patch, samples=samples, augment_prob=0.0)
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    net.eval()  # dropout off: the Fisher of the deterministic network
    for i in range(samples):
        item = ds[i]
        net.zero_grad()
        logits = net(item["image"][None])
        torch.nn.functional.binary_cross_entropy_with_logits(logits, item["label"][None]).backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.detach() ** 2 / samples
    net.zero_grad()
    mean = torch.cat([f.flatten() for f in fisher.values()]).mean().clamp_min(1e-20)
    return {n: f / mean for n, f in fisher.items()}


def ewc_penalty(net: torch.nn.Module, fisher: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    """``mean_i F_i (theta_i - theta*_i)^2`` over all parameters (multiplied by ``ewc_lambda / 2``
    in the loss)."""
    total, count = torch.zeros(()), 0
    for n, p in net.named_parameters():
        if n in fisher:
            total = total + (fisher[n] * (p - anchor[n]) ** 2).sum()
            count += p.numel()
    return total / max(count, 1)


def _ewc_state(net, model_file: Path, replay_files: list[Path], state_dir: Path, stage: int, patch, seed: int, log) -> tuple[dict, dict] | None:
    """Fisher and anchor for the published weights, cached in ``state_dir/ewc-stage<k>.pt`` and
    recomputed when the published file or the reservoir changes."""
    if not replay_files:
        return None
    key = _file_id(model_file) + "-" + hashlib.sha1("|".join(sorted(p.name for p in replay_files)).encode()).hexdigest()[:8]
    path = state_dir / f"ewc-stage{stage}.pt"
    if path.exists():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - an unreadable cache is recomputed
            log(f"EWC cache {path} unreadable ({type(exc).__name__}): recomputed")
            saved = {}
        if saved.get("key") == key:
            return saved["fisher"], saved["anchor"]
    t0 = time.perf_counter()
    fisher = fisher_information(net, replay_files, stage, patch, samples=min(16, max(4, 2 * len(replay_files))), seed=seed)
    anchor = {n: p.detach().clone() for n, p in net.named_parameters()}
    replace_atomically(path, lambda fh: torch.save({"key": key, "fisher": fisher, "anchor": anchor}, fh))
    log(f"EWC: Fisher information on {len(replay_files)} replay case(s) in {time.perf_counter() - t0:.0f} s")
    return fisher, anchor


# ---- training --------------------------------------------------------------------------------------


def train_candidate(net: torch.nn.Module, fresh: list[Path], replay_files: list[Path], *, stage: int, iterations: int, batch_size: int, patch_size,
                    replay: float, ewc: tuple[dict, dict] | None, ewc_lambda: float, lr: float, seed: int, amp: bool | str = "auto", log=print,
                    validate: Callable[[torch.nn.Module], float | None] | None = None, validations: int = 0,
                    validation: tuple[float | None, float] = (None, 0.0), progress: Callable[[dict], None] | None = None) -> dict:
    """Fine-tune ``net`` in place: Dice loss (as the bundle's train.json) on batches of
    ``batch_size`` patches, ``round(replay * batch_size)`` of them (at least one when ``replay > 0``)
    from ``replay_files``, plus ``ewc_lambda / 2`` times the EWC penalty. Adam with cosine decay.

    Progress: every tenth of the round (every iteration in rounds under 10), one line to ``log``
    and one dict to ``progress``: iteration, mean Dice loss of the last 10 iterations, EWC
    penalty, the latest validation number (``validate(net)``: measured ``validations`` times
    during the round, evenly spaced, never at its last iteration, which the gate evaluates;
    ``validation`` = (value, seconds) of the evaluation before training), seconds so far and an
    estimate of the seconds left (iterations at the rate so far, plus the evaluations still to
    come, the gate's included, at the duration of the last one)."""
    from monai.losses import DiceLoss

    torch.manual_seed(seed)
    amp = use_bf16(amp, "cpu")
    patch = tuple(int(p) for p in patch_size)
    n_rep = 0
    if replay_files and replay > 0:
        n_rep = min(batch_size - (1 if fresh else 0), max(1, int(round(replay * batch_size))))
    fresh_ds = PatchDataset(fresh or replay_files, stage, patch, samples=10**9)
    rep_ds = PatchDataset(replay_files, stage, patch, samples=10**9) if n_rep else None
    loss_fn = DiceLoss(sigmoid=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, iterations))
    net.train()
    hist = {"loss": [], "ewc": []}
    retried = skipped = 0
    params = list(net.parameters())

    def forward_backward(x, y, low_precision: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low_precision):
            logits = net(x)
        loss = loss_fn(logits.float(), y)
        pen = ewc_penalty(net, *ewc) if ewc is not None and ewc_lambda > 0 else torch.zeros(())
        opt.zero_grad()
        (loss + 0.5 * ewc_lambda * pen).backward()
        return loss, pen

    block = max(1, iterations // 10)
    every = max(1, iterations // (validations + 1)) if validate is not None and validations > 0 else 0
    val_at = {k * every for k in range(1, validations + 1) if k * every < iterations} if every else set()
    val_value, val_seconds = validation
    val_iteration = 0  # the validation number shown was measured after this many iterations (0: before training)
    train_seconds = 0.0
    t0 = time.perf_counter()
    for it in range(iterations):
        t_it = time.perf_counter()
        items = [fresh_ds[0] for _ in range(batch_size - n_rep)] + [rep_ds[0] for _ in range(n_rep)]
        x = torch.stack([i["image"] for i in items])
        y = torch.stack([i["label"] for i in items])
        loss, pen = forward_backward(x, y, amp)
        finite = gradients_finite(params)
        if amp and not finite:  # see training.NonFiniteGradientGuard
            loss, pen = forward_backward(x, y, False)
            retried += 1
            finite = gradients_finite(params)
        if not finite:
            drop_gradients(params)
            skipped += 1
            log(f"  iteration {it + 1}/{iterations}: non-finite gradient, step skipped")
        opt.step()
        sched.step()
        hist["loss"].append(float(loss.detach()))
        hist["ewc"].append(float(pen.detach()))
        train_seconds += time.perf_counter() - t_it
        done = it + 1
        if done in val_at:
            t_val = time.perf_counter()
            net.eval()
            with torch.no_grad():
                val_value = validate(net)
            net.train()
            val_seconds, val_iteration = time.perf_counter() - t_val, done
        if done % block == 0 or done == iterations or done in val_at:
            left_evals = sum(1 for v in val_at if v > done) + 1  # the gate evaluates the candidate once more
            eta = train_seconds / done * (iterations - done) + left_evals * val_seconds
            info = {"iteration": done, "iterations": iterations, "loss": round(float(np.mean(hist["loss"][-10:])), 4),
                    "ewc_penalty": hist["ewc"][-1], "validation": None if val_value is None else round(float(val_value), 4),
                    "validation_at_iteration": val_iteration, "elapsed_s": round(time.perf_counter() - t0, 1), "eta_s": round(eta, 1)}
            shown = "n/a (no validation case)" if val_value is None else f"{val_value:.4f}"
            when = "before training" if val_iteration == 0 else f"at iteration {val_iteration}"
            log(f"  iteration {done}/{iterations}: Dice loss {info['loss']:.4f}, EWC penalty {info['ewc_penalty']:.3g}, "
                f"validation {VALIDATION_NAMES[stage]} {shown} ({when}); {info['elapsed_s']:.0f} s, about {eta:.0f} s left")
            if progress is not None:
                progress(info)
    net.eval()
    return {"iterations": iterations, "replay_per_batch": n_rep, "final_loss": float(np.mean(hist["loss"][-10:])) if hist["loss"] else None,
            "final_ewc_penalty": hist["ewc"][-1] if hist["ewc"] else None, "steps_redone_in_float32": retried, "skipped_steps": skipped, "train_seconds": round(time.perf_counter() - t0, 1)}


# ---- evaluation and gate ----------------------------------------------------------------------------


def evaluate_case(net: torch.nn.Module, npz: Path, stage: int) -> dict:
    """Validation metrics of one cached case. Stage 2: sliding-window inference (test-time
    settings) in the case's stage-2 region, label map post-processed as at test time (on the
    working grid), Dice per class and whole tumour. Stage 1: the localiser's cord region, its Dice
    with the target and the share of lesion voxels inside the box the cascade would crop."""
    d = np.load(npz)
    if stage == 1:
        cord = Cascade(net, None).localise(d["t2"])
        box = cord_box(cord > 0, d["t2"].shape)
        wt = d["label"] > 0
        cov = box_coverage(wt, *box) if box is not None else (1.0 if not wt.any() else 0.0)
        return {"lesion_in_box": cov, "stage1_dice": dice(cord > 0, d["cord"] > 0)}
    sl = stage2_region(d)
    probs = Cascade(None, net).segment_crop(np.stack([d["t2"][sl], d["t1"][sl]]))
    lab = labelmap_from_probabilities(probs)
    lab = postprocess_labelmap(lab, float(np.prod(WORKING_SPACING)), MIN_VOLUME_CM3)
    pm, tm = split_masks(lab), split_masks(d["label"][sl])
    return {f"{k}_dice": dice(pm[k], tm[k]) for k in CLASSES} | {f"{k}_present": bool(tm[k].any()) for k in CLASSES}


def _cached_evaluation(net, model_file: Path, npz: Path, stage: int, cache_dir: Path) -> dict:
    """:func:`evaluate_case`, memoised per (weights file content, case) in ``cache_dir/evaluations.json``."""
    key = f"{_file_id(model_file)}:{npz.name}:{stage}"
    path = cache_dir / "evaluations.json"
    doc = _read_json(path, {})
    if key not in doc:
        doc = {**_read_json(path, {}), key: evaluate_case(net, npz, stage)}
        _write_json(path, doc)
    return doc[key]


def summarise(rows: dict[str, dict], split: dict, stage: int) -> dict:
    """Mean metrics per centre (Dice of a class over the cases that have it, as in Table 4)."""
    out: dict = {}
    for centre in sorted({split[n]["centre"] for n in rows}):
        mine = [r for n, r in rows.items() if split[n]["centre"] == centre]
        if stage == 1:
            out[centre] = {"lesion_in_box": float(np.mean([r["lesion_in_box"] for r in mine])),
                           "stage1_dice": float(np.mean([r["stage1_dice"] for r in mine])), "cases": len(mine)}
            continue
        c = {"cases": len(mine)}
        for k in CLASSES:
            vals = [r[f"{k}_dice"] for r in mine if r[f"{k}_present"]]
            c[f"{k}_dice"] = float(np.mean(vals)) if vals else None
        out[centre] = c
    return out


def gate_metric(summary: dict, centres: list[str], stage: int) -> float | None:
    """The gated number: mean over ``centres`` of whole-tumour Dice (stage 2) or of the share of
    lesion voxels in the box (stage 1), each centre weighted equally."""
    key = "lesion_in_box" if stage == 1 else "whole-tumor_dice"
    vals = [summary[c][key] for c in centres if c in summary and summary[c].get(key) is not None]
    return float(np.mean(vals)) if vals else None


def publish(candidate: Path, target: Path) -> None:
    """Publish gated weights: ``candidate`` copied over the served ``target`` atomically."""
    copy_atomically(candidate, target)


def _remove_leftovers(models_dir: Path, state_dir: Path) -> None:
    """Temporary files of a round that was killed before it renamed them (the round holds the
    state folder's lock, so none of them is being written now)."""
    for m in MODELS.values():
        for p in models_dir.glob(f".{m.filename}.*.tmp"):
            p.unlink(missing_ok=True)
    for p in [*state_dir.glob(".*.json.*.tmp"), *state_dir.glob(".ewc-stage*.pt.*.tmp")]:
        p.unlink(missing_ok=True)


# ---- one round ---------------------------------------------------------------------------------------


def _network(stage: int) -> torch.nn.Module:
    return build(stage_model(stage).key)


def retrain_round(cases: list[LabelledCase], models_dir: str | Path, state_dir: str | Path, *, stage: int = 2, iterations: int, batch_size: int,
                  patch_size, replay: float = 0.5, replay_cases: int = 32, ewc_lambda: float = 1e4, tolerance: float = 0.02, seed: int = 0,
                  lr: float = 1e-4, val_fraction: float = 0.2, cache_dir: str | Path | None = None, amp: bool | str = "auto",
                  force_publish: bool = False, log: Callable[[str], None] = print, validations: int = 0,
                  progress: Callable[[dict], None] | None = None) -> RoundResult:
    """One continual-learning round (see the module docstring). ``force_publish`` skips the gate
    (recorded as such); it exists for experiments, not for the app. ``validations``: how many
    times the validation number is measured during training (besides before, and after for the
    gate); ``log`` gets the progress lines and ``progress`` the same as dicts (:func:`train_candidate`)."""
    t_start = time.perf_counter()
    models_dir, state_dir = Path(models_dir), Path(state_dir)
    cache_dir = Path(cache_dir) if cache_dir else state_dir / "cache"
    model_file = stage_model(stage).path(models_dir)
    if not model_file.exists():
        raise InputError(f"model folder {models_dir}: {model_file.name} not found (the round fine-tunes the published model)")
    with _locked(state_dir):
        _remove_leftovers(models_dir, state_dir)
        rounds = _read_json(state_dir / "rounds.json", [])
        split_before = load_split(state_dir)
        # centres known before this round; cases a killed attempt of this same round already put
        # into the split (round == len(rounds)) do not count, so a retry gates like the first try
        earlier = sorted({v["centre"] for v in split_before.values() if v.get("round", -1) < len(rounds)})
        split = update_split(state_dir, cases, val_fraction, len(rounds))
        res = _read_json(state_dir / "reservoir.json", {"learnt": [], "reservoir": {}, "seen": {}})
        by_name = {c.name: c for c in cases}

        loc_file = stage_model(1).path(models_dir)
        loc_net = load_weights(_network(1), loc_file) if loc_file.exists() else None
        loc_id = _file_id(loc_file) if loc_file.exists() else "none"
        t0 = time.perf_counter()
        npz = {c.name: prepare_labelled(c, cache_dir, loc_net, loc_id) for c in cases}
        log(f"round {len(rounds)}: {len(cases)} case(s) on the working grid ({time.perf_counter() - t0:.0f} s)")

        train_names = [c.name for c in cases if split[c.name]["role"] == "train"]
        val_names = sorted(c.name for c in cases if split[c.name]["role"] == "validation")
        fresh = [n for n in train_names if n not in res["learnt"]] or train_names
        reservoir = [n for names in res["reservoir"].values() for n in names if n in npz and n not in fresh]
        if not fresh:
            return _record(state_dir, rounds, stage, False, "no training case (every annotated case so far is held out for validation)",
                           {"split": _split_counts(split)}, t_start, log)
        log(f"round {len(rounds)}: training on {len(fresh)} new case(s) with {len(reservoir)} replay case(s); "
            f"{len(val_names)} validation case(s); earlier centres {earlier or '(none)'}")

        net = load_weights(_network(stage), model_file)
        ewc = _ewc_state(net, model_file, [npz[n] for n in reservoir], state_dir, stage, patch_size, seed, log) if ewc_lambda > 0 else None
        t_val = time.perf_counter()
        before = {n: _cached_evaluation(net, model_file, npz[n], stage, cache_dir) for n in val_names}
        every_centre = sorted({split[n]["centre"] for n in val_names})

        def validate(current: torch.nn.Module) -> float | None:
            rows = {n: evaluate_case(current, npz[n], stage) for n in val_names}
            return gate_metric(summarise(rows, {n: split[n] for n in val_names}, stage), every_centre, stage)

        val_before = gate_metric(summarise(before, {n: split[n] for n in val_names}, stage), every_centre, stage)
        log(f"round {len(rounds)}: validation {VALIDATION_NAMES[stage]} before training "
            f"{'n/a (no validation case)' if val_before is None else f'{val_before:.4f}'}")
        train_info = train_candidate(net, [npz[n] for n in fresh], [npz[n] for n in reservoir], stage=stage, iterations=iterations,
                                     batch_size=batch_size, patch_size=patch_size, replay=replay, ewc=ewc, ewc_lambda=ewc_lambda,
                                     lr=lr, seed=seed, amp=amp, log=log, validate=validate if val_names else None,
                                     validations=validations, validation=(val_before, time.perf_counter() - t_val), progress=progress)
        candidate = state_dir / f"candidate-{model_file.name}"
        save_weights(net, candidate)
        cand_net = load_weights(_network(stage), candidate)  # gate exactly the fp16 file that would be published
        after = {n: _cached_evaluation(cand_net, candidate, npz[n], stage, cache_dir) for n in val_names}

        split_now = {n: split[n] for n in val_names}
        s_before, s_after = summarise(before, split_now, stage), summarise(after, split_now, stage)
        gate_centres = [c for c in earlier if c in s_before] or sorted(s_before)
        m_before, m_after = gate_metric(s_before, gate_centres, stage), gate_metric(s_after, gate_centres, stage)
        name = "lesion share in the stage-1 box" if stage == 1 else "whole-tumour Dice"
        if m_before is None or m_after is None:
            ok, why = True, "no validation case yet: published without a gate"
        else:
            drop = m_before - m_after
            ok = drop <= tolerance + 1e-12
            why = (f"{name} on validation cases of centre(s) {', '.join(gate_centres)}: {m_before:.4f} -> {m_after:.4f} "
                   f"(change {-drop:+.4f}, tolerance -{tolerance:.4f})")
            why = ("published: " if ok else "refused, the published model stays: ") + why
        if force_publish and not ok:
            ok, why = True, "published without the gate (force_publish): " + why
        if ok:
            publish(candidate, model_file)
            _add_to_reservoir(res, [by_name[n] for n in fresh], replay_cases, np.random.default_rng([seed, len(rounds)]))
            _write_json(state_dir / "reservoir.json", res)
        log(f"round {len(rounds)}: {why}")
        metrics = {"before": s_before, "after": s_after, "gate_centres": gate_centres, "gate_before": m_before, "gate_after": m_after,
                   "tolerance": tolerance, "train": train_info, "fresh_cases": fresh, "replay_cases": reservoir,
                   "validation_cases": val_names, "split": _split_counts(split), "ewc_lambda": ewc_lambda if ewc else 0.0,
                   "replay": replay if reservoir else 0.0}
        return _record(state_dir, rounds, stage, ok, why, metrics, t_start, log)


def _split_counts(split: dict) -> dict:
    out: dict = {}
    for v in split.values():
        c = out.setdefault(v["centre"], {"train": 0, "validation": 0})
        c[v["role"]] += 1
    return out


def _record(state_dir: Path, rounds: list, stage: int, published: bool, reason: str, metrics: dict, t_start: float, log) -> RoundResult:
    result = RoundResult(published, reason, metrics, round(time.perf_counter() - t_start, 1))
    rounds.append({"round": len(rounds), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "stage": stage, **asdict(result)})
    _write_json(state_dir / "rounds.json", rounds)
    return result


def train_stats(state_dir: str | Path, stage: int | None = None) -> dict:
    """What ``/info`` shows: the split per centre, the number of rounds, and the last round's
    outcome (published or refused, the reason, the gated numbers before and after); with
    ``stage``, only that stage's rounds (the app's two trainers share one state folder)."""
    state_dir = Path(state_dir)
    rounds = _read_json(state_dir / "rounds.json", [])
    if stage is not None:
        rounds = [r for r in rounds if r.get("stage") == stage]
    out = {"rounds": len(rounds), "published_rounds": sum(r["published"] for r in rounds), "split": _split_counts(load_split(state_dir))}
    if rounds:
        last = rounds[-1]
        m = last.get("metrics", {})
        out["last_round"] = {k: last.get(k) for k in ("round", "time", "stage", "published", "reason", "seconds")}
        out["last_round"].update({k: m.get(k) for k in ("gate_centres", "gate_before", "gate_after", "tolerance")})
        out["last_round"]["validation_after"] = m.get("after")
    return out


__all__ = ["LabelledCase", "RoundResult", "retrain_round", "plan_split", "update_split", "load_split", "init_state", "prepare_labelled", "stage1_target",
           "fisher_information", "ewc_penalty", "train_candidate", "evaluate_case", "publish",
           "train_stats", "DILATE_MM"]
