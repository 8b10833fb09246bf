"""Inference on files: one case (:func:`segment_case`) or a BIDS folder (:class:`BatchRunner`, what
``bundle/configs/inference.json`` runs). Imports nothing from training.

Each case is validated and segmented fully in memory; its five output files are written together
(temporary names, then renamed), so a failing case leaves nothing behind and never touches files
of earlier runs. Failures are reported one line per case, and the run exits non-zero at the end,
after the other cases were written.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cascade import Cascade
from .io import InputError, Volume, WriteError, load_image, save_volumes, strip_nifti_ext, voxel_volume_mm3
from .labels import LABELS, SEG_SUFFIXES, STAGE2_CHANNELS, output_paths, split_masks

log = logging.getLogger("imsct")


def write_outputs(labelmap: np.ndarray, affine: np.ndarray, case_name: str, output_dir: str | Path,
                  probabilities: np.ndarray | None = None, sidecar: dict | None = None,
                  anatomy=None) -> tuple[dict[str, Path], dict[str, float]]:
    """Write the four SCT-named binary masks and the label map together (all or nothing), and with
    ``probabilities`` ((4, ...) on the same grid) the per-class maps ``<name>_prob-<class>``, with
    ``sidecar`` the label map's JSON sidecar (that dict plus the volumes), with ``anatomy`` (a
    :class:`imsct.cascade.Anatomy`) the tight cord, the level map and the disc labels; returns
    the paths written and the volume of each class in cm3."""
    masks = split_masks(labelmap)
    paths = output_paths(case_name, output_dir, probabilities is not None, anatomy is not None)
    items = [(masks[k].astype(np.uint8), affine, paths[k], np.uint8) for k in SEG_SUFFIXES]
    items.append((labelmap, affine, paths["labelmap"], np.uint8))
    if anatomy is not None:
        items += [(anatomy.cord, affine, paths["cord"], np.uint8), (anatomy.levels, affine, paths["levels"], np.uint8),
                  (anatomy.disc_labels, affine, paths["discs"], np.uint8)]
    if probabilities is not None:
        for i, name in enumerate(STAGE2_CHANNELS):
            items.append((probabilities[i].astype(np.float32), affine, paths[f"prob-{name}"], np.float32))
    vox = voxel_volume_mm3(affine)
    volumes = {k: float(m.sum()) * vox / 1000.0 for k, m in masks.items()}
    texts = []
    if sidecar is not None:
        doc = {**sidecar, "volumes_cm3": {k: round(v, 4) for k, v in volumes.items()},
               "outputs": {k: p.name for k, p in paths.items() if k != "sidecar"}}
        texts.append((json.dumps(doc, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)), paths["sidecar"]))
    else:
        paths.pop("sidecar")
    save_volumes(items, texts)
    return paths, volumes


def provenance(cascade: Cascade, inputs: dict[str, str | Path | None], **extra) -> dict:
    """The sidecar of a case's outputs: tool and version, models with checksums, options, inputs,
    date; ``extra`` adds e.g. the command line and the timings."""
    from . import __version__

    return {"GeneratedBy": {"Name": "imsct", "Version": __version__}, **cascade.settings(),
            "inputs": {k: str(Path(v).resolve()) for k, v in inputs.items() if v is not None},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **extra}


def segment_case(cascade: Cascade, t2_path: str | Path, t1_path: str | Path | None, output_dir: str | Path, name: str | None = None,
                 probabilities: bool = False, register_t1: bool = False, extra: dict | None = None,
                 disc_label: tuple[np.ndarray, int] | None = None) -> dict:
    """Segment one T2w + T1w pair and write the SCT-named masks and the label map on the T2w grid.

    ``t1_path`` may be None (or is ignored) when the cascade is T2w-only; ``probabilities`` also
    writes the per-class probability maps; ``register_t1`` first aligns the T1w onto the T2w
    (ITK rigid registration, :func:`imsct.registration.register_t1_to_t2`), for series between which
    the patient moved."""
    t2_path = Path(t2_path)
    t1 = None
    if not cascade.t2_only:
        if t1_path is None:
            raise InputError(f"T2w {t2_path}: no T1w given (use the T2w-only model to segment without it)")
        t1_path = Path(t1_path)
        if not t1_path.exists():
            raise InputError(f"T1w {t1_path}: file not found (expected beside T2w {t2_path})")
    t2 = load_image(t2_path, "T2w")
    if not cascade.t2_only:
        t1 = load_image(t1_path, "T1w")
    return segment_volumes(cascade, t2, t1, output_dir, name or strip_nifti_ext(t2_path.name), probabilities, register_t1,
                           extra=extra, disc_label=disc_label)


def segment_volumes(cascade: Cascade, t2: Volume, t1: Volume | None, output_dir: str | Path, name: str,
                    probabilities: bool = False, register_t1: bool = False, on_stage=None, progress: bool = False,
                    extra: dict | None = None, disc_label: tuple[np.ndarray, int] | None = None) -> dict:
    """:func:`segment_case` on images already loaded (and checked) by :func:`imsct.io.load_image`;
    ``on_stage``, ``progress`` and ``disc_label`` are passed to the cascade's call; ``extra`` goes
    into the outputs' sidecar (e.g. the command line)."""
    t0 = time.perf_counter()
    registration = None
    if register_t1 and t1 is not None:
        from .registration import register_t1_to_t2

        t1, registration = register_t1_to_t2(t2, t1)
    res = cascade(t2, t1, keep_probabilities=probabilities or None, on_stage=on_stage, progress=progress,
                  disc_label=disc_label)
    seconds = round(time.perf_counter() - t0, 2)
    sidecar = provenance(cascade, {"T2w": t2.path if t2.path != "<memory>" else None,
                                   "T1w": t1.path if t1 is not None and t1.path != "<memory>" else None},
                         seconds=seconds, timings_s={k: round(v, 3) for k, v in res.timings.items()},
                         cord_found=res.cord_found, cord_constraint_applied=res.cord_constraint,
                         cord_constraint_region=res.cord_constraint_region,
                         t1_coverage_of_box=None if res.t1_coverage is None else round(res.t1_coverage, 4),
                         t1_missing=res.t1_missing, t1_registration=registration,
                         levels=res.anatomy.summary if res.anatomy is not None else None, **(extra or {}))
    paths, volumes = write_outputs(res.labelmap, t2.affine, name, output_dir,
                                   res.probabilities if probabilities else None, sidecar=sidecar, anatomy=res.anatomy)
    info = {"outputs": {k: str(p) for k, p in paths.items()}, "volumes_cm3": volumes,
            "seconds": seconds, "cord_found": res.cord_found,
            "cord_constraint": res.cord_constraint, "lesion_found": bool(res.labelmap.any()), "timings": res.timings,
            "t1_missing": res.t1_missing, "levels": res.anatomy.summary if res.anatomy is not None else None}
    if registration is not None:
        info["t1_registration"] = registration
    return info


@dataclass
class BatchRunner:
    """Segment every case of a BIDS folder with a :class:`Cascade` (declared in inference.json) into
    BIDS derivatives, as ``imsct segment --bids`` does (:mod:`imsct.batch`):
    ``<output_dir>/sub-X/[ses-Y/]anat/<T2w name>_seg-*``, ``dataset_description.json`` and the volume
    table ``imsct_volumes.csv``; cases whose outputs are complete and newer than their inputs are
    skipped unless ``overwrite``. Under torchrun each rank takes its share of the cases and rank 0
    writes the dataset files."""

    cascade: Cascade
    dataset_dir: str
    output_dir: str
    exit_on_error: bool = True
    probabilities: bool = False
    register_t1: bool = False
    overwrite: bool = False
    rank: int = 0
    world_size: int = 1
    results: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)

    def run(self) -> dict:
        from . import batch

        try:  # the batch as a whole: dataset folder, output folder (before any case is computed)
            cases, out_root = batch.open_dataset(self.dataset_dir, self.output_dir)
            out_root.mkdir(parents=True, exist_ok=True)
        except (InputError, WriteError) as exc:
            print(f"imsct: error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2 if isinstance(exc, InputError) else 1) from None
        dataset_dir = Path(self.dataset_dir)
        if self.rank == 0:
            batch.dataset_description(out_root, dataset_dir, self.cascade.models)
        mine = cases[self.rank :: self.world_size]  # torchrun: each rank its own share, fixed before any is written
        skipped, todo = batch.sort_cases(mine, dataset_dir, out_root, overwrite=self.overwrite,
                                         probabilities=self.probabilities, report=log.info)
        done = dict(skipped)
        for i, (case, folder) in enumerate(todo, 1):
            r = batch.segment_one(self.cascade, case, folder, self.probabilities, register_t1=self.register_t1)
            done[r.name] = r
            if r.status == "failed":  # this case fails; the others go on
                self.errors[case.name] = r.error
                log.error("[%d/%d] %s", i, len(todo), batch.case_line(r))
                continue
            self.results[case.name] = r
            log.info("[%d/%d] %s", i, len(todo), batch.case_line(r))
            for out in r.outputs:
                log.info("    %s", Path(out).resolve())
        if self.world_size > 1:  # every rank's results, for the table rank 0 writes
            import dataclasses

            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                gathered = [None] * self.world_size
                dist.all_gather_object(gathered, {k: dataclasses.asdict(v) for k, v in done.items()})
                done = {k: batch.CaseResult(**v) for g in gathered for k, v in g.items()}
        if self.rank == 0 and len(done) == len(cases):
            table = batch.write_summary(out_root, [done[c.name] for c in cases])
            log.info("%d case(s): %d written, %d up to date, %d failed; summary %s", len(done),
                     sum(r.status == "written" for r in done.values()), sum(r.status == "skipped" for r in done.values()),
                     sum(r.status == "failed" for r in done.values()), table.resolve())
        if self.errors and self.exit_on_error:
            lines = "\n".join(f"  {k}: {v}" for k, v in self.errors.items())
            print(f"imsct: {len(self.errors)} of {len(mine)} case(s) failed:\n{lines}", file=sys.stderr, flush=True)
            raise SystemExit(1)
        return self.results


__all__ = ["segment_case", "segment_volumes", "BatchRunner", "output_paths", "LABELS"]
