"""End to end: the IMSCT MONAI Label app in a real ``monailabel start_server`` process, driven by
``monailabel.client.MONAILabelClient`` as the 3D Slicer / OHIF plugins drive it.

One server for the module (tests run in file order and build on each other): two small phantom
cases (real two-contrast NIfTI, a reduced field of view so that stage 2 needs one window), tiny
retraining settings (1 iteration on 32x32x16 patches) and a gate tolerance of 1 so that the round
publishes and the test can check that the new weights are served without a restart.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from support.paths import APP_DIR as APP, ROOT  # noqa: E402

pytest.importorskip("monailabel.client")
from monailabel.client import MONAILabelClient  # noqa: E402
from monailabel.client.client import MONAILabelClientException  # noqa: E402

from imsct import weights  # noqa: E402
from imsct.io import load_volume, save_volume  # noqa: E402
from support.cases import LIKE_SHIPPED_TRAINING, save_truth_labelmap  # noqa: E402
from support.servers import MonaiLabelServer  # noqa: E402
from imsct.labels import COLOURS, LABELS  # noqa: E402

SERVER_START_S = 300
TRAIN_WAIT_S = 900


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Two small phantom subjects written in BIDS, with their truth label maps."""
    from imsct.phantoms import generate_case, write_case

    root = tmp_path_factory.mktemp("label_app_phantoms")
    out = {}
    for i in range(2):
        paths = write_case(generate_case(515151, i, max_voxels=300_000, **LIKE_SHIPPED_TRAINING), root / "bids")
        paths["truth"] = save_truth_labelmap(paths, root / f"truth-{i}.nii.gz")
        out[f"sub-{i + 1:03d}"] = paths
    return out


@pytest.fixture(scope="module")
def server(cases, tmp_path_factory):
    """``monailabel start_server`` on a free loopback port; the datastore holds sub-001 (T2w as
    the image, its T1w in the sibling T1w/ folder); sub-002 is uploaded by a test."""
    studies = tmp_path_factory.mktemp("studies")
    (studies / "T1w").mkdir()
    shutil.copy(cases["sub-001"]["t2"], studies / "sub-001.nii.gz")
    shutil.copy(cases["sub-001"]["t1"], studies / "T1w" / "sub-001.nii.gz")
    conf = {"retrain_after": 2, "retrain_models": "tumor,localiser", "train_iterations": 1, "train_batch_size": 1,
            "tumor_patch": "32,32,16", "localiser_patch": "32,32,16", "gate_tolerance": 1, "mc_samples": 2}
    # serve.py = monailabel start_server --app apps/imsct_label, on 127.0.0.1 unless --host is given
    srv = MonaiLabelServer(studies, tmp_path_factory.mktemp("label_app_server"), conf, start_timeout=SERVER_START_S)
    try:
        srv.start()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    client = MONAILabelClient(srv.url, tmpdir=str(studies.parent))
    try:
        yield {"client": client, "studies": studies, "proc": srv.proc, "log": srv.log_path}
    finally:
        srv.stop()


def _load_serve():
    import importlib.util

    spec = importlib.util.spec_from_file_location("imsct_label_serve", APP / "serve.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_serve_command_line_defaults_to_loopback(tmp_path):
    serve = _load_serve()
    _, cmd = serve.server_argv(["--studies", "S", "--port", "9000"])
    assert cmd[:6] == ["monailabel", "start_server", "--app", str(APP), "--studies", "S"]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    _, cmd = serve.server_argv(["--studies", "S", "--host", "0.0.0.0"])
    assert cmd.count("--host") == 1 and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert serve.make_demo(tmp_path, 1) == ["sub-001"]
    assert (tmp_path / "sub-001.nii.gz").exists() and (tmp_path / "T1w" / "sub-001.nii.gz").exists()
    assert serve.make_demo(tmp_path, 1) == []  # an existing datastore is left as it is


def test_bad_app_options_are_named():
    import importlib.util

    spec = importlib.util.spec_from_file_location("imsct_label_config", APP / "lib" / "config.py")
    cfg = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = cfg  # dataclasses look their module up
    spec.loader.exec_module(cfg)
    ok = cfg.AppConfig.from_conf({"retrain_after": "3"}, str(APP), "/data/studies")
    assert ok.retrain_after == 3 and ok.models_dir == Path("/data/studies/.imsct/models")
    assert ok.shipped_models == ROOT / "bundle" / "models"
    # the names before the model took its label's spelling still start the app, with the new meaning
    old = cfg.AppConfig.from_conf({"tumour_patch": "32,32,16", "retrain_models": "tumour,localiser"}, str(APP), "/data/studies")
    assert old.tumor_patch == (32, 32, 16) and old.retrain_models == ("tumor", "localiser")
    for conf, words in (({"tumor_patch": "30,30,30"}, "tumor_patch"), ({"retrain_after": "many"}, "retrain_after"),
                        ({"retrain_models": "tumour,spleen"}, "spleen"), ({"mc_samples": "1"}, "at least 2")):
        with pytest.raises(cfg.ConfError, match=words):
            cfg.AppConfig.from_conf(conf, str(APP), "/data/studies")


def test_server_listens_on_loopback_only(server):
    import psutil

    ports = [c.laddr for c in psutil.Process(server["proc"].pid).net_connections("inet") if c.status == psutil.CONN_LISTEN]
    assert ports and all(a.ip == "127.0.0.1" for a in ports), ports


def _get(server, path: str):
    import json
    import urllib.request

    with urllib.request.urlopen(server["client"].get_server_url().rstrip("/") + path, timeout=30) as r:
        return json.loads(r.read())


def _error(call) -> str:
    with pytest.raises(MONAILabelClientException) as info:
        call()
    return info.value.msg


def test_info_lists_models_labels_colours_and_tasks(server):
    info = server["client"].info()
    # 'clicks' (interactive correction) is served where its weights are shipped: test_clicks_model_corrects_around_the_clicks
    assert set(info["models"]) - {"clicks"} == {"cascade", "localiser", "tumor"}
    assert "tumor" in info["labels"]  # one spelling: the stage-2 model is named as the label it draws
    for name in ("cascade", "tumor"):
        m = info["models"][name]
        assert m["labels"] == LABELS
        assert m["label_colors"] == {k: list(v) for k, v in COLOURS.items()}
        assert set(m["weights"]) == {"localiser", "tumor"}
    assert info["models"]["localiser"]["labels"] == {"cord": 1}
    for name, m in info["models"].items():  # annotators read there what the weights were trained on
        assert "synthetic phantoms only" in m["description"], (name, m["description"])
    assert info["labels"] == sorted(LABELS, key=LABELS.get)  # a list: what the OHIF panel extends with the models' labels
    assert set(info["trainers"]) == {"tumor", "localiser"}
    assert {"random", "first", "uncertainty"} <= set(info["strategies"])
    assert "dice" in info["scoring"]
    # the served weights start as the bundle's shipped ones
    import hashlib

    shipped = hashlib.sha256(weights.path("tumor").read_bytes()).hexdigest()[:16]
    assert info["models"]["cascade"]["weights"]["tumor"]["sha256"] == shipped


def test_upload_two_contrast_case(server, cases, tmp_path):
    client, studies = server["client"], server["studies"]
    c = cases["sub-002"]
    # the documented way: the T1w first (params contrast=T1w), then the T2w (the datastore image)
    assert client.upload_image(str(c["t1"]), "sub-002", {"contrast": "T1w"})["image"] == "sub-002"
    assert client.upload_image(str(c["t2"]), "sub-002", {"centre": "default"})["image"] == "sub-002"
    objects = client.datastore()["objects"]
    assert "sub-002" in objects and objects["sub-002"]["image"]["info"]["centre"] == "default"
    assert (studies / "T1w" / "sub-002.nii.gz").read_bytes() == Path(c["t1"]).read_bytes()
    assert not any(k.startswith("T1w") for k in objects)  # the T1w is not an image of its own

    # an existing case is not replaced by accident, and a broken file is refused by name
    msg = _error(lambda: client.upload_image(str(c["t2"]), "sub-002", {}))
    assert "409" in msg and "overwrite" in msg
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti at all")
    msg = _error(lambda: client.upload_image(str(bad), "sub-bad", {}))
    assert "422" in msg and "sub-bad" in msg
    assert "sub-bad" not in client.datastore()["objects"]


def test_case_without_t1w_gets_a_clear_error(server, cases):
    client = server["client"]
    client.upload_image(str(cases["sub-001"]["t2"]), "sub-not1", {})
    msg = _error(lambda: client.infer("cascade", "sub-not1", {}))
    assert "422" in msg and "T1w" in msg and "sub-not1" in msg
    assert server["proc"].poll() is None  # no crash


def test_infer_cascade_gives_label_map_on_t2w_grid(server, cases):
    client = server["client"]
    out, params = client.infer("cascade", "sub-001", {})
    t2 = nib.load(cases["sub-001"]["t2"])
    lab = nib.load(out)
    assert lab.shape == t2.shape
    assert np.allclose(lab.affine, t2.affine, atol=1e-4)
    assert set(np.unique(np.asarray(lab.dataobj)).tolist()) <= {0, 1, 2, 3}
    assert params["label_names"] == LABELS
    assert params["cord_found"] is True
    # the model's label is kept as 'original' (what the final label is scored against)
    assert client.datastore()["objects"]["sub-001"]["labels"]["original"]["info"]["model"] == "cascade"


def test_clicks_model_corrects_around_the_clicks(server, cases):
    """Model 'clicks' (type deepedit, what OHIF's and 3D Slicer's click tools drive): the clicks as
    MONAI Label's DeepEdit sends them (label names as keys, [i, j, k] voxels of the T2w, plus
    'background'); the answer is a label map on the T2w grid, a click outside the image a 422."""
    if not weights.path("clicks").is_file():
        pytest.skip("bundle/models/clicks.pt not shipped")
    client = server["client"]
    m = client.info()["models"]["clicks"]
    assert m["type"] == "deepedit" and m["labels"] == LABELS and "synthetic phantoms only" in m["description"]
    truth = load_volume(cases["sub-001"]["truth"]).data
    lesion = np.argwhere(truth > 0)
    ijk = lesion[len(lesion) // 2]
    name = {v: k for k, v in LABELS.items()}[int(truth[tuple(ijk)])]
    out, params = client.infer("clicks", "sub-001", {name: [ijk.tolist()], "background": [[0, 0, 0]]})
    t2, lab = nib.load(cases["sub-001"]["t2"]), nib.load(out)
    assert lab.shape == t2.shape and np.allclose(lab.affine, t2.affine, atol=1e-4)
    assert set(np.unique(np.asarray(lab.dataobj)).tolist()) <= {0, 1, 2, 3}
    assert params["clicks"][name] == 1 and params["clicks"]["background"] == 1 and "click_box" in params
    # the no-click answer of the image is kept: the next click costs the crop only
    _, again = client.infer("clicks", "sub-001", {name: [ijk.tolist()]})
    assert again["timings"]["no_click_answer"] == 0.0
    print(f"one click: {again['timings']['correction']:.2f} s correction, {again['latencies']['total']:.2f} s in the task")
    msg = _error(lambda: client.infer("clicks", "sub-001", {"tumor": [[10_000, 0, 0]]}))
    assert "422" in msg and "outside the T2w" in msg


def test_tumour_stage_alone_uses_saved_cord_label(server, cases):
    client = server["client"]
    msg = _error(lambda: client.infer("tumor", "sub-002", {}))
    assert "422" in msg and "cord" in msg
    client.save_label("sub-002", str(cases["sub-002"]["_sc-mask"]), tag="cord")
    out, params = client.infer("tumor", "sub-002", {})
    lab = nib.load(out)
    assert lab.shape == nib.load(cases["sub-002"]["t2"]).shape
    assert set(np.unique(np.asarray(lab.dataobj)).tolist()) <= {0, 1, 2, 3}
    assert params["cord_label"].endswith("sub-002.nii.gz")


def test_localiser_alone_gives_cord_region(server, cases):
    out, params = server["client"].infer("localiser", "sub-002", {})
    cord = np.asarray(nib.load(out).dataobj)
    assert cord.shape == nib.load(cases["sub-002"]["t2"]).shape
    assert set(np.unique(cord).tolist()) <= {0, 1} and cord.any()
    assert params["label_names"] == {"cord": 1}
    # the box it keeps for the uncertainty strategy is the one the cascade crops
    kept = server["client"].datastore()["objects"]["sub-002"]["image"]["info"]["imsct_stage1_box"]
    _, cascade_params = server["client"].infer("cascade", "sub-002", {})
    assert {"lo": kept["lo"], "hi": kept["hi"]} == cascade_params["stage1_box"]


def test_next_sample_by_each_strategy(server):
    client = server["client"]
    unlabelled = {"sub-001", "sub-002", "sub-not1"}
    assert client.next_sample("first", {})["id"] == "sub-001"
    assert client.next_sample("random", {})["id"] in unlabelled
    # scores are computed in the background: until every case has one, the answer is a case not scored yet
    deadline = time.monotonic() + TRAIN_WAIT_S
    while True:
        res = client.next_sample("uncertainty", {})
        if not res["pending"]:
            break
        assert res["scored"] is False and res["id"] in res["pending"]
        assert time.monotonic() < deadline, "uncertainty scores were not computed in the background"
        time.sleep(1)
    ranked = res["ranking"]
    assert {r["id"] for r in ranked} == {"sub-001", "sub-002"}  # sub-not1 has no T1w: skipped, named
    assert "sub-not1" in res["skipped"] and res["scored"] is True
    scores = [r["score"] for r in ranked]
    assert scores == sorted(scores, reverse=True) and res["id"] == ranked[0]["id"]
    assert all(s > 0 for s in scores)  # dropout active: the passes differ
    # cached per served model: asked again, the same ranking comes back from the image info
    again = client.next_sample("uncertainty", {})
    assert again["ranking"] == ranked


def test_final_labels_scored_and_retraining_fired(server, cases, tmp_path):
    client = server["client"]
    info0 = client.info()
    sha0 = info0["models"]["cascade"]["weights"]["tumor"]["sha256"]
    client.save_label("sub-001", str(cases["sub-001"]["_sc-mask"]), tag="cord")
    # a label that is not a tumour label map on the T2w grid is refused before it replaces anything
    truth_img = load_volume(cases["sub-001"]["truth"])
    bad_values, bad_grid = tmp_path / "values.nii.gz", tmp_path / "grid.nii.gz"
    save_volume(np.where(truth_img.data > 0, 7, 0), truth_img.affine, bad_values)
    save_volume(truth_img.data[:-2], truth_img.affine, bad_grid)
    assert "7" in _error(lambda: client.save_label("sub-001", str(bad_values), tag="final"))
    assert "grid" in _error(lambda: client.save_label("sub-001", str(bad_grid), tag="final"))
    assert "final" not in client.datastore()["objects"]["sub-001"]["labels"]
    res1 = client.save_label("sub-001", str(cases["sub-001"]["truth"]), tag="final")
    assert set(res1["dice"]) >= {"tumor", "edema", "cavity", "whole-tumor"}
    assert res1["new_final_labels"] == 1 and "retrain" not in res1
    stored = client.datastore()["objects"]["sub-001"]["image"]["info"]["dice"]
    assert stored["whole-tumor"] == res1["dice"]["whole-tumor"]
    # the Dice is a real comparison: recompute it from the two files
    from imsct.metrics import dice

    orig = np.asarray(nib.load(client.download_label("sub-001", "original")).dataobj)
    truth = np.asarray(nib.load(cases["sub-001"]["truth"]).dataobj)
    assert stored["whole-tumor"] == pytest.approx(dice(orig > 0, truth > 0), abs=1e-4)

    res2 = client.save_label("sub-002", str(cases["sub-002"]["truth"]), tag="final")
    assert {"tumor", "localiser"} <= set(res2["retrain"])  # the second new final label starts both trainers
    assert res2["new_final_labels"] == 0
    deadline = time.monotonic() + TRAIN_WAIT_S
    while True:
        tasks = _get(server, "/train/?all=true")
        if all(t["status"] not in ("SUBMITTED", "RUNNING") for t in tasks):
            break
        assert time.monotonic() < deadline, "retraining did not finish"
        time.sleep(3)
    assert [t["request"]["model"] for t in tasks] == ["tumor", "localiser"]
    assert all(t["status"] == "DONE" for t in tasks), tasks
    for t in tasks:  # each round told its progress: iteration, loss, validation number, time left
        assert any(re.search(r"iteration 1/1: Dice loss .*, validation .* about \d+ s left", d) for d in t["details"]), t["details"]
    info = client.info()
    for trainer, stage in (("tumor", 2), ("localiser", 1)):  # each trainer shows its own stage's rounds
        stats = info["train_stats"][trainer]
        assert stats["rounds"] == 1 and stats["published_rounds"] == 1, stats
        assert stats["last_round"]["stage"] == stage and stats["last_round"]["published"] is True
        assert stats["split"]["default"] == {"train": 1, "validation": 1}

    # the new models are served without a restart
    served = info["models"]["cascade"]["weights"]
    assert served["tumor"]["sha256"] != sha0
    assert served["localiser"]["sha256"] != info0["models"]["cascade"]["weights"]["localiser"]["sha256"]
    out, params = client.infer("tumor", "sub-002", {})
    assert params["model_version"] == served
    assert server["proc"].poll() is None


def test_random_strategy_with_every_image_just_offered(tmp_path, monkeypatch):
    """MONAI Label's Random weights images by seconds since last offered: all 0 when every image was
    offered this second (one-image datastore asked twice) and random.choices fails with HTTP 500.
    The app's strategy still answers."""
    from monailabel.datastore.local import LocalDatastore

    monkeypatch.syspath_prepend(str(APP))
    from lib.activelearning import RandomStrategy

    save_volume(np.zeros((4, 4, 4), np.uint8), np.eye(4), tmp_path / "only.nii.gz")
    ds = LocalDatastore(str(tmp_path), extensions=("*.nii.gz",), auto_reload=False)
    strategy = RandomStrategy()
    for _ in range(3):
        res = strategy({"strategy": "random"}, ds)
        assert res["id"] == "only" and res["weight"] >= 1
        ds.update_image_info("only", {"strategy": {"random": {"ts": int(time.time())}}})  # what /activelearning records


def test_corrupt_weight_file_is_refused_and_the_previous_model_keeps_serving(tmp_path, monkeypatch):
    """A weight file replaced by one that does not load (truncated copy) is refused with the
    reason; the previous networks and their version go on serving; a loadable file is taken again.
    With no previous model, the error names the folder."""
    monkeypatch.syspath_prepend(str(APP))
    from lib.models import ModelStore, seed_models

    models = tmp_path / "models"
    seed_models(models, ROOT / "bundle" / "models")
    store = ModelStore(models)
    first = store.cascade()
    version = store.version()
    good = weights.path("tumor", models).read_bytes()
    weights.path("tumor", models).write_bytes(good[: len(good) // 3])  # a half-written / corrupt file
    assert store.cascade() is first
    assert store.version() == version
    assert str(models) in store.refused["reason"]
    assert store.cascade() is first  # refused once, not retried at every request
    weights.path("tumor", models).write_bytes(good)
    assert store.cascade() is not first and store.refused is None

    fresh = ModelStore(models)
    weights.path("localiser", models).write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match=str(models)):
        fresh.cascade()


def test_result_file_survives_the_servers_clean_up_when_the_client_runs_on_the_same_machine(monkeypatch):
    """MONAI Label sends a result under its base name and then removes it; its Python client saves
    the bytes as <client tmpdir>/<name>, by default the system temp folder. The copy a client on the
    server's machine saved must not be the file the server removes."""
    import tempfile

    from monailabel.client.client import MONAILabelUtils
    from monailabel.utils.others.generic import remove_file

    monkeypatch.syspath_prepend(str(APP))
    from lib.infer import write_label

    lab = np.zeros((6, 6, 4), np.uint8)
    lab[2:4, 2:4, 1:3] = 1
    served = write_label(lab, np.diag([0.5, 0.5, 3.0, 1.0]))
    data = Path(served).read_bytes()
    copy = MONAILabelUtils.save_result({Path(served).name: data}, tempfile.gettempdir())  # what client.infer does
    try:
        remove_file(served)  # the server's background clean-up after the response
        assert not Path(served).exists()
        assert np.array_equal(np.asarray(load_volume(copy, "client copy").data), lab)
    finally:
        Path(copy).unlink(missing_ok=True)


def test_cascade_infer_task_answers_an_empty_label_map(tmp_path, monkeypatch):
    """The app's /infer task (in process: the module's server is not disturbed, its datastore is
    asserted on elsewhere) on a scan with no lesion: here every component falls below a 1000 cm3
    minimum, so the answer is empty whatever the weights. The result is an all-zero label map on
    the T2w grid with 0 cm3 per class, not an error; the served app keeps the default cord constraint."""
    monkeypatch.syspath_prepend(str(APP))
    from lib.contrasts import local_t1_path
    from lib.infer import CascadeInfer
    from lib.models import ModelStore, seed_models

    from imsct.phantoms import generate_case, write_case

    paths = write_case(generate_case(9503, 0, max_voxels=200_000, **{**LIKE_SHIPPED_TRAINING, "healthy_fraction": 1.0}), tmp_path / "bids")
    studies = tmp_path / "studies"
    (studies / "T1w").mkdir(parents=True)
    shutil.copy(paths["t2"], studies / "healthy.nii.gz")
    shutil.copy(paths["t1"], studies / "T1w" / "healthy.nii.gz")

    class Datastore:
        def t1_path(self, image_id):
            return local_t1_path(studies, image_id)

        def update_image_info(self, image_id, info):
            pass

    models = tmp_path / "models"
    seed_models(models, ROOT / "bundle" / "models")
    store = ModelStore(models, min_volume_cm3={"tumor": 1000.0, "edema": 1000.0, "cavity": 1000.0})
    assert store.cascade().cord_constraint  # the app uses the library's default
    out, params = CascadeInfer(store, Datastore)({"image": str(studies / "healthy.nii.gz"), "image_id": "healthy"})
    lab, t2 = nib.load(out), nib.load(paths["t2"])
    assert lab.shape == t2.shape and not np.asarray(lab.dataobj).any()
    assert params["volumes_cm3"] == {name: 0.0 for name in LABELS}
    assert params["cord_found"] in (True, False)
