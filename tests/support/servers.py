"""Start and stop the real servers the tests need, on free loopback ports: the process helpers
shared by the Orthanc starter (orthanc_server.py) and the IMSCT MONAI Label app
(:class:`MonaiLabelServer`, used by test_label_app.py, the DICOMweb/OHIF stack and
scripts/benchmark.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from .paths import APP_DIR, ROOT  # noqa: F401


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, timeout: float, headers: dict | None = None) -> bool:
    """Poll ``url`` (with ``headers``) until it answers 2xx (True), the process exits or ``timeout`` s pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if requests.get(url, timeout=5, headers=headers).ok:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.3)
    return False


def stop_process(proc: subprocess.Popen | None, timeout: float = 30) -> None:
    """Stop a server started with ``start_new_session=True`` (its whole process group, so the
    MONAI Label server's training subprocesses go too)."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def start_logged(cmd: list[str], log_path: Path, health_url: str, timeout: float, cwd: Path,
                 env: dict | None = None, headers: dict | None = None) -> tuple[subprocess.Popen | None, str]:
    """Start ``cmd`` in its own process group, output to ``log_path``, and wait until ``health_url``
    answers (requested with ``headers``). Returns ``(process, "")`` when it is up; ``(None, its log)`` when it exited or timed
    out (it is stopped then)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True)
    if wait_for(health_url, proc, timeout, headers):
        return proc, ""
    text = Path(log_path).read_text(errors="replace")
    stop_process(proc)
    return None, text


class LoggedServer:
    """A server process the tests start on a free loopback port (``start`` in the subclass), with
    its log in ``workdir``; stopped on ``stop`` or leaving the ``with`` block."""

    def __init__(self, workdir: str | os.PathLike, start_timeout: float, log_name: str):
        self.workdir = Path(workdir)
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log_path = self.workdir / log_name

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        raise NotImplementedError

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class MonaiLabelServer(LoggedServer):
    """``apps/imsct_label/serve.py --studies STUDIES`` (monailabel start_server, the command users
    run) on a free loopback port, its log and caches in ``workdir``; ``conf`` becomes ``--conf KEY VALUE``;
    ``args`` are more serve.py options, ``env`` more environment variables, ``headers`` go with the
    readiness check (e.g. the ``Authorization`` a server started with ``--token-file`` requires)."""

    def __init__(self, studies: str | os.PathLike, workdir: Path, conf: dict | None = None, start_timeout: float = 300.0,
                 args: list[str] | None = None, env: dict | None = None, headers: dict | None = None):
        super().__init__(workdir, start_timeout, "monailabel.log")
        self.studies = str(studies)
        self.conf = conf or {}
        self.args, self.env, self.headers = list(args or []), dict(env or {}), headers

    def start(self) -> "MonaiLabelServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        cmd = [sys.executable, str(APP_DIR / "serve.py"), "--studies", self.studies, "--port", str(self.port)]
        for k, v in self.conf.items():
            cmd += ["--conf", k, str(v)]
        cmd += self.args
        env = dict(os.environ, MONAI_LABEL_DICOMWEB_CACHE_PATH=str(self.workdir / "dicom-cache"),
                   MONAI_LABEL_DATASTORE_CACHE_PATH=str(self.workdir / "dicom-cache"),
                   MONAI_LABEL_SESSION_PATH=str(self.workdir / "sessions"),
                   OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), **self.env)
        self.proc, log = start_logged(cmd, self.log_path, f"{self.url}/info/", self.start_timeout, self.workdir, env, self.headers)
        if self.proc is not None:
            return self
        raise RuntimeError(f"MONAI Label server did not start ({' '.join(cmd)}); its log:\n{log[-6000:]}")

