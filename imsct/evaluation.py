"""Evaluation of the cascade on a labelled BIDS folder: every Table-4 metric per case and class,
the stage-1 Dice and the share of lesions inside the stage-1 box; a per-case CSV and a summary
JSON. Used by ``bundle/configs/evaluate.json`` and the scripts.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .bids import Case, find_cases
from .cascade import Cascade
from .geometry import to_working
from .io import InputError, load_image, load_volume, write_text_atomically
from .labels import CORD_BOX_SUFFIX, LABELS, SEG_SUFFIXES
from .metrics import box_counts, case_metrics, dice
from .inference import write_outputs

log = logging.getLogger("imsct")
CLASSES = tuple(SEG_SUFFIXES)  # tumor, edema, cavity, whole-tumor
METRICS = ("dice", "precision", "recall", "rvd", "avd", "tpr_detection", "fpr_detection")


def masks_labelmap(masks: dict, shape, where, stem: str = "") -> np.ndarray:
    """One 0..3 label map from a case's per-class masks ``{suffix: path}`` (derivatives/labels),
    checked to be complete and on a grid of ``shape``; ``where`` and ``stem`` (the file names' start)
    name the case in errors."""
    lab = np.zeros(shape, np.uint8)
    for name, value in LABELS.items():
        if SEG_SUFFIXES[name] not in masks:
            raise InputError(f"{where}: missing label file {stem}{SEG_SUFFIXES[name]}.nii.gz")
        m = load_volume(masks[SEG_SUFFIXES[name]], f"{name} label").data > 0.5
        if m.shape != tuple(shape):
            raise InputError(f"{masks[SEG_SUFFIXES[name]]}: label shape {m.shape} differs from the T2w {tuple(shape)}")
        lab[m] = value
    return lab


def truth_labelmap(case: Case, shape) -> np.ndarray:
    return masks_labelmap(case.labels, shape, case.t2, case.name)


def evaluate_case(cascade: Cascade, case: Case) -> tuple[dict, object]:
    """Run the cascade on one labelled case; returns the metric row and the cascade result."""
    t2, t1 = load_image(case.t2, "T2w"), load_image(case.t1, "T1w")
    truth = truth_labelmap(case, t2.shape)
    t0 = time.perf_counter()
    res = cascade(t2, t1)
    row: dict = {"case": case.name, "seconds": round(time.perf_counter() - t0, 3)}
    row.update(case_metrics(res.labelmap, truth, t2.voxel_volume_mm3))
    wt_w = to_working((truth > 0).astype(np.uint8), t2.affine, res.working_shape, res.working_affine, label=True) > 0
    lo, hi = res.box_working
    inside, total = box_counts(wt_w, lo, hi)
    row["box_lesion_coverage"] = inside / total if total else 1.0
    row["box_lesion_voxels_in"], row["box_lesion_voxels"] = inside, total
    if CORD_BOX_SUFFIX in case.labels:
        sc = load_volume(case.labels[CORD_BOX_SUFFIX], "cord mask").data > 0.5
        sc_w = to_working(sc.astype(np.uint8), t2.affine, res.working_shape, res.working_affine, label=True) > 0
        row["stage1_dice"] = dice(res.cord_working > 0, sc_w)
    else:
        row["stage1_dice"] = math.nan
    return row, res


def _mean_std(values) -> tuple[float | None, float | None, int]:
    v = np.asarray([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], float)
    if v.size == 0:
        return None, None, 0
    return float(v.mean()), float(v.std()), int(v.size)


def summarise(rows: list[dict]) -> dict:
    """Mean and standard deviation over cases of each metric. Dice, precision, recall and volume
    differences of a class are averaged over the cases whose truth has that class (as in Table 4);
    detection rates over the cases where they are defined."""
    out: dict = {"cases": len(rows)}
    for name in CLASSES:
        present = [r for r in rows if r[f"{name}_n_true"] > 0]
        for metric in METRICS:
            src = rows if metric.endswith("detection") else present
            m, s, n = _mean_std(r[f"{name}_{metric}"] for r in src)
            out[f"{name}_{metric}_mean"], out[f"{name}_{metric}_std"], out[f"{name}_{metric}_n"] = m, s, n
    out["stage1_dice_mean"], out["stage1_dice_std"], _ = _mean_std(r["stage1_dice"] for r in rows)
    # subjects without any lesion in the truth: how often the cascade finds none, and what it invents
    healthy = [r for r in rows if r["whole-tumor_n_true"] == 0]
    out["healthy_cases"] = len(healthy)
    out["healthy_no_lesion_fraction"] = float(np.mean([r["whole-tumor_n_pred"] == 0 for r in healthy])) if healthy else None
    out["healthy_fp_whole_cm3_mean"], out["healthy_fp_whole_cm3_std"], _ = _mean_std(
        r["whole-tumor_vol_pred_mm3"] / 1000.0 for r in healthy)
    vin = sum(r["box_lesion_voxels_in"] for r in rows)
    vall = sum(r["box_lesion_voxels"] for r in rows)
    out["lesion_voxels_in_box"] = vin / vall if vall else 1.0
    out["subjects_lesions_fully_in_box"] = float(np.mean([r["box_lesion_coverage"] >= 1.0 for r in rows])) if rows else None
    out["seconds_per_case_mean"], _, _ = _mean_std(r["seconds"] for r in rows)
    return out


def write_report(rows: list[dict], summary: dict, output_dir: str | Path, errors: dict | None = None) -> tuple[Path, Path]:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / "metrics.csv", out / "summary.json"
    keys = list(rows[0]) if rows else ["case"]
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    write_text_atomically(csv_path, table.getvalue())
    doc = {"summary": summary, "errors": errors or {}}
    write_text_atomically(json_path, json.dumps(doc, indent=1, default=lambda o: None))
    return csv_path, json_path


@dataclass
class CohortEvaluator:
    """Evaluate every labelled case of a BIDS folder (declared in evaluate.json).

    With ``rank``/``world_size`` set (torchrun), each rank evaluates ``cases[rank::world_size]`` and
    rank 0 gathers the rows and writes the report.
    """

    cascade: Cascade
    dataset_dir: str
    output_dir: str
    rank: int = 0
    world_size: int = 1
    write_predictions: bool = True
    rows: list = field(default_factory=list)
    errors: dict = field(default_factory=dict)

    def run(self) -> dict | None:
        cases = [c for c in find_cases(self.dataset_dir) if c.labels]
        if not cases:
            raise InputError(f"dataset folder {self.dataset_dir}: no labelled case (derivatives/labels) found")
        mine = cases[self.rank :: self.world_size]
        for i, case in enumerate(mine, 1):
            try:
                row, res = evaluate_case(self.cascade, case)
                if self.write_predictions:
                    write_outputs(res.labelmap, res.affine, case.name, Path(self.output_dir) / "predictions")
            except InputError as exc:
                self.errors[case.name] = str(exc)
                log.error("[rank %d] %s: FAILED: %s", self.rank, case.name, exc)
                continue
            self.rows.append(row)
            log.info("[rank %d, %d/%d] %s: whole tumour Dice %.3f, tumour %.3f, edema %.3f, cavity %.3f, stage 1 %.3f",
                     self.rank, i, len(mine), case.name, row["whole-tumor_dice"], row["tumor_dice"],
                     row["edema_dice"], row["cavity_dice"], row["stage1_dice"])
        rows, errors = self.rows, self.errors
        if self.world_size > 1:
            import torch.distributed as dist

            gathered: list = [None] * self.world_size
            dist.all_gather_object(gathered, (rows, errors))
            rows = sorted((r for g in gathered for r in g[0]), key=lambda r: r["case"])
            errors = {k: v for g in gathered for k, v in g[1].items()}
        if self.rank != 0:
            return None
        summary = summarise(rows)
        csv_path, json_path = write_report(rows, summary, self.output_dir, errors)
        log.info("metrics per case: %s; summary: %s", csv_path, json_path)
        for name in CLASSES:
            m = summary[f"{name}_dice_mean"]
            log.info("%s Dice %s over %d cases", name, "n/a" if m is None else f"{m:.3f}", summary[f"{name}_dice_n"])
        return summary
