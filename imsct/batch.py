"""A BIDS folder in, BIDS derivatives out: ``imsct segment --bids DIR``.

Every case of :func:`imsct.bids.find_cases` is segmented into
``<out>/sub-X/[ses-Y/]anat/<T2w name>_seg-*.nii.gz`` with its provenance sidecar
(``_seg-imsct.json``); ``<out>`` (default ``DIR/derivatives/imsct``) gets a
``dataset_description.json`` whose ``GeneratedBy`` names the version and the models with their
checksums, and ``imsct_volumes.csv``, one row per case and class. Cases whose outputs are complete
and newer than their inputs are skipped unless ``overwrite``; ``jobs`` processes segment cases in
parallel (each with its share of the CPU threads). A failing case is reported and the others go on.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .bids import Case, find_cases
from .io import InputError, WriteError, check_writable_folder, write_text_atomically
from .labels import SEG_SUFFIXES, output_paths

log = logging.getLogger("imsct")
SUMMARY = "imsct_volumes.csv"


@dataclass
class CaseResult:
    name: str
    status: str  # written, skipped (up to date), failed
    volumes_cm3: dict = field(default_factory=dict)
    seconds: float | None = None
    error: str = ""
    outputs: list = field(default_factory=list)  # the files written (paths as text)


def derivative_folder(case: Case, dataset_dir: Path, out_root: Path) -> Path:
    """``<out_root>/sub-X/[ses-Y/]anat``: the case's folder relative to the dataset, as BIDS derivatives."""
    return out_root / case.t2.parent.relative_to(dataset_dir)


def up_to_date(case: Case, folder: Path, probabilities: bool) -> dict | None:
    """The sidecar of a case whose outputs are all there and newer than its inputs, else None."""
    paths = output_paths(case.name, folder, probabilities)
    sidecar = paths["sidecar"]
    if sidecar.is_file():  # the outputs the last run wrote (the cord and levels too, when it had them)
        try:
            paths.update({k: folder / Path(v).name for k, v in json.loads(sidecar.read_text()).get("outputs", {}).items()})
        except (OSError, ValueError, AttributeError):
            return None
    if not all(p.is_file() for p in paths.values()):
        return None
    inputs = [p for p in (case.t2, case.t1) if p.is_file()]
    if min(p.stat().st_mtime for p in paths.values()) < max(p.stat().st_mtime for p in inputs):
        return None
    try:
        return json.loads(paths["sidecar"].read_text())
    except (OSError, ValueError):
        return None


# ---- the worker side: one cascade per process, built once ------------------------------------------

_CASCADE = {}


def _start_worker(cascade_kw: dict, threads: int) -> None:
    import torch

    from .cascade import Cascade

    torch.set_num_threads(max(1, threads))
    _CASCADE["c"] = Cascade.from_models(**cascade_kw)


def segment_one(cascade, case: Case, folder: Path, probabilities: bool = False, extra: dict | None = None,
                register_t1: bool = False) -> CaseResult:
    """One case into its derivatives folder: written, or failed with the reason (input or write)."""
    from .inference import segment_case

    try:
        info = segment_case(cascade, case.t2, case.t1, folder, case.name, probabilities=probabilities,
                            register_t1=register_t1, extra=extra)
    except (InputError, WriteError) as exc:
        return CaseResult(case.name, "failed", error=str(exc))
    return CaseResult(case.name, "written", info["volumes_cm3"], info["seconds"], outputs=list(info["outputs"].values()))


def _segment(case: Case, folder: Path, probabilities: bool, extra: dict) -> CaseResult:
    return segment_one(_CASCADE["c"], case, folder, probabilities, extra)


def dataset_description(out_root: Path, dataset_dir: Path, models: dict) -> Path:
    from . import __version__

    doc = {"Name": "IMSCT segmentations (tumour, edema, cavity)", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
           "GeneratedBy": [{"Name": "imsct", "Version": __version__,
                            "Description": "models: " + ", ".join(f"{f} sha256 {m['sha256']}" for f, m in models.items())}],
           "SourceDatasets": [{"URL": Path(dataset_dir).resolve().as_uri()}]}
    path = out_root / "dataset_description.json"
    write_text_atomically(path, json.dumps(doc, indent=1))
    return path


def write_summary(out_root: Path, results: list[CaseResult]) -> Path:
    table = io.StringIO(newline="")
    w = csv.writer(table)
    w.writerow(["case", "status", *[f"{k}_cm3" for k in SEG_SUFFIXES], "seconds", "error"])
    for r in results:
        w.writerow([r.name, r.status, *[("" if k not in r.volumes_cm3 else f"{r.volumes_cm3[k]:.4f}") for k in SEG_SUFFIXES],
                    "" if r.seconds is None else f"{r.seconds:.2f}", r.error])
    path = out_root / SUMMARY
    write_text_atomically(path, table.getvalue())
    return path


def open_dataset(dataset_dir: str | Path, out_root: str | Path | None) -> tuple[list[Case], Path]:
    """The cases of a BIDS folder and the derivatives root (default ``DIR/derivatives/imsct``),
    checked writable; an InputError names the folder when it holds no case."""
    dataset_dir = Path(dataset_dir)
    cases = find_cases(dataset_dir)
    if not cases:
        raise InputError(f"dataset folder {dataset_dir}: no sub-*/[ses-*/]anat/*_T2w.nii[.gz] found")
    return cases, check_writable_folder(Path(out_root) if out_root else dataset_dir / "derivatives" / "imsct")


def sort_cases(cases: list[Case], dataset_dir: Path, out_root: Path, *, overwrite: bool, probabilities: bool,
               report=print) -> tuple[dict[str, CaseResult], list[tuple[Case, Path]]]:
    """``(skipped, todo)``: the cases whose outputs are up to date (unless ``overwrite``), as results,
    and the others with their derivatives folder."""
    skipped, todo = {}, []
    for case in cases:
        folder = derivative_folder(case, Path(dataset_dir), out_root)
        done = None if overwrite else up_to_date(case, folder, probabilities)
        if done is not None:
            skipped[case.name] = CaseResult(case.name, "skipped", done.get("volumes_cm3", {}), done.get("seconds"))
            report(f"{case.name}: up to date, skipped (--overwrite to redo)")
        else:
            todo.append((case, folder))
    return skipped, todo


def case_line(r: CaseResult) -> str:
    if r.status == "failed":
        return f"{r.name}: FAILED: {r.error}"
    found = "" if any(v > 0 for v in r.volumes_cm3.values()) else "no lesion found: "
    vols = ", ".join(f"{k} {v:.2f}" for k, v in r.volumes_cm3.items())
    return f"{r.name}: {found}{vols} cm3 ({r.seconds:.1f} s)"


def segment_dataset(dataset_dir: str | Path, out_root: str | Path | None, cascade_kw: dict, *, jobs: int = 1,
                    overwrite: bool = False, probabilities: bool = False, extra: dict | None = None,
                    report=print) -> list[CaseResult]:
    """Segment every case of a BIDS folder into BIDS derivatives (module docstring); ``cascade_kw``
    are :meth:`Cascade.from_models`'s arguments; ``report(line)`` gets one line per case."""
    from . import weights

    dataset_dir = Path(dataset_dir)
    cases, out_root = open_dataset(dataset_dir, out_root)
    weights.check_present(weights.CASCADE_MODELS[bool(cascade_kw.get("t2_only"))], cascade_kw.get("models_dir"))
    keys = weights.cascade_keys(bool(cascade_kw.get("t2_only")), cascade_kw.get("models_dir"))
    if not cascade_kw.get("with_anatomy", True):
        keys = weights.CASCADE_MODELS[bool(cascade_kw.get("t2_only"))]
    out_root.mkdir(parents=True, exist_ok=True)
    dataset_description(out_root, dataset_dir, weights.record(keys, cascade_kw.get("models_dir")))
    results, todo = sort_cases(cases, dataset_dir, out_root, overwrite=overwrite, probabilities=probabilities,
                               report=report)

    def finished(r: CaseResult) -> None:
        results[r.name] = r
        report(case_line(r))

    extra = dict(extra or {})
    if todo:
        jobs = max(1, min(int(jobs), len(todo)))
        threads = max(1, (os.cpu_count() or 1) // jobs)
        if jobs == 1:
            _start_worker(cascade_kw, threads)
            for case, folder in todo:
                finished(_segment(case, folder, probabilities, extra))
        else:
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked OpenMP/OpenVINO state
            with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_start_worker, initargs=(cascade_kw, threads)) as pool:
                futures = [pool.submit(_segment, case, folder, probabilities, extra) for case, folder in todo]
                for f in futures:
                    finished(f.result())
    ordered = [results[c.name] for c in cases]
    write_summary(out_root, ordered)
    return ordered


__all__ = ["segment_dataset", "segment_one", "open_dataset", "sort_cases", "case_line", "derivative_folder", "up_to_date", "CaseResult", "SUMMARY"]
