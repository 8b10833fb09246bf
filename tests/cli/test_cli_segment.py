"""``imsct segment`` and ``imsct morphometrics`` through the console entry (one shared segmentation)."""

import contextlib
import hashlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from imsct import cli
from imsct import weights
from imsct.commands.segment import parse_remove_small
from imsct.io import InputError, voxel_volume_mm3
from imsct.labels import LABELS, SEG_SUFFIXES

from support.paths import ROOT  # noqa: E402
SCRIPT = Path(sys.executable).parent / "imsct"
IMSCT = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "imsct"]


def imsct(*args, cwd=None):
    return subprocess.run([*IMSCT, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def case(phantom_dir):
    """The phantom subject with the fewest T2w voxels, with its truth files."""
    t2s = sorted(phantom_dir.glob("sub-*/anat/*_T2w.nii.gz"), key=lambda p: np.prod(nib.load(p).shape))
    t2 = t2s[0]
    sub = t2.name.split("_")[0]
    labels = phantom_dir / "derivatives" / "labels" / sub / "anat"
    return {"sub": sub, "t2": t2, "t1": t2.with_name(f"{sub}_T1w.nii.gz"), "labels": labels,
            "levels": labels / f"{sub}_phantom.json"}


SHIFT_MM = 5.0


@pytest.fixture(scope="module")
def segmented(case, tmp_path_factory):
    """One run with every option: the T1w moved 5 mm superior (patient motion) and --register-t1."""
    out = tmp_path_factory.mktemp("segment")
    t1 = nib.load(case["t1"])
    moved = t1.affine.copy()
    moved[2, 3] += SHIFT_MM
    case = {**case, "t1": out.parent / f"{out.name}_moved" / case["t1"].name}
    case["t1"].parent.mkdir()
    nib.save(nib.Nifti1Image(np.asarray(t1.dataobj), moved), case["t1"])
    before = {k: digest(case[k]) for k in ("t2", "t1")}
    argv = ["segment", "--t2", case["t2"], "--t1", case["t1"], "-o", out, "--probabilities", "--morphometrics",
            "--levels", case["levels"], "--register-t1", "--progress"]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):  # in-process: one import of MONAI
        rc = cli.main([str(a) for a in argv])
    proc = subprocess.CompletedProcess(argv, rc, stdout.getvalue(), stderr.getvalue())
    return {"proc": proc, "out": out, "before": before, **case}


def test_progress_bar_follows_the_cascade_stages(segmented):
    """--progress: the stage bar is driven by the cascade's own stage hook and reaches the end."""
    from imsct.commands.segment import STAGES

    err = segmented["proc"].stderr
    positions = [err.find(f"{stage}:") for stage in STAGES]
    assert all(p >= 0 for p in positions), err[-2000:]
    assert positions == sorted(positions)  # each stage announced in order
    assert f"{len(STAGES)}/{len(STAGES)}" in err


def test_help_shows_an_example_per_command():
    top = imsct("--help")
    assert top.returncode == 0
    for name in ("segment", "morphometrics"):
        assert name in top.stdout
        sub = imsct(name, "--help")
        assert sub.returncode == 0
        assert "example:" in sub.stdout and f"imsct {name} -" in sub.stdout


def test_segment_end_to_end(segmented):
    proc, out = segmented["proc"], segmented["out"]
    assert proc.returncode == 0, proc.stderr
    t2 = nib.load(segmented["t2"])
    name = segmented["t2"].name[: -len(".nii.gz")]
    imgs = {}
    for key in [*SEG_SUFFIXES.values(), "_seg-imsct", *(f"_prob-{k}" for k in SEG_SUFFIXES)]:
        p = out / f"{name}{key}.nii.gz"
        assert p.exists(), p
        assert str(p.resolve()) in proc.stdout  # the command prints every output path
        img = nib.load(p)
        assert img.shape == t2.shape
        assert np.allclose(img.affine, t2.affine, atol=1e-4)
        imgs[key] = np.asarray(img.dataobj)
    lab = imgs["_seg-imsct"]
    for cls, value in LABELS.items():
        assert imgs[SEG_SUFFIXES[cls]].dtype == np.uint8
        assert np.array_equal(imgs[SEG_SUFFIXES[cls]] > 0, lab == value)
    assert np.array_equal(imgs["_seg-whole-tumor"] > 0, lab > 0)
    for cls in SEG_SUFFIXES:
        prob = imgs[f"_prob-{cls}"]
        assert prob.dtype == np.float32 and prob.min() >= 0.0 and prob.max() <= 1.0
    # labelled voxels come from the probabilities: a channel passed the threshold and the class is
    # the most probable one (filled holes, a small minority, take their neighbours' class)
    probs = np.stack([imgs[f"_prob-{k}"] for k in SEG_SUFFIXES])
    if lab.any():
        on = lab > 0
        assert (probs[:, on].max(axis=0) > 0.5).mean() > 0.9
        assert (probs[:3, on].argmax(axis=0) + 1 == lab[on]).mean() > 0.9

    # printed volumes and the morphometrics tables agree with the masks
    vox = voxel_volume_mm3(t2.affine)
    line = next(s for s in proc.stdout.splitlines() if s.startswith("volumes (cm3):"))
    printed = dict(part.rsplit(" ", 1) for part in line.split(":", 1)[1].strip().split(", "))
    morpho = json.loads((out / f"{name}_morphometrics.json").read_text())
    assert (out / f"{name}_morphometrics.csv").exists()
    for cls, suffix in SEG_SUFFIXES.items():
        cm3 = (imgs[suffix] > 0).sum() * vox / 1000
        assert float(printed[cls]) == pytest.approx(cm3, abs=6e-4)
        assert morpho["classes"][cls]["volume_cm3"] == pytest.approx(cm3)
        assert morpho["classes"][cls]["count"] == ndimage.label(imgs[suffix] > 0, np.ones((3, 3, 3)))[1]
        assert morpho["classes"][cls]["levels"] is not None  # --levels was given

    # --register-t1 undid the motion (the printed world translation of the T1w)
    line = next(s for s in proc.stdout.splitlines() if s.startswith("T1w registered onto T2w"))
    shift = [float(v) for v in line.split("translation ", 1)[1].split(" mm", 1)[0].split(", ")]
    assert abs(shift[2] + SHIFT_MM) < 1.5 and abs(shift[0]) < 1.5 and abs(shift[1]) < 1.5, line

    # inputs untouched, nothing temporary left
    assert {k: digest(segmented[k]) for k in ("t2", "t1")} == segmented["before"]
    assert not list(out.glob(".tmp-*"))


def test_morphometrics_command_on_the_segmentation(segmented, tmp_path, capsys):
    name = segmented["t2"].name[: -len(".nii.gz")]
    labelmap = segmented["out"] / f"{name}_seg-imsct.nii.gz"
    rc = cli.main(["morphometrics", "-i", str(labelmap), "-o", str(tmp_path / "m")])
    assert rc == 0
    res = json.loads((tmp_path / "m.json").read_text())
    lab = np.asarray(nib.load(labelmap).dataobj)
    for cls, value in LABELS.items():
        n = ndimage.label(lab == value, np.ones((3, 3, 3)))[1]
        assert res["classes"][cls]["count"] == n
        assert res["classes"][cls]["levels"] is None  # no --levels
    rows = (tmp_path / "m.csv").read_text().splitlines()
    assert len(rows) == 1 + len(res["components"]) + 4
    assert str((tmp_path / "m.csv").resolve()) in capsys.readouterr().out
    # default output: <T2w name>_morphometrics beside the input
    copy = tmp_path / "in" / labelmap.name
    copy.parent.mkdir()
    shutil.copy(labelmap, copy)
    assert cli.main(["morphometrics", "-i", str(copy)]) == 0
    assert (tmp_path / "in" / f"{name}_morphometrics.csv").exists()


def test_morphometrics_command_on_truth_masks(case, tmp_path, capsys):
    lab = case["labels"]
    masks = [lab / f"{case['sub']}_T2w_seg-{k}.nii.gz" for k in ("tumor", "edema", "cavity")]
    rc = cli.main(["morphometrics", "-i", *map(str, masks), "--levels", str(case["levels"]),
                   "--cord", str(lab / f"{case['sub']}_T2w_seg-cord.nii.gz"), "-o", str(tmp_path / "truth")])
    assert rc == 0
    res = json.loads((tmp_path / "truth.json").read_text())
    info = json.loads(case["levels"].read_text())
    assert res["axis"] == "cord-centreline"
    for cls in ("tumor", "edema", "cavity", "whole-tumor"):
        assert res["classes"][cls]["volume_mm3"] == pytest.approx(info["volumes_mm3"][cls], rel=1e-6)
    assert all(les["level"] in res["classes"]["tumor"]["levels"] for les in info["lesions"]
               if any(c["z_range_mm"][0] <= les["z_mm"] <= c["z_range_mm"][1] for c in res["components"]))
    assert "tumor" in capsys.readouterr().out


def test_morphometrics_command_bad_inputs(case, phantom_dir, tmp_path, capsys):
    lab = case["labels"]
    whole = lab / f"{case['sub']}_T2w_seg-whole-tumor.nii.gz"
    assert cli.main(["morphometrics", "-i", str(whole)]) == 2
    assert str(whole) in capsys.readouterr().err
    other = next(p for p in phantom_dir.glob("derivatives/labels/*/anat/*_seg-edema.nii.gz") if case["sub"] not in p.name)
    assert cli.main(["morphometrics", "-i", str(lab / f"{case['sub']}_T2w_seg-tumor.nii.gz"), str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(other) in err and "grid" in err and len(err.splitlines()) == 1
    bad = tmp_path / "bad_seg-imsct.nii.gz"
    img = nib.load(whole)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj).astype(np.uint8) * 7, img.affine), bad)
    assert cli.main(["morphometrics", "-i", str(bad)]) == 2
    assert "bad_seg-imsct" in capsys.readouterr().err
    assert not list(tmp_path.glob("*morphometrics*"))


def test_segment_bad_inputs(case, tmp_path, capsys):
    out = tmp_path / "out"
    # missing T1w: exit 2, one line naming the file and suggesting --t2-only (console entry)
    missing = tmp_path / "nope_T1w.nii.gz"
    proc = imsct("segment", "--t2", case["t2"], "--t1", missing, "-o", out)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err and "--t2-only" in err
    # a T2w that is not NIfTI
    text = tmp_path / "notes_T2w.nii.gz"
    text.write_text("not an image")
    proc = imsct("segment", "--t2", text, "--t1", case["t1"], "-o", out)
    assert proc.returncode == 2
    assert str(text) in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())  # nothing written

    # no T1w at all, bad threshold, bad --remove-small, bad device (in-process, same entry)
    for argv, needle in [
        (["--t2", str(case["t2"])], "--t2-only"),
        (["--t2", str(case["t2"]), "--t1", str(case["t1"]), "--thr", "1.5"], "--thr"),
        (["--t2", str(case["t2"]), "--t1", str(case["t1"]), "--remove-small", "tumour=0.2"], "'tumour'"),
        (["--t2", str(case["t2"]), "--t1", str(case["t1"]), "--device", "quantum"], "--device"),
        (["--t2", str(case["t2"]), "--t1", str(case["t1"]), "--device", "cuda:99"], "--device cuda:99"),
        (["--t2", str(case["t2"]), "--t1", str(case["t1"]), "--models", str(tmp_path)], weights.spec("localiser").filename),
    ]:
        assert cli.main(["segment", *argv, "-o", str(out)]) == 2, argv
        assert needle in capsys.readouterr().err, argv

    # an output name that would overwrite an input: refused, input untouched
    t2 = tmp_path / "in" / "x_T2w.nii.gz"
    t2.parent.mkdir()
    shutil.copy(case["t2"], t2)
    t1 = t2.with_name("x_T2w_seg-tumor.nii.gz")
    shutil.copy(case["t1"], t1)
    before = digest(t1)
    assert cli.main(["segment", "--t2", str(t2), "--t1", str(t1)]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert digest(t1) == before and sorted(p.name for p in t2.parent.iterdir()) == ["x_T2w.nii.gz", "x_T2w_seg-tumor.nii.gz"]


@pytest.mark.skipif(not weights.path("tumor_t2only").exists(), reason="T2w-only weights not shipped")
def test_segment_t2_only(case, tmp_path, capsys):
    rc = cli.main(["segment", "--t2", str(case["t2"]), "--t2-only", "-o", str(tmp_path), "--remove-small", "0"])
    out = capsys.readouterr().out
    assert rc == 0 and "T2w-only model" in out
    t2 = nib.load(case["t2"])
    name = case["t2"].name[: -len(".nii.gz")]
    for suffix in [*SEG_SUFFIXES.values(), "_seg-imsct"]:
        img = nib.load(tmp_path / f"{name}{suffix}.nii.gz")
        assert img.shape == t2.shape and np.allclose(img.affine, t2.affine, atol=1e-4)
    assert not list(tmp_path.glob(f"{name}_prob-*"))  # only with --probabilities


def test_t2_only_needs_its_weights(case, tmp_path, capsys):
    models = tmp_path / "models"
    models.mkdir()
    weights.path("localiser", models).symlink_to(weights.path("localiser"))
    assert cli.main(["segment", "--t2", str(case["t2"]), "--t2-only", "--models", str(models), "-o", str(tmp_path)]) == 2
    assert weights.spec("tumor_t2only").filename in capsys.readouterr().err


def test_parse_remove_small():
    assert parse_remove_small(None) is None
    assert parse_remove_small("0.3") == {k: 0.3 for k in LABELS}
    assert parse_remove_small("tumor=0.1, cavity=0") == {"tumor": 0.1, "cavity": 0.0}
    for bad in ("x", "tumor=", "tumour=0.2", "-1", "edema=nan", "=3", "tumor=0.1,edema"):
        with pytest.raises(InputError, match="--remove-small"):
            parse_remove_small(bad)


def test_default_models_dir_is_the_shipped_bundle():
    assert weights.DEFAULT_MODELS_DIR == ROOT / "bundle" / "models"
    assert all(weights.path(key).exists() for key in weights.MODELS)


def test_empty_answer_is_a_valid_answer(tmp_path):
    """A scan with no lesion (here: every component below a 1000 cm3 minimum, so the answer is empty
    whatever the weights) writes empty masks, says 'no lesion found' with 0.00 cm3 per class and exits 0;
    --no-cord-constraint is accepted; the morphometrics of the empty map count 0 lesions."""
    from imsct.phantoms import generate_case, write_case
    from support.cases import LIKE_SHIPPED_TRAINING

    paths = write_case(generate_case(9501, 0, max_voxels=200_000, **{**LIKE_SHIPPED_TRAINING, "healthy_fraction": 1.0}), tmp_path / "bids")
    out = tmp_path / "seg"
    proc = imsct("segment", "--t2", paths["t2"], "--t2-only", "--remove-small", "1000", "--no-cord-constraint",
                 "--morphometrics", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "no lesion found: tumor 0.00 cm3, edema 0.00 cm3, cavity 0.00 cm3, whole-tumor 0.00 cm3" in proc.stdout
    # the four class masks and the label map are empty (the cord and level map beside them are not lesions)
    masks = sorted(m for m in out.glob("*_seg-*.nii.gz") if not m.name.endswith(("_seg-cord.nii.gz", "_seg-levels.nii.gz")))
    assert len(masks) == 5 and all(not np.asarray(nib.load(m).dataobj).any() for m in masks)
    morpho = json.loads(next(out.glob("*_morphometrics.json")).read_text())
    assert all(c["count"] == 0 and c["volume_mm3"] == 0 for c in morpho["classes"].values())


def test_bids_batch_writes_derivatives_skips_up_to_date_cases_and_goes_on_after_a_failure(tiny_phantom_dir, tmp_path, capsys):
    """``imsct segment --bids``: BIDS-derivatives layout with dataset_description.json, a sidecar per
    case and the volumes table; a second run skips what is up to date, a touched input is redone,
    --overwrite redoes all; a broken case fails alone."""
    import csv
    import json
    import os
    import shutil

    import imsct
    from imsct import weights
    from imsct.cli import main

    ds = tmp_path / "study"
    for sub in ("sub-001", "sub-002"):
        shutil.copytree(tiny_phantom_dir / sub, ds / sub)
    out = ds / "derivatives" / "imsct"
    assert main(["segment", "--bids", str(ds), "--jobs", "2", "--precision", "float32"]) == 0
    text = capsys.readouterr().out
    assert "2 case(s): 2 written, 0 up to date, 0 failed" in text and "start-up included (2 job(s))" in text, text
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Version"] == imsct.__version__
    for f, m in weights.record(weights.CASCADE_MODELS[False]).items():
        assert f"{f} sha256 {m['sha256']}" in desc["GeneratedBy"][0]["Description"]
    rows = {r["case"]: r for r in csv.DictReader(open(out / "imsct_volumes.csv"))}
    assert set(rows) == {"sub-001_T2w", "sub-002_T2w"} and {r["status"] for r in rows.values()} == {"written"}
    for sub in ("sub-001", "sub-002"):
        side = json.loads((out / sub / "anat" / f"{sub}_T2w_seg-imsct.json").read_text())
        assert side["command"].startswith("imsct segment --bids")
        assert float(rows[f"{sub}_T2w"]["tumor_cm3"]) == pytest.approx(side["volumes_cm3"]["tumor"], abs=1e-3)
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")}

    assert main(["segment", "--bids", str(ds), "--precision", "float32"]) == 0
    assert "0 written, 2 up to date" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")} == stamp  # nothing rewritten

    t2 = ds / "sub-002" / "anat" / "sub-002_T2w.nii.gz"
    later = max(stamp.values()) / 1e9 + 10
    os.utime(t2, (later, later))  # the input changed after its outputs: redone
    assert main(["segment", "--bids", str(ds), "--precision", "float32"]) == 0
    assert "1 written, 1 up to date" in capsys.readouterr().out

    t2.write_bytes(b"not an image any more")
    assert main(["segment", "--bids", str(ds), "--precision", "float32", "--overwrite"]) == 1
    captured = capsys.readouterr()
    assert "1 written, 0 up to date, 1 failed" in captured.out
    assert "sub-002_T2w" in captured.err and str(t2) in captured.err and "cannot be read as NIfTI" in captured.err
    rows = {r["case"]: r for r in csv.DictReader(open(out / "imsct_volumes.csv"))}
    assert rows["sub-001_T2w"]["status"] == "written" and rows["sub-002_T2w"]["status"] == "failed"
    assert (out / "sub-002" / "anat" / "sub-002_T2w_seg-imsct.nii.gz").is_file()  # the earlier result is kept


def test_cord_and_levels_from_the_image(segmented):
    """The anatomy network's outputs beside the masks: a tight cord on the T2w grid that overlaps the
    phantom's true cord, a level map that lives on that cord with SCT level numbers, disc labels on
    the cord valued by disc numbers, and how the levels were found in the sidecar and on screen."""
    from imsct.levels import LEVEL_NAMES

    proc, out = segmented["proc"], segmented["out"]
    assert proc.returncode == 0, proc.stderr
    name = segmented["t2"].name[: -len(".nii.gz")]
    t2 = nib.load(segmented["t2"])
    imgs = {}
    for suffix in ("_seg-cord", "_seg-levels", "_label-discs"):
        img = nib.load(out / f"{name}{suffix}.nii.gz")
        assert img.shape == t2.shape and np.allclose(img.affine, t2.affine, atol=1e-4)
        imgs[suffix] = np.asarray(img.dataobj)
    cord, levels, discs = imgs["_seg-cord"] > 0, imgs["_seg-levels"], imgs["_label-discs"]
    truth = np.asarray(nib.load(segmented["labels"] / f"{name}_seg-cord.nii.gz").dataobj) > 0
    dice = 2 * (cord & truth).sum() / (cord.sum() + truth.sum())
    assert dice > 0.6, dice
    assert not levels[~cord].any()  # levels only on the cord
    assert set(np.unique(levels)) <= set(range(len(LEVEL_NAMES) + 1))
    sidecar = json.loads((out / f"{name}_seg-imsct.json").read_text())
    summary = sidecar["levels"]
    assert summary["method"] in ("top of column", "conus", "spacing", "user", "none")
    assert {int(v) for v in np.unique(discs[discs > 0])} <= {d["label"] for d in summary["discs"]}
    assert "anatomy.pt" in sidecar["models"]
    assert any(s.startswith("vertebral levels:") for s in proc.stdout.splitlines())
    assert sidecar["outputs"]["cord"] == f"{name}_seg-cord.nii.gz"


def test_a_bad_disc_label_fails_before_segmenting(case, tmp_path, capsys):
    bad = tmp_path / "two_discs.nii.gz"
    data = np.zeros((8, 8, 8), np.uint8)
    data[2, 2, 2], data[5, 5, 5] = 4, 6
    nib.save(nib.Nifti1Image(data, np.eye(4)), bad)
    rc = cli.main(["segment", "--t2", str(case["t2"]), "--t1", str(case["t1"]), "-o", str(tmp_path / "out"),
                   "--disc-label", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and str(bad) in err and "found labels 4, 6" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_no_anatomy_skips_cord_and_levels(tmp_path, capsys):
    """--no-anatomy: the masks without the tight cord, level map and disc labels, and a sidecar that
    names only the models that ran; --disc-label with it is refused before anything is read."""
    from imsct.phantoms import generate_case, write_case
    from support.cases import LIKE_SHIPPED_TRAINING

    paths = write_case(generate_case(9503, 0, max_voxels=200_000, **LIKE_SHIPPED_TRAINING), tmp_path / "ds")
    out = tmp_path / "out"
    rc = cli.main(["segment", "--t2", str(paths["t2"]), "--t1", str(paths["t1"]), "-o", str(out), "--disc-label",
                   str(paths["t2"]), "--no-anatomy"])
    assert rc == 2 and "not with --no-anatomy" in capsys.readouterr().err and not out.exists()
    assert cli.main(["segment", "--t2", str(paths["t2"]), "--t1", str(paths["t1"]), "-o", str(out), "--no-anatomy"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if "_seg-cord" in n or "_seg-levels" in n or "_label-discs" in n], names
    side = json.loads(next(out.glob("*_seg-imsct.json")).read_text())
    assert "anatomy.pt" not in side["models"] and side["levels"] is None and "localiser.pt" in side["models"]
