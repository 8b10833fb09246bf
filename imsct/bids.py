"""Finding cases in a BIDS folder (the layout ivadomed and the Spinal Cord Toolbox use)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .io import InputError, strip_nifti_ext
from .labels import CORD_BOX_SUFFIX, CORD_SUFFIX, SEG_SUFFIXES


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


def _t1_for(t2: Path) -> Path:
    base = strip_nifti_ext(t2.name)
    ext = t2.name[len(base):]
    return t2.with_name(base[: -len("_T2w")] + "_T1w" + ext)


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
        for suffix in list(SEG_SUFFIXES.values()) + [CORD_BOX_SUFFIX, CORD_SUFFIX]:
            for ext in (".nii.gz", ".nii"):
                p = labdir / f"{name}{suffix}{ext}"
                if p.exists():
                    labels[suffix] = p
                    break
        cases.append(Case(name=name, t2=t2, t1=_t1_for(t2), labels=labels))
    return cases
