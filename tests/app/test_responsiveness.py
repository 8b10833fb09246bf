"""The annotation loop as annotators live it: no request waits behind another, uncertainty scores
come from the background, and a retraining round says what it does or why it does not start.

One real ``monailabel start_server`` (``support.servers.MonaiLabelServer``) for the module, on two
small phantom cases, no automatic retraining, tiny rounds (2 iterations on 32x32x16 patches, batch
1, gate tolerance 1). The tests run in file order and build on each other. Nothing here is timed:
the assertions are on the order in which answers came back.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("monailabel")

from support.cases import LIKE_SHIPPED_TRAINING, save_truth_labelmap  # noqa: E402
from support.servers import MonaiLabelServer  # noqa: E402

N_INFER = 4
HTTP_TIMEOUT = 600
WAIT_S = 600  # the longest a background job (scoring, a round) may take on a loaded 2-core machine


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    from imsct.phantoms import generate_case, write_case

    root = tmp_path_factory.mktemp("responsive_phantoms")
    out = {}
    for i in range(2):
        paths = write_case(generate_case(727272, i, max_voxels=200_000, **LIKE_SHIPPED_TRAINING), root / "bids")
        paths["truth"] = save_truth_labelmap(paths, root / f"truth-{i}.nii.gz")
        out[f"sub-{i + 1:03d}"] = paths
    return out


@pytest.fixture(scope="module")
def server(cases, tmp_path_factory):
    studies = tmp_path_factory.mktemp("responsive_studies")
    (studies / "T1w").mkdir()
    for cid, c in cases.items():
        shutil.copy(c["t1"], studies / "T1w" / f"{cid}.nii.gz")
        shutil.copy(c["t2"], studies / f"{cid}.nii.gz")
    conf = {"retrain_after": 0, "train_iterations": 2, "train_batch_size": 1, "tumor_patch": "32,32,16",
            "localiser_patch": "32,32,16", "gate_tolerance": 1, "mc_samples": 2}
    srv = MonaiLabelServer(studies, tmp_path_factory.mktemp("responsive_server"), conf)
    try:
        srv.start()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    srv.studies_path = studies
    try:
        yield srv
    finally:
        srv.stop()


def _log_since(server, offset: int) -> str:
    with open(server.log_path, errors="replace") as fh:
        fh.seek(offset)
        return fh.read()


def _upload(url: str, image_id: str, path, params: dict) -> None:
    import json

    with open(path, "rb") as f:
        r = requests.put(f"{url}/datastore/image", params={"image": image_id}, files={"file": (f"{image_id}.nii.gz", f)},
                         data={"params": json.dumps(params)}, timeout=HTTP_TIMEOUT)
    assert r.status_code == 200, r.text


def _save_final(url: str, image_id: str, path) -> None:
    with open(path, "rb") as f:
        r = requests.put(f"{url}/datastore/label", params={"image": image_id, "tag": "final"},
                         files={"label": (f"{image_id}.nii.gz", f)}, data={"params": "{}"}, timeout=HTTP_TIMEOUT)
    assert r.status_code == 200, r.text


def _uncertainty(url: str) -> dict:
    r = requests.post(f"{url}/activelearning/uncertainty", json={}, timeout=HTTP_TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()


def test_info_datastore_and_uncertainty_answer_while_four_inferences_run(server, cases):
    url = server.url
    # a case uploaded now has no uncertainty score yet: the strategy must answer without computing one
    _upload(url, "sub-new", cases["sub-001"]["t1"], {"contrast": "T1w"})
    _upload(url, "sub-new", cases["sub-001"]["t2"], {})
    log_start = server.log_path.stat().st_size
    events: list[str] = []
    lock = threading.Lock()
    ids = ["sub-001", "sub-002", "sub-new", "sub-001"]

    def infer(cid):
        r = requests.post(f"{url}/infer/cascade", params={"image": cid, "output": "json"},
                          data={"params": '{"save_label": false}'}, timeout=HTTP_TIMEOUT)
        with lock:
            events.append("infer")
        return r

    with ThreadPoolExecutor(N_INFER) as pool:
        futures = [pool.submit(infer, cid) for cid in ids]
        deadline = time.monotonic() + WAIT_S
        while "Infer Request" not in _log_since(server, log_start):  # the server is inside an inference
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.1)
        info = requests.get(f"{url}/info/", timeout=HTTP_TIMEOUT)
        with lock:
            events.append("info")
        listing = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=HTTP_TIMEOUT)
        with lock:
            events.append("datastore")
        sample = _uncertainty(url)
        with lock:
            events.append("uncertainty")
        answers = [f.result() for f in futures]
    assert all(r.status_code == 200 for r in answers), [r.text[:300] for r in answers]
    assert info.status_code == 200 and set(info.json()["models"]) >= {"cascade", "localiser", "tumor"}
    assert listing.status_code == 200 and "sub-new" in listing.json()["objects"]
    # the three answers came back while most inferences were still running (MONAI Label alone served
    # one request at a time: /info waited for every inference queued before it)
    last_answer = events.index("uncertainty")
    assert events.index("info") < last_answer and events.index("datastore") < last_answer
    assert events[last_answer + 1:].count("infer") >= 2, events
    # the strategy offered a case at once: the one not scored yet
    assert sample["scored"] is False and "sub-new" in sample["pending"], sample
    assert sample["id"] in sample["pending"] and sample["uncertainty_score"] is None


def test_uncertainty_scores_come_from_the_background_and_are_served_from_the_cache(server):
    url = server.url
    deadline = time.monotonic() + WAIT_S
    while True:
        res = _uncertainty(url)
        if not res["pending"]:
            break
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(1.0)
    assert res["scored"] is True
    ranked = res["ranking"]
    assert {r["id"] for r in ranked} == {"sub-001", "sub-002", "sub-new"}
    scores = [r["score"] for r in ranked]
    assert scores == sorted(scores, reverse=True) and res["id"] == ranked[0]["id"] and all(s > 0 for s in scores)
    info = requests.get(f"{url}/datastore/image/info", params={"image": ranked[0]["id"]}, timeout=60).json()
    assert info["uncertainty"]["model"] == res["weights"] and info["uncertainty"]["score"] == ranked[0]["score"]
    # asked again: the cached ranking, nothing scored meanwhile
    log_start = server.log_path.stat().st_size
    again = _uncertainty(url)
    assert again["ranking"] == ranked and not again["pending"]
    assert not re.search(r"uncertainty: \S+ scored", _log_since(server, log_start))


def test_retraining_with_too_few_new_labels_is_refused_with_the_reason(server, cases):
    url = server.url
    log_start = server.log_path.stat().st_size
    r = requests.post(f"{url}/train/tumor", json={}, timeout=HTTP_TIMEOUT)
    assert r.status_code == 409, r.text
    detail = r.json()["detail"]
    assert "0 new final label(s) to train on, at least 1 needed" in detail and "Save 2 more final label(s)" in detail, detail
    # one final label: that case is held out for validation (its centre's first), so still nothing to train on
    _save_final(url, "sub-001", cases["sub-001"]["truth"])
    r = requests.post(f"{url}/train/localiser", json={}, timeout=HTTP_TIMEOUT)
    assert r.status_code == 409, r.text
    detail = r.json()["detail"]
    assert "1 is held out for validation" in detail and "Save 1 more final label(s)" in detail, detail
    assert "retraining refused" in _log_since(server, log_start)  # the same reason in the server log
    assert requests.get(f"{url}/train/", timeout=60).status_code == 404  # no task was started


def test_a_retraining_round_shows_its_progress_and_publishes(server, cases):
    url = server.url
    before = requests.get(f"{url}/info/", timeout=60).json()["models"]["tumor"]["weights"]["tumor"]["sha256"]
    _save_final(url, "sub-002", cases["sub-002"]["truth"])
    r = requests.post(f"{url}/train/tumor", json={}, timeout=HTTP_TIMEOUT)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + WAIT_S
    while True:
        task = requests.get(f"{url}/train/", timeout=60).json()
        if task["status"] not in ("SUBMITTED", "RUNNING"):
            break
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(1.0)
    assert task["status"] == "DONE", server.log_tail()
    line = re.compile(r"iteration (\d)/2: Dice loss \d+\.\d+, EWC penalty \S+, validation whole-tumour Dice (\d+\.\d+|n/a.*) "
                      r"\((before training|at iteration \d)\); \d+ s, about \d+ s left")
    shown = [m.group(1) for m in map(line.search, task["details"]) if m]
    assert shown == ["1", "2"], task["details"]
    assert any("at iteration 1" in d for d in task["details"])  # validated during the round, not only before and after
    assert len(line.findall(server.log_tail(200_000))) >= 2  # the same lines in the server log
    info = requests.get(f"{url}/info/", timeout=60).json()
    progress = info["train_stats"]["tumor"]["progress"]
    assert progress["status"] == "published" and progress["iteration"] == progress["iterations"] == 2, progress
    assert progress["eta_s"] == 0.0 and "loss" in progress
    assert info["models"]["tumor"]["weights"]["tumor"]["sha256"] != before  # the published version, in /info
    # the labels just trained on are no longer new: another round now is refused with the reason
    r = requests.post(f"{url}/train/tumor", json={}, timeout=HTTP_TIMEOUT)
    assert r.status_code == 409 and "1 was trained on already" in r.json()["detail"], r.text


def test_monte_carlo_passes_let_other_users_in_without_changing_the_score(cases):
    """The background scorer lets annotators' inferences use the networks between two passes
    (``Cascade.mc_dropout(between=...)``); whatever runs there, random draws included, the passes
    draw the same dropout masks: the score is the one of an uninterrupted run."""
    import numpy as np
    import torch

    from imsct.cascade import Cascade
    from imsct.io import load_image

    cascade = Cascade.from_models(backend="eager")
    t2, t1 = load_image(cases["sub-001"]["t2"], "T2w"), load_image(cases["sub-001"]["t1"], "T1w")
    box = (np.array([0, 0, 0]), np.array([48, 48, 32]))  # a small stage-2 region: the test is about the passes, not the case
    plain, _ = cascade.mc_dropout(t2, t1, 2, box=box)
    calls = []

    def other_user():
        calls.append(torch.rand(5))  # someone else's random numbers, between two passes

    interrupted, _ = cascade.mc_dropout(t2, t1, 2, box=box, between=other_user)
    assert len(calls) == 2 and interrupted == plain and plain > 0
