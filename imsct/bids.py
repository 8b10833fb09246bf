"""Finding cases in a BIDS folder (the layout ivadomed and the Spinal Cord Toolbox use)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .io import InputError, strip_nifti_ext
from .labels import CORD_BOX_SUFFIX, CORD_SUFFIX, DISC_LABELS_SUFFIX, DISCS_SUFFIX, SEG_SUFFIXES


@dataclass
class Case:
    """One subject (or session): its T2w, its expected T1w and, when present, its labels."""

    name: str  # T2w file name without extension, e.g. sub-001_T2w
    t2: Path
    t1: Path
    labels: dict[str, Path] = field(default_factory=dict)

    @property
    def subject(self) -> str:
        return self.name.split("_")[0]


def entities(name: str) -> dict[str, str]:
    """BIDS key-value entities of a file name without extension: ``sub-01_ses-2_acq-sag_T2w`` gives
    ``{"sub": "01", "ses": "2", "acq": "sag"}`` (the suffix, here T2w, is left out)."""
    return dict(part.split("-", 1) for part in name.split("_")[:-1] if "-" in part)


def _t1_for(t2: Path) -> Path:
    """The T1w of a T2w: ``<prefix>_T1w`` beside it (``.nii.gz`` or ``.nii``, whichever exists);
    else the one T1w of the folder with the same subject and session that BIDS entities single out:
    a contrast-enhanced one (``ce-``, e.g. ``sub-01_ce-gadolinium_T1w``) before others, then the one
    sharing most of the T2w's other entities (``acq-``, ``run-``, ...). With no T1w, or a tie, the
    expected ``<prefix>_T1w.nii.gz`` is returned, and reading it reports it missing."""
    base = strip_nifti_ext(t2.name)
    prefix = base[: -len("_T2w")]
    expected = [t2.with_name(prefix + "_T1w" + ext) for ext in (t2.name[len(base):], ".nii.gz", ".nii")]
    for p in expected:
        if p.is_file():
            return p
    own = entities(base)
    same_subject = [p for p in sorted(t2.parent.glob("*_T1w.nii*"))
                    if p.name.endswith((".nii", ".nii.gz")) and
                    all(entities(strip_nifti_ext(p.name)).get(k) == own.get(k) for k in ("sub", "ses"))]

    def rank(p: Path) -> tuple[int, int]:
        e = entities(strip_nifti_ext(p.name))
        return ("ce" in e, sum(e.get(k) == v for k, v in own.items() if k not in ("sub", "ses")))

    ranked = sorted(same_subject, key=rank, reverse=True)
    if ranked and (len(ranked) == 1 or rank(ranked[0]) > rank(ranked[1])):
        return ranked[0]
    return expected[0]


def find_cases(dataset_dir: str | Path, derivatives: str = "derivatives/labels") -> list[Case]:
    """Every ``*_T2w.nii[.gz]`` under ``sub-*/[ses-*/]anat`` with its T1w and labels, sorted.

    The T1w is expected beside the T2w as ``<prefix>_T1w.nii.gz``; a missing T1w is reported when
    the case is processed (so other cases still run).
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise InputError(f"dataset folder {root}: not found or not a folder")
    cases = []
    for t2 in sorted(list(root.glob("sub-*/anat/*_T2w.nii*")) + list(root.glob("sub-*/ses-*/anat/*_T2w.nii*"))):
        name = strip_nifti_ext(t2.name)
        rel = t2.parent.relative_to(root)
        labdir = root / derivatives / rel
        labels = {}
        for suffix in list(SEG_SUFFIXES.values()) + [CORD_BOX_SUFFIX, CORD_SUFFIX, DISCS_SUFFIX, DISC_LABELS_SUFFIX]:
            for ext in (".nii.gz", ".nii"):
                p = labdir / f"{name}{suffix}{ext}"
                if p.exists():
                    labels[suffix] = p
                    break
        cases.append(Case(name=name, t2=t2, t1=_t1_for(t2), labels=labels))
    return cases
