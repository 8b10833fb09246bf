"""Shared helpers on phantom cases and images: truth label maps, image comparison, bundle runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from imsct.io import Volume, load_volume, save_volume
from imsct.labels import LABELMAP_SUFFIX, LABELS, SEG_SUFFIXES

from .paths import BUNDLE

OUTPUT_SUFFIXES = [*SEG_SUFFIXES.values(), LABELMAP_SUFFIX]


def truth_labelmap(masks: dict[str, str | Path]) -> Volume:
    """A phantom's truth as one 0..3 label map on the T2w grid (what an annotator saves), from its
    ``{"_seg-tumor": path, "_seg-edema": path, "_seg-cavity": path}`` masks."""
    from imsct.evaluation import masks_labelmap

    ref = load_volume(masks[SEG_SUFFIXES["tumor"]])
    return Volume(masks_labelmap(masks, ref.shape, "phantom"), ref.affine, "labels")


def phantom_masks(phantom_dir: Path, sub: str = "sub-001") -> dict[str, Path]:
    lab_dir = Path(phantom_dir) / "derivatives" / "labels" / sub / "anat"
    return {suffix: lab_dir / f"{sub}_T2w{suffix}.nii.gz" for suffix in SEG_SUFFIXES.values()}


def save_truth_labelmap(masks: dict, out: Path) -> Path:
    lab = truth_labelmap(masks)
    save_volume(lab.data, lab.affine, out)
    return out


def phantom_labelmap(phantom_dir, sub="sub-001") -> Volume:
    """The phantom's truth label map with every class present (a small block of each missing class
    away from the lesion), for converters that must carry all three segments."""
    lm = truth_labelmap(phantom_masks(phantom_dir, sub))
    for name, idx in LABELS.items():
        if not (lm.data == idx).any():
            i = 2 + 3 * idx
            lm.data[i:i + 3, 2:5, 1:3] = idx
    return lm


def canonical(vol: Volume):
    import nibabel as nib

    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(vol.data), vol.affine))
    return np.asarray(img.dataobj), img.affine


def assert_same_image(got: Volume, want: Volume, tol: float):
    gd, ga = canonical(got)
    wd, wa = canonical(want)
    assert gd.shape == wd.shape
    np.testing.assert_allclose(ga, wa, atol=1e-3)
    assert np.abs(gd.astype(np.float64) - wd).max() <= tol


def labelmap_on_image_grid(lm: Volume, image: Volume) -> Volume:
    """A label map reoriented (flips/permutations only) onto the grid the server serves."""
    import nibabel as nib

    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(lm.data), lm.affine))
    ornt = nib.orientations.ornt_transform(nib.io_orientation(img.affine), nib.io_orientation(image.affine))
    out = Volume(nib.orientations.apply_orientation(np.asarray(img.dataobj), ornt).astype(np.uint8), image.affine, "label")
    assert_same_image(out, lm, tol=0)
    return out


def run_bundle(dataset, output, *extra, config: str = "configs/inference.json"):
    """``python -m monai.bundle run`` of the inference config on a BIDS folder."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config,
           "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
           "--dataset_dir", str(dataset), "--output_dir", str(output), *extra]
    return subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=900)


# Phantoms like those the shipped weights were trained on (generator 1: a lesion in every subject,
# the paper's appearance, 2D sagittal, int16). Tests that run the shipped networks and expect them
# to find the lesion use these; drop them when the weights are retrained on the current generator.
LIKE_SHIPPED_TRAINING = {"healthy_fraction": 0.0, "random_intensity_fraction": 0.0, "acquisition": "sagittal", "storage": "int16"}
