import gzip
import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from support.cases import OUTPUT_SUFFIXES, run_bundle
from support.paths import BUNDLE


def copy_case(src_dir, dst_root, sub_src, sub_dst):
    d = dst_root / sub_dst / "anat"
    d.mkdir(parents=True)
    for mod in ("T2w", "T1w"):
        shutil.copy(src_dir / sub_src / "anat" / f"{sub_src}_{mod}.nii.gz", d / f"{sub_dst}_{mod}.nii.gz")
    return d


@pytest.fixture(scope="module")
def bad_run(tiny_phantom_dir, tmp_path_factory):
    """One bundle run over a folder with one good case and one case per kind of bad input (small fields:
    what is checked is the bookkeeping, not the segmentation)."""
    phantom_dir = tiny_phantom_dir
    root = tmp_path_factory.mktemp("mixed")
    ds, out = root / "ds", root / "out"
    copy_case(phantom_dir, ds, "sub-001", "sub-001")
    t2 = nib.load(phantom_dir / "sub-001" / "anat" / "sub-001_T2w.nii.gz")
    data = np.asanyarray(t2.dataobj).astype(np.float32)
    problems = {}

    def case(name, problem):
        d = copy_case(phantom_dir, ds, "sub-002", name)
        problems[name] = problem
        return d / f"{name}_T2w.nii.gz", d / f"{name}_T1w.nii.gz"

    t2p, t1p = case("sub-nt1", "file not found")
    t1p.unlink()
    t2p, _ = case("sub-trunc", "truncated")
    raw = t2p.read_bytes()
    t2p.write_bytes(raw[: len(raw) // 3])
    t2p, _ = case("sub-text", "cannot be read as NIfTI")
    with gzip.open(t2p, "wb") as fh:
        fh.write(b"this is not an image\n" * 50)
    t2p, _ = case("sub-flat", "expected a 3D image, got 2D")
    nib.save(nib.Nifti1Image(data[:, :, 0].copy(), t2.affine), t2p)
    t2p, _ = case("sub-4d", "expected a 3D image, got 4D")
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), t2.affine), t2p)
    t2p, _ = case("sub-nan", "NaN or infinite")
    bad = data.copy()
    bad[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(bad, t2.affine), t2p)
    _, t1p = case("sub-far", "does not overlap")
    t1 = nib.load(t1p)
    far = t1.affine.copy()
    far[:3, 3] += 2000.0
    nib.save(nib.Nifti1Image(np.asanyarray(t1.dataobj), far), t1p)
    # an output of an earlier run for a failing case must survive untouched
    (out / "sub-nan" / "anat").mkdir(parents=True)
    sentinel = out / "sub-nan" / "anat" / "sub-nan_T2w_seg-tumor.nii.gz"
    sentinel.write_bytes(b"earlier result")
    proc = run_bundle(ds, out)
    return proc, ds, out, problems, sentinel


def test_good_case_written_on_t2_grid(bad_run):
    proc, ds, out, _, _ = bad_run
    t2 = nib.load(ds / "sub-001" / "anat" / "sub-001_T2w.nii.gz")
    maps = {}
    for suffix in OUTPUT_SUFFIXES:
        img = nib.load(out / "sub-001" / "anat" / f"sub-001_T2w{suffix}.nii.gz")
        assert img.shape == t2.shape, suffix
        assert np.allclose(img.affine, t2.affine, atol=1e-4), suffix
        maps[suffix] = np.asanyarray(img.dataobj)
    lab = maps["_seg-imsct"]
    assert set(np.unique(lab)) <= {0, 1, 2, 3}
    for value, suffix in ((1, "_seg-tumor"), (2, "_seg-edema"), (3, "_seg-cavity")):
        assert np.array_equal(maps[suffix] > 0, lab == value)
    # the provenance sidecar: version, the models that made the masks (checksums of the files), inputs
    import json

    import imsct
    from imsct import weights

    side = json.loads((out / "sub-001" / "anat" / "sub-001_T2w_seg-imsct.json").read_text())
    assert side["GeneratedBy"] == {"Name": "imsct", "Version": imsct.__version__}
    assert side["models"] == weights.record(weights.cascade_keys(False))  # the anatomy network too
    assert "anatomy.pt" in side["models"] and side["levels"] is not None
    assert side["inputs"]["T2w"] == str((ds / "sub-001" / "anat" / "sub-001_T2w.nii.gz").resolve())
    vox = float(abs(np.linalg.det(t2.affine[:3, :3]))) / 1000.0
    assert side["volumes_cm3"]["tumor"] == pytest.approx((lab == 1).sum() * vox, abs=1e-4)
    assert side["cord_constraint"] is True and 0.0 < side["t1_coverage_of_box"] <= 1.0
    assert np.array_equal(maps["_seg-whole-tumor"] > 0, lab > 0)
    assert "sub-001_T2w: tumor" in proc.stdout  # per-class volumes reported


def test_each_bad_input_named_and_nothing_partial(bad_run):
    proc, _, out, problems, sentinel = bad_run
    assert proc.returncode != 0
    assert f"{len(problems)} of {len(problems) + 1} case(s) failed" in proc.stderr
    for name, problem in problems.items():
        line = next((l for l in proc.stderr.splitlines() if l.strip().startswith(f"{name}_T2w:")), None)
        assert line is not None, name
        assert name in line.split(":", 1)[1] and problem in line, line
        written = [p for p in out.rglob(f"{name}_*") if p != sentinel]
        assert written == [], written
    assert sentinel.read_bytes() == b"earlier result"
    assert not [p for p in out.rglob(".tmp*")]


def test_rerun_skips_complete_cases_into_bids_derivatives(bad_run):
    """Outputs are BIDS derivatives (dataset_description.json naming the version and the models, a
    volume table); a second run skips the case whose outputs are complete and newer than its inputs
    and leaves its files untouched, while the bad cases fail again."""
    import csv

    import imsct

    _, ds, out, problems, _ = bad_run
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Version"] == imsct.__version__
    assert "anatomy.pt sha256" in desc["GeneratedBy"][0]["Description"]
    lab = out / "sub-001" / "anat" / "sub-001_T2w_seg-imsct.nii.gz"
    before = lab.stat().st_mtime_ns
    proc = run_bundle(ds, out)
    assert "sub-001_T2w: up to date, skipped" in proc.stdout + proc.stderr
    assert lab.stat().st_mtime_ns == before
    rows = {r["case"]: r for r in csv.DictReader(open(out / "imsct_volumes.csv"))}
    assert rows["sub-001_T2w"]["status"] == "skipped" and float(rows["sub-001_T2w"]["whole-tumor_cm3"]) >= 0.0
    assert {k for k, r in rows.items() if r["status"] == "failed"} == {f"{n}_T2w" for n in problems}


def test_metadata_has_specification_fields():
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    for key in ("schema", "version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                "required_packages_version", "task", "description", "authors",
                "copyright", "data_source", "data_type", "image_classes", "label_classes", "pred_classes",
                "eval_metrics", "intended_use", "references", "network_data_format", "name"):
        assert key in meta, key
    assert meta["version"] in meta["changelog"]
    for fmt_key in ("network_data_format", "localiser_data_format"):
        fmt = meta[fmt_key]
        for io, name in (("inputs", "image"), ("outputs", "pred")):
            d = fmt[io][name]
            for key in ("type", "format", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data", "channel_def"):
                assert key in d, (fmt_key, io, key)
            assert len(d["channel_def"]) == d["num_channels"]
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 2
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 4
    import monai
    import numpy
    import torch
    assert meta["monai_version"] == monai.__version__
    assert torch.__version__.startswith(meta["pytorch_version"]) and meta["numpy_version"] == numpy.__version__


@pytest.mark.parametrize("net_id,fmt", [("network_def", "network_data_format"), ("localiser_def", "localiser_data_format")])
def test_verify_net_in_out(net_id, fmt):
    from monai.bundle import verify_net_in_out

    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    cwd = os.getcwd()
    os.chdir(BUNDLE)
    try:
        verify_net_in_out(net_id=net_id, meta_file="configs/metadata.json", config_file="configs/inference.json",
                          device="cpu", **{"_meta_#network_data_format": meta[fmt]})
    finally:
        os.chdir(cwd)


def test_verify_net_in_out_as_the_metadata_says():
    """MONAI's own check, run exactly as a user would from the bundle folder (default n=1)."""
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def", "--meta_file",
                           "configs/metadata.json", "--config_file", "configs/inference.json"],
                          cwd=BUNDLE, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_checkpoints_load_on_cpu():
    import torch

    from imsct import weights

    for key in weights.MODELS:
        net = weights.load(key)
        assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in net.parameters())


@pytest.mark.skipif(not os.environ.get("IMSCT_META_SCHEMA"), reason="set IMSCT_META_SCHEMA to a local copy of MONAI's metadata schema (it is downloaded from GitHub otherwise)")
def test_verify_metadata_against_schema():
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(BUNDLE / "configs" / "metadata.json"), filepath=os.environ["IMSCT_META_SCHEMA"])


def test_empty_answer_through_the_bundle(tmp_path):
    """A case with no lesion (every component below a 1000 cm3 minimum) is a success: empty masks
    written, 'no lesion found' logged, exit 0; the cord_constraint key is accepted."""
    from imsct.phantoms import generate_case, write_case
    from support.cases import LIKE_SHIPPED_TRAINING

    write_case(generate_case(9502, 0, max_voxels=200_000, **{**LIKE_SHIPPED_TRAINING, "healthy_fraction": 1.0}), tmp_path / "ds")
    out = tmp_path / "out"
    proc = run_bundle(tmp_path / "ds", out, "--min_volume_cm3", "{'tumor': 1000, 'edema': 1000, 'cavity': 1000}",
                      "--cord_constraint", "False")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no lesion found" in proc.stdout + proc.stderr
    masks = sorted(out.glob("sub-*/anat/*_seg-*.nii.gz"))
    masks = [m for m in masks if "_seg-cord" not in m.name and "_seg-levels" not in m.name]
    assert len(masks) == 5 and all(not np.asarray(nib.load(m).dataobj).any() for m in masks)
