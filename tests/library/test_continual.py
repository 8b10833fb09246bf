"""Continual learning: persistent split, gate, atomic publication, a real round, EWC and replay,
and the centre-B domain shift. Real phantoms (cropped around the lesion to keep it fast), the
shipped weights, real files."""

import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from imsct.bids import find_cases
from imsct.continual import (LabelledCase, ewc_penalty, fisher_information, init_state, load_split, prepare_labelled, retrain_round,
                             stage1_target, train_candidate, train_stats, update_split)
from imsct.evaluation import truth_labelmap
from imsct.io import InputError
from imsct.labels import CORD_BOX_SUFFIX, SEG_SUFFIXES
from imsct.metrics import box_coverage
from imsct.networks import tumor_network
from imsct.cascade import cord_box
from imsct.weights import load_weights, path as weights_path

from support.paths import BUNDLE  # noqa: E402


def _crop_si(img: nib.Nifti1Image, centre_vox: np.ndarray, half_mm: float) -> nib.Nifti1Image:
    """Crop the axis that runs superior-inferior to +-half_mm around a voxel (header kept right)."""
    aff = img.affine
    axis = int(np.argmax(np.abs(aff[2, :3])))
    size = float(np.linalg.norm(aff[:3, axis]))
    lo = max(0, int(centre_vox[axis] - half_mm / size))
    hi = min(img.shape[axis], int(centre_vox[axis] + half_mm / size) + 1)
    sl = [slice(None)] * 3
    sl[axis] = slice(lo, hi)
    return img.slicer[tuple(sl)]


@pytest.fixture(scope="module")
def cases(phantom_dir, tmp_path_factory):
    """The two phantoms as the app stores them (T2w, T1w, one 0..3 label map), cropped to 80 mm
    around the lesion; the truth stage-1 cylinder as cord mask."""
    out = tmp_path_factory.mktemp("labelled")
    made = []
    for case in find_cases(phantom_dir):
        t2 = nib.load(case.t2)
        lab = truth_labelmap(case, t2.shape)
        centre = np.argwhere(lab > 0).mean(0)
        lab_img = nib.Nifti1Image(lab, t2.affine)
        paths = {}
        for key, img in (("t2", t2), ("label", lab_img), ("cord", nib.load(case.labels[CORD_BOX_SUFFIX]))):
            paths[key] = out / f"{case.subject}_{key}.nii.gz"
            nib.save(_crop_si(img, centre, 40.0), paths[key])
        made.append(LabelledCase(case.subject, paths["t2"], case.t1, paths["label"], "A", cord=paths["cord"]))
    return made


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_split_is_persistent_and_keeps_every_centre_validated(tmp_path):
    def mk(name, centre):
        return LabelledCase(name, Path("t2"), Path("t1"), Path("lab"), centre)

    first = [mk(f"a{i:02d}", "A") for i in range(7)]
    split1 = update_split(tmp_path, first)
    val1 = {n for n, v in split1.items() if v["role"] == "validation"}
    assert val1 and {split1[n]["centre"] for n in val1} == {"A"}
    # a later round: more of A, a new centre B arriving one case at a time, in another order
    later = first[::-1] + [mk(f"a{i:02d}", "A") for i in range(7, 12)] + [mk("b00", "B")]
    split2 = update_split(tmp_path, later)
    split3 = update_split(tmp_path, later + [mk(f"b{i:02d}", "B") for i in range(1, 8)])
    for n, v in split1.items():  # nobody changes role, ever
        assert split2[n]["role"] == v["role"] == split3[n]["role"]
    assert split2["b00"]["role"] == "validation"  # a new centre gets a validation case at once
    for centre in ("A", "B"):
        roles = [v["role"] for v in split3.values() if v["centre"] == centre]
        assert "validation" in roles and "train" in roles
    assert load_split(tmp_path) == split3
    init_state(tmp_path, trained=[mk("a00", "A")])  # a validation case cannot become a trained one
    assert load_split(tmp_path)["a00"]["role"] == split3["a00"]["role"]


def test_bad_label_map_is_refused_with_its_name(cases, tmp_path):
    bad = tmp_path / "bad_label.nii.gz"
    img = nib.load(cases[0].label)
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(data, img.affine), bad)
    with pytest.raises(InputError, match="bad_label"):
        prepare_labelled(LabelledCase("bad", cases[0].t2, cases[0].t1, bad, "A"), tmp_path / "cache")


def test_stage1_target_contains_every_annotated_lesion(cases, tmp_path):
    d = np.load(prepare_labelled(cases[0], tmp_path.parent / "shared-cache"))
    wt = d["label"] > 0
    target = stage1_target(d["t2"], d["label"], None)  # no localiser: the lesions dilated by DILATE_MM
    assert wt.any() and target[wt].all() and target.sum() > wt.sum()
    assert box_coverage(wt, *cord_box(target > 0, target.shape)) == 1.0


def _models(tmp_path) -> Path:
    m = tmp_path / "models"
    shutil.copytree(BUNDLE / "models", m)
    return m


def test_gate_refuses_a_damaged_candidate_and_keeps_the_old_file(cases, tmp_path):
    models = _models(tmp_path)
    before = _sha(weights_path("tumor", models))
    state = tmp_path / "state"
    init_state(state, validation=[cases[0]])  # centre A is known: its validation case guards the round
    # a learning rate of 1 on one step wrecks the network: the gate must refuse it
    res = retrain_round(cases, models, state, iterations=1, batch_size=1, patch_size=(32, 32, 16), lr=1.0, ewc_lambda=0.0,
                        seed=0, cache_dir=tmp_path.parent / "shared-cache", log=lambda m: None)
    assert not res.published
    assert "refused" in res.reason
    m = res.metrics
    assert m["gate_centres"] == ["A"] and m["gate_before"] - m["gate_after"] > 0.02
    assert _sha(weights_path("tumor", models)) == before
    rounds = json.loads((state / "rounds.json").read_text())
    assert len(rounds) == 1 and rounds[0]["published"] is False and rounds[0]["reason"] == res.reason
    stats = train_stats(state)
    assert stats["last_round"]["published"] is False and "refused" in stats["last_round"]["reason"]
    assert sorted(p.name for p in models.iterdir()) == sorted(p.name for p in (BUNDLE / "models").iterdir())


def test_round_trains_and_publishes_atomically(cases, tmp_path):
    models = _models(tmp_path)
    before = _sha(weights_path("tumor", models))
    state = tmp_path / "state"
    init_state(state, validation=[cases[0]])
    res = retrain_round(cases, models, state, iterations=2, batch_size=1, patch_size=(32, 32, 16), ewc_lambda=0.0, tolerance=1.0,
                        seed=0, cache_dir=tmp_path.parent / "shared-cache", log=lambda m: None)
    assert res.published, res.reason
    assert res.metrics["fresh_cases"] == [cases[1].name] and res.metrics["validation_cases"] == [cases[0].name]
    after = res.metrics["after"]["A"]["whole-tumor_dice"]
    assert 0.0 <= after <= 1.0
    assert _sha(weights_path("tumor", models)) != before
    assert _sha(weights_path("tumor", models)) == _sha(state / f"candidate-{weights_path('tumor').name}")  # exactly the gated file
    load_weights(tumor_network(), weights_path("tumor", models))
    assert sorted(p.name for p in models.iterdir()) == sorted(p.name for p in (BUNDLE / "models").iterdir())  # no temp file left
    assert train_stats(state)["published_rounds"] == 1
    # the trained case is now learnt: it joins the replay reservoir of centre A
    assert cases[1].name in json.loads((state / "reservoir.json").read_text())["reservoir"]["A"]


def test_replay_and_ewc_terms_are_used_and_finite(cases, tmp_path):
    files = [prepare_labelled(c, tmp_path.parent / "shared-cache") for c in cases]
    net = load_weights(tumor_network(), weights_path("tumor"))
    fisher = fisher_information(net, files[:1], 2, (32, 32, 16), samples=2)
    flat = torch.cat([f.flatten() for f in fisher.values()])
    assert torch.isfinite(flat).all() and abs(float(flat.mean()) - 1.0) < 1e-3 and float(flat.max()) > 1.0
    anchor = {n: p.detach().clone() for n, p in net.named_parameters()}
    with torch.no_grad():
        assert float(ewc_penalty(net, fisher, anchor)) == 0.0
    info = train_candidate(net, files[1:], files[:1], stage=2, iterations=2, batch_size=2, patch_size=(32, 32, 16), replay=0.5,
                           ewc=(fisher, anchor), ewc_lambda=1e4, lr=1e-3, seed=0, log=lambda m: None)
    assert info["replay_per_batch"] == 1
    with torch.no_grad():
        pen = float(ewc_penalty(net, fisher, anchor))
    assert np.isfinite(pen) and pen > 0 and np.isfinite(info["final_loss"])


def test_centre_b_shift(phantom_dir):
    from imsct.phantoms import Case
    from imsct.phantoms.centres import CENTRE_B, apply_centre

    c = find_cases(phantom_dir)[0]
    info = json.loads(c.labels[SEG_SUFFIXES["tumor"]].with_name(f"{c.subject}_phantom.json").read_text())
    case = Case(c.subject, nib.load(c.t2), nib.load(c.t1), {s: nib.load(p) for s, p in c.labels.items()}, info)
    shifted = apply_centre(case, CENTRE_B, seed=1)
    old_vox = np.sqrt((case.t2.affine[:3, :3] ** 2).sum(0))
    new_vox = np.sqrt((shifted.t2.affine[:3, :3] ** 2).sum(0))
    thick = int(np.argmax(old_vox))
    assert np.allclose(np.delete(new_vox, thick), CENTRE_B.inplane_mm) and np.isclose(new_vox[thick], old_vox[thick])
    for img in shifted.labels.values():  # every label on the shifted T2w grid
        assert img.shape == shifted.t2.shape and np.allclose(img.affine, shifted.t2.affine)
    wt_key = SEG_SUFFIXES["whole-tumor"]

    def world_centroid(img):
        idx = np.argwhere(np.asarray(img.dataobj) > 0).mean(0)
        return img.affine[:3, :3] @ idx + img.affine[:3, 3]

    assert np.linalg.norm(world_centroid(case.labels[wt_key]) - world_centroid(shifted.labels[wt_key])) < CENTRE_B.inplane_mm
    v_old = (np.asarray(case.labels[wt_key].dataobj) > 0).sum() * np.prod(old_vox)
    v_new = (np.asarray(shifted.labels[wt_key].dataobj) > 0).sum() * np.prod(new_vox)
    assert abs(v_new - v_old) / v_old < 0.15

    # intensity profile: the T2w lesion-to-CSF-bright contrast is compressed (gamma < 1), noise is higher
    def stats(t2img, lab_img):
        t2 = np.asarray(t2img.dataobj, float)
        wt = np.asarray(lab_img.dataobj) > 0
        p99 = np.percentile(t2, 99)
        return t2[wt].mean() / p99, np.percentile(t2, 5) / p99

    old_wt, old_dark = stats(case.t2, case.labels[wt_key])
    new_wt, new_dark = stats(shifted.t2, shifted.labels[wt_key])
    assert new_wt > old_wt + 0.03  # lesions pushed towards the bright end
    assert new_dark > old_dark  # background lifted by the extra Rician noise and the gamma
    # labels stay on the anatomy: lesion voxels keep a different mean intensity than their surroundings
    # in the same direction before and after
    def lesion_vs_ring(t2img, lab_img):
        t2 = np.asarray(t2img.dataobj, float)
        wt = np.asarray(lab_img.dataobj) > 0
        from scipy import ndimage

        ring = ndimage.binary_dilation(wt, iterations=3) & ~wt
        return t2[wt].mean() - t2[ring].mean()

    assert np.sign(lesion_vs_ring(case.t2, case.labels[wt_key])) == np.sign(lesion_vs_ring(shifted.t2, shifted.labels[wt_key]))
