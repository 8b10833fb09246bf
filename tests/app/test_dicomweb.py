"""A real Orthanc (DICOMweb plugin) as IMSCT's datastore: phantom studies stored by STOW-RS, found by
QIDO-RS (Modality MR, T2w series only), retrieved by WADO-RS, T1w fetched from the same study, final
labels stored back as DICOM SEG with the IMSCT segments."""

import sys

import numpy as np
import pydicom
import pytest
from dicomweb_client import DICOMwebClient

from imsct import dicom
from imsct.io import load_volume, save_volume
from imsct.labels import COLOURS, LABELS

from support.orthanc import OrthancServer, missing_reason
from support.cases import assert_same_image, labelmap_on_image_grid, phantom_labelmap

from support.paths import APP_DIR  # noqa: E402

pytestmark = pytest.mark.skipif(missing_reason() is not None, reason=str(missing_reason()))


def app_dicomweb():
    """The app's lib.dicomweb, imported the way MONAI Label imports the app (app folder on sys.path)."""
    if str(APP_DIR) not in sys.path:
        sys.path.insert(0, str(APP_DIR))
    from lib import dicomweb

    return dicomweb


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, phantom_dir):
    """Orthanc holding the first phantom subject as a study, plus a study with a T2w series and no T1w."""
    work = tmp_path_factory.mktemp("orthanc")
    anat = phantom_dir / "sub-001" / "anat"
    studies = [dicom.write_study(anat / "sub-001_T2w.nii.gz", anat / "sub-001_T1w.nii.gz", work / "dicom" / "sub-001", "sub-001")]
    t2 = load_volume(anat / "sub-001_T2w.nii.gz")
    lone = dicom.volume_to_series(t2, work / "dicom" / "lone", patient_id="sub-lone",
                                  series_description=dicom.T2W_DESCRIPTION, series_number=1)
    with OrthancServer(work / "server") as server:
        client = DICOMwebClient(server.dicomweb_url)
        for s in studies:  # STOW-RS, one study at a time
            client.store_instances([pydicom.dcmread(f) for f in s.files])
        server.upload(lone)  # REST upload
        server.studies = studies
        server.lone_t2 = str(pydicom.dcmread(lone[0], stop_before_pixels=True).SeriesInstanceUID)
        yield server


def test_qido_finds_mr_series(orthanc):
    client = DICOMwebClient(orthanc.dicomweb_url)
    mr = client.search_for_series(search_filters={"Modality": "MR"}, fields=["SeriesDescription"])
    descriptions = sorted(str(s["0008103E"]["Value"][0]) for s in mr)
    assert descriptions == ["T1w Gd", "T2w", "T2w"]
    assert client.search_for_series(search_filters={"Modality": "CT"}) == []


@pytest.fixture(scope="module")
def datastore(orthanc, tmp_path_factory):
    dw = app_dicomweb()
    from monailabel.datastore.dicom import DICOMwebClientX

    client = DICOMwebClientX(url=orthanc.dicomweb_url, session=None, qido_url_prefix=None, wado_url_prefix=None, stow_url_prefix=None)
    return dw.ImsctDICOMWebDatastore(client, cache_path=str(tmp_path_factory.mktemp("dwcache")))


def test_datastore_lists_t2_series_only(orthanc, datastore):
    want = {s.t2_series_uid for s in orthanc.studies} | {orthanc.lone_t2}
    assert set(datastore.list_images()) == want


def test_datastore_json_lists_what_status_counts(orthanc, tmp_path):
    """``GET /datastore?output=all`` answers with the datastore's json(): on a fresh cache it listed
    0 objects while ``/info`` (status()) counted every T2w series."""
    dw = app_dicomweb()
    from monailabel.datastore.dicom import DICOMwebClientX

    client = DICOMwebClientX(url=orthanc.dicomweb_url, session=None, qido_url_prefix=None, wado_url_prefix=None, stow_url_prefix=None)
    fresh = dw.ImsctDICOMWebDatastore(client, cache_path=str(tmp_path / "cache"))
    objects = fresh.json()["objects"]
    want = {s.t2_series_uid for s in orthanc.studies} | {orthanc.lone_t2}
    assert set(objects) == want and fresh.status()["total"] == len(want) == 2
    s = orthanc.studies[0]
    info = objects[s.t2_series_uid]["image"]["info"]
    assert (info["StudyInstanceUID"], info["PatientID"], info["SeriesDescription"]) == (s.study_uid, "sub-001", "T2w")
    # an image opened since keeps its cached entry (file extension), and the others stay listed
    fresh.get_image_uri(s.t2_series_uid)
    objects = fresh.json()["objects"]
    assert set(objects) == want and objects[s.t2_series_uid]["image"]["ext"] == ".nii.gz"


def test_make_datastore_uses_mr_filter(orthanc, tmp_path, monkeypatch):
    dw = app_dicomweb()
    from monailabel.config import settings

    monkeypatch.setattr(settings, "MONAI_LABEL_DICOMWEB_CACHE_PATH", str(tmp_path))
    ds = dw.make_datastore(orthanc.dicomweb_url + "/", {"dicomweb_t2_description": "t1w gd"})
    assert ds._search_filter == {"Modality": "MR"}
    assert set(ds.list_images()) == {s.t1_series_uid for s in orthanc.studies}
    assert ds._datastore_path.startswith(str(tmp_path))


def test_image_and_t1_come_back_as_nifti(phantom_dir, orthanc, datastore):
    dw = app_dicomweb()
    s = orthanc.studies[0]
    image = load_volume(datastore.get_image_uri(s.t2_series_uid))
    sub = phantom_dir / s.patient_id / "anat"
    slope2 = float(pydicom.dcmread(s.files[0], stop_before_pixels=True).RescaleSlope)
    assert_same_image(image, load_volume(sub / f"{s.patient_id}_T2w.nii.gz"), tol=slope2 / 2 + 1e-2)
    t1_path = dw.fetch_t1(datastore, s.t2_series_uid)
    assert t1_path.endswith(f"{s.t2_series_uid}.nii.gz")
    slope1 = float(pydicom.dcmread(s.files[-1], stop_before_pixels=True).RescaleSlope)
    assert_same_image(load_volume(t1_path), load_volume(sub / f"{s.patient_id}_T1w.nii.gz"), tol=slope1 / 2 + 1e-3)
    assert dw.fetch_t1(datastore, s.t2_series_uid) == t1_path  # cached


def test_fetch_t1_missing_is_a_clear_error(orthanc, datastore):
    dw = app_dicomweb()
    from lib.contrasts import MissingContrast

    with pytest.raises(MissingContrast, match=r"has no MR series described 'T1w Gd'.*\['T2w'\]"):
        dw.fetch_t1(datastore, orthanc.lone_t2)
    with pytest.raises(MissingContrast, match="not found"):
        dw.fetch_t1(datastore, "1.2.3.4.5.6.7")


def test_final_label_saved_as_dicom_seg(phantom_dir, orthanc, datastore, tmp_path):
    s = orthanc.studies[0]
    image = load_volume(datastore.get_image_uri(s.t2_series_uid))
    # the phantom's labels, brought onto the grid of the image as the datastore serves it
    lm = phantom_labelmap(phantom_dir, s.patient_id)
    label = labelmap_on_image_grid(lm, image)
    assert s.t2_series_uid not in datastore.get_labeled_images()
    assert s.t2_series_uid in datastore.get_unlabeled_images()
    label_file = save_volume(label.data, label.affine, tmp_path / "label.nii.gz")
    datastore.save_label(s.t2_series_uid, str(label_file), "final", {"model": "imsct"})

    client = DICOMwebClient(orthanc.dicomweb_url)
    segs = client.search_for_series(search_filters={"Modality": "SEG"})
    assert len(segs) == 1
    seg = segs[0]
    assert seg["0020000D"]["Value"] == [s.study_uid]
    ds = client.retrieve_series(s.study_uid, seg["0020000E"]["Value"][0])[0]
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == s.t2_series_uid
    path = tmp_path / "seg.dcm"
    ds.save_as(path)
    got = dicom.seg_segments(path)
    assert [(g.number, g.label) for g in got] == [(i, n) for n, i in LABELS.items()]
    assert all(max(abs(a - b) for a, b in zip(g.rgb, COLOURS[g.label])) <= 1 for g in got)
    assert_same_image(dicom.read_seg(path), lm, tol=0)
    # the datastore now reports the T2w series as labelled (no stale cache)
    assert s.t2_series_uid in datastore.get_labeled_images()
    assert s.t2_series_uid not in datastore.get_unlabeled_images()
    objects = datastore.json()["objects"]
    assert "final" in objects[s.t2_series_uid]["labels"] and not objects[orthanc.lone_t2]["labels"]
    # and serves the final label from its cache on the image grid
    final = load_volume(datastore.get_label_uri(datastore.get_label_by_image_id(s.t2_series_uid, "final"), "final"))
    assert_same_image(final, lm, tol=0)


def test_monailabel_server_infer_and_save_through_orthanc(stack, tmp_path):
    """MONAILabelClient against the app started with --studies <Orthanc>/dicom-web: the datastore lists the
    T2w series only, the cascade runs on it (its T1w fetched from the same study), and the saved final label
    becomes a DICOM SEG in Orthanc with the IMSCT segments."""
    from monailabel.client import MONAILabelClient

    client = MONAILabelClient(stack.server.url)
    info = client.info()
    assert "cascade" in info["models"]
    t2_id = stack.study.t2_series_uid
    assert set(client.datastore()["objects"]) == {t2_id}  # was empty until an image had been downloaded
    assert info["datastore"]["total"] == 1
    sample = client.next_sample("first", {})
    dw = DICOMwebClient(stack.orthanc.dicomweb_url)
    if dw.search_for_series(study_instance_uid=stack.study.study_uid, search_filters={"Modality": "SEG"}):
        assert "id" not in sample, sample  # labelled already (test_ohif.py ran first on this stack): none left
    else:
        assert sample["id"] == t2_id, stack.server.log_tail()  # the only image: the T2w series (not the T1w)

    result_file, body = client.infer("cascade", t2_id, {})
    assert body.get("label_names") == LABELS or body.get("label_names") is None
    pred = load_volume(result_file, "cascade result")
    image = load_volume(next(p for p in (stack.server.workdir / "dicom-cache").rglob(f"{t2_id}.nii.gz") if p.parent.name != "t1"))
    assert pred.shape == image.shape and np.allclose(pred.affine, image.affine, atol=1e-3)
    assert set(np.unique(pred.data).astype(int)) <= {0, *LABELS.values()}
    t1_cached = list((stack.server.workdir / "dicom-cache").rglob(f"t1/{t2_id}.nii.gz"))
    assert len(t1_cached) == 1  # the T1w came from Orthanc, same study

    # the annotator's final label: here the phantom's truth, on the image grid as served
    truth = labelmap_on_image_grid(phantom_labelmap(stack.bids_dir, "sub-001"), image)
    label_file = save_volume(truth.data, truth.affine, tmp_path / "final.nii.gz")
    before = {s["0020000E"]["Value"][0] for s in dw.search_for_series(search_filters={"Modality": "SEG"})}
    res = client.save_label(t2_id, str(label_file), tag="final")
    assert res["image"] == t2_id

    segs = [s for s in dw.search_for_series(search_filters={"Modality": "SEG"}) if s["0020000E"]["Value"][0] not in before]
    assert len(segs) == 1 and segs[0]["0020000D"]["Value"] == [stack.study.study_uid]
    ds = dw.retrieve_series(stack.study.study_uid, segs[0]["0020000E"]["Value"][0])[0]
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == t2_id
    seg_path = tmp_path / "seg.dcm"
    ds.save_as(seg_path)
    assert [(s.number, s.label) for s in dicom.seg_segments(seg_path)] == [(i, n) for n, i in LABELS.items()]
    assert_same_image(dicom.read_seg(seg_path), truth, tol=0)


def test_command_converts_bids_and_stores_in_orthanc(phantom_dir, orthanc, tmp_path, capsys):
    """``imsct dicom BIDS --out DIR --stow URL`` (subjects with and without sessions); storing the
    same subject twice gives the same UIDs, so Orthanc holds no duplicates. Runs last: it adds a study."""
    from support.servers import free_port

    bids = tmp_path / "bids"
    (bids / "sub-001").mkdir(parents=True)
    (bids / "sub-001" / "anat").symlink_to(phantom_dir / "sub-001" / "anat")
    ses = bids / "sub-009" / "ses-02" / "anat"
    ses.mkdir(parents=True)
    for c in ("T2w", "T1w"):
        (ses / f"sub-009_ses-02_{c}.nii.gz").symlink_to(phantom_dir / "sub-001" / "anat" / f"sub-001_{c}.nii.gz")
    client = DICOMwebClient(orthanc.dicomweb_url)
    before = {s["0020000E"]["Value"][0] for s in client.search_for_series(search_filters={"Modality": "MR"})}

    from imsct import cli

    assert cli.main(["dicom", str(bids), "--out", str(tmp_path / "dcm"), "--stow", orthanc.dicomweb_url]) == 0
    out = capsys.readouterr().out
    assert "sub-001: study" in out and "sub-009: study" in out
    assert (tmp_path / "dcm" / "sub-009" / "ses-02" / "T1w_Gd").is_dir()
    after = {s["0020000E"]["Value"][0] for s in client.search_for_series(search_filters={"Modality": "MR"})}
    assert before <= after and len(after - before) == 2  # sub-001 again: nothing new; sub-009 ses-02: T2w + T1w Gd
    studies = client.search_for_studies(search_filters={"PatientID": "sub-009"})
    assert len(studies) == 1

    # a server that is not there: one clear line, exit 2, nothing written
    dead = f"http://127.0.0.1:{free_port()}/dicom-web"
    assert cli.main(["dicom", str(bids), "--out", str(tmp_path / "dcm2"), "--stow", dead, "--quiet"]) == 2
    assert f"imsct dicom: error: {dead}: cannot reach the DICOMweb server" in capsys.readouterr().err
    assert not (tmp_path / "dcm2").exists()


def test_stack_is_serve_with_its_own_orthanc(stack):
    """The stack is ``serve.py --orthanc DIR --orthanc-port P --store-bids BIDS`` (``make serve``'s path):
    Orthanc on the given loopback port with its storage in DIR, the app on Orthanc's DICOMweb root."""
    import json

    import requests

    cfg = json.loads((stack.orthanc.workdir / "orthanc.json").read_text())
    assert cfg["HttpPort"] == stack.orthanc.port and cfg["RemoteAccessAllowed"] is False
    assert cfg["StorageDirectory"] == str(stack.orthanc.workdir / "db")
    assert requests.get(f"{stack.orthanc.url}/system", timeout=30).ok
    log = stack.server.log_tail(200_000)
    assert f"studies = {stack.orthanc.dicomweb_url}" in log
    assert f"OHIF: {stack.server.url}/ohif/" in log and f"StudyInstanceUIDs={stack.study.study_uid}" in log


def test_ohif_pages_set_the_panel_to_this_server(stack):
    """OHIF's MONAI Label panel reads its server from the MONAILABEL_SERVER_URL cookie (else port 8000):
    every OHIF page sets it to the address the page was requested at, uncached; other files do not."""
    import requests

    url = stack.server.url
    page = requests.get(f"{url}/ohif/monai-label", params={"StudyInstanceUIDs": stack.study.study_uid}, timeout=60)
    assert page.ok and page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-store"
    assert page.cookies.get("MONAILABEL_SERVER_URL", path="/ohif") == f"{url}/"
    assert "SameSite=Strict" in page.headers["set-cookie"]
    other_name = requests.get(f"{url}/ohif/", headers={"Host": f"localhost:{stack.server.port}"}, timeout=60)
    assert f"MONAILABEL_SERVER_URL=http://localhost:{stack.server.port}/;" in other_name.headers["set-cookie"]
    script = requests.get(f"{url}/ohif/app-config.js", timeout=60)
    assert script.ok and "set-cookie" not in script.headers
    info = requests.get(f"{url}/info/", timeout=60).json()
    assert "set-cookie" not in requests.get(f"{url}/info/", timeout=60).headers
    assert info["labels"] == ["tumor", "edema", "cavity"]  # a list: the panel appends the models' labels to it
    assert {"cascade", "localiser", "tumor"} <= set(info["models"])


def test_serve_orthanc_errors_are_clear(tmp_path):
    """serve.py --orthanc without Orthanc (or its plugin) stops at once with how to install them; wrong
    combinations of options are refused."""
    import os
    import subprocess

    serve = [sys.executable, str(APP_DIR / "serve.py")]
    env = dict(os.environ, ORTHANC_BINARY=str(tmp_path / "no-such-Orthanc"))
    r = subprocess.run([*serve, "--orthanc", str(tmp_path / "o"), "--port", "1"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Orthanc" in r.stderr and "apt-get install orthanc orthanc-dicomweb" in r.stderr and "no-such-Orthanc" in r.stderr
    assert not (tmp_path / "o").exists()  # nothing started, nothing written
    env = dict(os.environ, ORTHANC_DICOMWEB_PLUGIN=str(tmp_path / "libOrthancDicomWeb.so"))
    r = subprocess.run([*serve, "--orthanc", str(tmp_path / "o")], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "DICOMweb plugin is not installed" in r.stderr and "orthanc-dicomweb" in r.stderr
    for bad, why in ((["--orthanc", "x", "--studies", "y"], "exclude each other"), ([], "--studies DIR|URL, or --orthanc DIR"),
                     (["--studies", "y", "--store-bids", "z"], "go with --orthanc")):
        r = subprocess.run([*serve, *bad], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and why in r.stderr, (bad, r.stderr)
