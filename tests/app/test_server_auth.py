"""Access to the IMSCT MONAI Label server: serve.py refuses a network address without a token, and a
server started with a token (here on loopback: a token is enforced on any address) refuses every
request without it, changes nothing on disk for a refused write, and works as before with it
(MONAILabelClient's bearer header, the 3D Slicer plugin's password login, the browser login form).

A web page of another origin gets nothing even with the token (HTTP 403 before the token is
looked at); the origin configured with ``--conf allow_origin`` gets CORS answers, refusals included.

One real server for the module (``apps/imsct_label/serve.py --token-file``), one small phantom case.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import secrets
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

pytest.importorskip("monailabel.client")
from monailabel.client import MONAILabelClient  # noqa: E402
from monailabel.client.client import MONAILabelClientException  # noqa: E402

from support.cases import LIKE_SHIPPED_TRAINING, save_truth_labelmap  # noqa: E402
from support.servers import MonaiLabelServer, free_port  # noqa: E402

from support.paths import APP_DIR as APP, ROOT  # noqa: E402


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tree_digest(root: Path) -> str:
    """One hash over every file's relative path and bytes under ``root``."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


# ---- serve.py's decisions, without a server --------------------------------------------------------

def test_serve_refuses_network_host_without_token(tmp_path):
    studies = tmp_path / "studies"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("IMSCT_LABEL_TOKEN", None)
    run = subprocess.run([sys.executable, str(APP / "serve.py"), "--studies", str(studies), "--demo-cases", "1",
                          "--host", "0.0.0.0", "--port", str(free_port())],
                         capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "0.0.0.0" in run.stderr and "--token-file" in run.stderr and "IMSCT_LABEL_TOKEN" in run.stderr
    assert not studies.exists()  # refused before the demo cases or MONAI Label touched anything


def test_token_rules(tmp_path):
    serve = _load("imsct_label_serve_auth", APP / "serve.py")
    auth = _load("imsct_label_auth", APP / "lib" / "auth.py")

    def parsed(*argv, workers=None):
        """The options serve.py hands to monailabel (host as its parser reads it: the last one counts)."""
        cmd = serve.server_argv(["--studies", "S", *argv])[1]
        return argparse.Namespace(host=serve.given_host(cmd[2:]), workers=workers, uvicorn_app=serve.DEFAULT_ASGI_APP)

    for argv, host in ((["--port", "9000"], "127.0.0.1"), (["-i10.0.0.2"], "10.0.0.2"), (["--host=::"], "::"),
                       (["--ho", "0.0.0.0"], "0.0.0.0"), (["--host", "0.0.0.0", "-i", "127.0.0.1"], "127.0.0.1")):
        assert parsed(*argv).host == host, argv
    token = secrets.token_urlsafe(32)
    assert serve.refusal(parsed(), None, False, False) == ""  # loopback (the default) needs no token
    assert "--token-file" in serve.refusal(parsed("--host", "0.0.0.0"), None, False, False)
    assert "--token-file" in serve.refusal(parsed("-i", "192.168.1.20"), None, False, False)
    assert serve.refusal(parsed("--host", "0.0.0.0"), token, False, False) == ""
    assert serve.refusal(parsed("--host", "0.0.0.0"), None, True, False) == ""  # --insecure-no-token
    assert serve.refusal(parsed("--host", "0.0.0.0"), None, False, True) == ""  # MONAI Label's Keycloak auth
    assert "--workers" in serve.refusal(parsed("--host", "0.0.0.0", workers=2), token, False, False)
    assert "drop one" in serve.refusal(parsed(), token, True, False)
    with pytest.raises(SystemExit):  # never a token on the command line
        serve.server_argv(["--studies", "S", "--token", token])
    for host, local in (("127.0.0.1", True), ("::1", True), ("localhost", True), ("0.0.0.0", False),
                        ("10.1.2.3", False), ("::", False), ("server.example.org", False)):
        assert auth.is_loopback(host) is local, host

    # a missing token file is created (owner only), an existing one read, a weak one refused by name
    path = tmp_path / "secrets" / "label.token"
    made, created = auth.load_or_create_token(path)
    assert created and len(made) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert auth.load_or_create_token(path) == (made, False)
    assert auth.loose_permissions(path) == ""
    weak = tmp_path / "weak.token"
    weak.write_text("1234\n")
    with pytest.raises(auth.TokenError, match="weak.token"):
        auth.load_or_create_token(weak)
    weak.chmod(0o644)
    assert "chmod 600" in auth.loose_permissions(weak)


# ---- a real server with a token ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    from imsct.phantoms import generate_case, write_case

    root = tmp_path_factory.mktemp("auth_server")
    case = write_case(generate_case(626262, 0, max_voxels=300_000, **LIKE_SHIPPED_TRAINING), root / "bids")
    case["truth"] = save_truth_labelmap(case, root / "truth.nii.gz")
    studies = root / "studies"
    (studies / "T1w").mkdir(parents=True)
    shutil.copy(case["t2"], studies / "sub-001.nii.gz")
    shutil.copy(case["t1"], studies / "T1w" / "sub-001.nii.gz")
    token = secrets.token_urlsafe(32)
    token_file = root / "label.token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    srv = MonaiLabelServer(studies, root / "server", {"retrain_after": 0, "allow_origin": VIEWER}, args=["--token-file", str(token_file)],
                           env={"IMSCT_LABEL_TOKEN": ""}, headers={"Authorization": f"Bearer {token}"})
    try:
        srv.start()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        yield {"url": srv.url, "token": token, "studies": studies, "case": case, "server": srv}
    finally:
        srv.stop()


VIEWER = "https://viewer.example"  # allowed with --conf allow_origin (the MONAI Label spelling of serve.py --allow-origin)


def _refused(r: requests.Response) -> None:
    assert r.status_code == 401, (r.request.method, r.url, r.status_code, r.text[:300])
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert "token" in r.json()["detail"]


def test_every_route_needs_the_token(secured):
    url, token = secured["url"], secured["token"]
    paths = ("/info/", "/datastore/?output=all", "/datastore/image?image=sub-001", "/ohif/", "/ohif/index.html",
             "/static/favicon.ico", "/", "/docs", "/openapi.json", "/proxy/dicom/qido/studies", "/logs/",
             "/auth/token/valid")
    for path in paths:
        _refused(requests.get(url + path, timeout=30))
        _refused(requests.get(url + path, headers={"Authorization": "Bearer " + token[::-1]}, timeout=30))
        _refused(requests.get(url + path, headers={"Authorization": "Basic " + token}, timeout=30))
        _refused(requests.get(url + path, cookies={"imsct_label_token": token[:-1]}, timeout=30))
    ok = requests.get(url + "/info/", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert ok.status_code == 200 and {"cascade", "localiser", "tumor"} <= set(ok.json()["models"])
    # what stays open says only that a token is needed
    assert requests.get(url + "/auth/", timeout=30).json()["enabled"] is True
    assert token not in secured["server"].log_tail(10**7)  # the token is never logged


def test_refused_requests_change_nothing(secured):
    url, studies, case = secured["url"], secured["studies"], secured["case"]
    before = tree_digest(studies)
    for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}):
        with open(case["t1"], "rb") as f:
            _refused(requests.put(f"{url}/datastore/image?image=sub-002", files={"file": ("t1.nii.gz", f)},
                                  data={"params": json.dumps({"contrast": "T1w"})}, headers=headers, timeout=60))
        with open(case["t2"], "rb") as f:  # an overwrite of the existing case
            _refused(requests.put(f"{url}/datastore/image?image=sub-001", files={"file": ("t2.nii.gz", f)},
                                  data={"params": json.dumps({"overwrite": True})}, headers=headers, timeout=60))
        with open(case["truth"], "rb") as f:
            _refused(requests.put(f"{url}/datastore/label?image=sub-001&tag=final", files={"label": ("l.nii.gz", f)},
                                  data={"params": "{}"}, headers=headers, timeout=60))
        _refused(requests.delete(f"{url}/datastore/image?id=sub-001", headers=headers, timeout=30))
        _refused(requests.post(f"{url}/infer/cascade?image=sub-001", json={}, headers=headers, timeout=60))
        _refused(requests.post(f"{url}/train/tumor", json={}, headers=headers, timeout=30))
        _refused(requests.post(f"{url}/scoring/dice", json={}, headers=headers, timeout=30))
    assert tree_digest(studies) == before


def test_with_the_token_the_normal_flow_works(secured):
    url, token, studies, case = secured["url"], secured["token"], secured["studies"], secured["case"]
    # the 3D Slicer plugin's way: /auth/ says a login is needed, the token is the password
    client = MONAILabelClient(url, tmpdir=str(studies.parent))
    assert client.auth_enabled()
    with pytest.raises(MONAILabelClientException):
        client.auth_token("annotator", "not-the-token-at-all")
    client.update_auth(client.auth_token("annotator", token))
    assert client.auth_valid_token()

    # the same writes that were refused above now go through
    before = tree_digest(studies)
    client.upload_image(str(case["t1"]), "sub-002", {"contrast": "T1w"})
    client.upload_image(str(case["t2"]), "sub-002", {})
    assert (studies / "T1w" / "sub-002.nii.gz").read_bytes() == Path(case["t1"]).read_bytes()
    out, _ = client.infer("localiser", "sub-001", {})
    cord = nib.load(out)
    assert cord.shape == nib.load(case["t2"]).shape and set(np.unique(np.asarray(cord.dataobj)).tolist()) == {0, 1}
    client.save_label("sub-001", str(case["truth"]), tag="final")
    labels = list(studies.rglob("sub-001.nii.gz"))
    assert any("final" in p.parts for p in labels), labels
    assert tree_digest(studies) != before


def test_browser_login_sets_a_strict_cookie(secured):
    url, token = secured["url"], secured["token"]
    page = requests.get(url + "/ohif/", headers={"Accept": "text/html"}, timeout=30)
    assert page.status_code == 401 and 'name="token"' in page.text  # the login form, on the spot
    s = requests.Session()
    bad = s.post(url + "/auth/login", data={"token": "nope-nope-nope-nope", "next": "/ohif/"}, allow_redirects=False, timeout=30)
    assert bad.status_code == 401 and not s.cookies
    r = s.post(url + "/auth/login", data={"token": token, "next": "//evil.example/x"}, allow_redirects=False, timeout=30)
    assert r.status_code == 303 and r.headers["Location"] == "/ohif/"  # never sent to another site
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert s.get(url + "/info/", timeout=30).status_code == 200
    ohif = s.get(url + "/ohif/", timeout=30)
    assert ohif.status_code == 200 and "<html" in ohif.text.lower()


def test_chromium_logs_in_and_reads_the_api(secured, tmp_path):
    """A real browser: the login form sets the cookie, the next page of the server is readable, and
    page scripts cannot read the cookie (HttpOnly)."""
    if not (os.access("/usr/bin/chromium", os.X_OK) and os.access("/usr/bin/chromedriver", os.X_OK)):
        pytest.skip("chromium / chromedriver not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--no-first-run",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=opts)
    try:
        driver.set_page_load_timeout(120)
        driver.get(secured["url"] + "/auth/login?next=/info/")
        field = driver.find_element(By.NAME, "token")
        field.send_keys(secured["token"])
        field.submit()
        WebDriverWait(driver, 60).until(lambda d: d.current_url.endswith("/info/"))
        body = driver.find_element(By.TAG_NAME, "body").text
        assert json.loads(body)["models"]["cascade"], body[:300]
        assert driver.execute_script("return document.cookie") == ""
    finally:
        driver.quit()


def test_foreign_origin_is_refused_even_with_the_token(secured):
    url, token, studies, case = secured["url"], secured["token"], secured["studies"], secured["case"]
    bearer = {"Authorization": f"Bearer {token}"}
    before = tree_digest(studies)
    for origin in ("http://evil.example", "null"):
        headers = {**bearer, "Origin": origin}
        with open(case["truth"], "rb") as f:
            answers = [
                requests.get(f"{url}/info/", headers=headers, timeout=30),
                requests.put(f"{url}/datastore/label?image=sub-001&tag=final", files={"label": ("l.nii.gz", f)},
                             data={"params": "{}"}, headers=headers, timeout=60),
                requests.delete(f"{url}/datastore/image?id=sub-001", headers=headers, timeout=30),
                requests.post(f"{url}/train/tumor", json={}, headers=headers, timeout=30),
                requests.post(f"{url}/auth/token", data={"username": "a", "password": token}, headers={"Origin": origin}, timeout=30),
            ]
        for r in answers:
            assert r.status_code == 403, (r.request.method, r.url, r.status_code, r.text[:200])
            assert "access-control-allow-origin" not in r.headers and "access-control-allow-credentials" not in r.headers
            assert token not in r.text
    assert tree_digest(studies) == before
    # the configured origin: answered with CORS headers, with the token and (the refusal) without it
    ok = requests.get(f"{url}/info/", headers={**bearer, "Origin": VIEWER}, timeout=30)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == VIEWER
    assert ok.headers["access-control-allow-credentials"] == "true"
    no_token = requests.get(f"{url}/info/", headers={"Origin": VIEWER}, timeout=30)
    assert no_token.status_code == 401 and no_token.headers["access-control-allow-origin"] == VIEWER
    pre = requests.options(f"{url}/datastore/label", headers={"Origin": VIEWER, "Access-Control-Request-Method": "PUT",
                                                             "Access-Control-Request-Headers": "authorization"}, timeout=30)
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == VIEWER
    # the server's own origin (OHIF's pages come from it)
    own = requests.get(f"{url}/info/", headers={**bearer, "Origin": url}, timeout=30)
    assert own.status_code == 200 and "access-control-allow-origin" not in own.headers
