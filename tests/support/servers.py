"""Start and stop the real servers the tests need, on free loopback ports: the IMSCT MONAI Label app
(:class:`MonaiLabelServer`, used by test_label_app.py, the DICOMweb/OHIF stack and
scripts/benchmark.py). The process helpers (free port, own process group, log, health URL) are the
product's, :mod:`imsct.processes`, which also starts the local Orthanc (:mod:`imsct.orthanc`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from imsct.processes import free_port, start_logged, stop_process, wait_for  # noqa: F401  (one implementation, the product's)

from .paths import APP_DIR, ROOT  # noqa: F401


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

    def __init__(self, studies: str | os.PathLike | None, workdir: Path, conf: dict | None = None, start_timeout: float = 300.0,
                 args: list[str] | None = None, env: dict | None = None, headers: dict | None = None):
        super().__init__(workdir, start_timeout, "monailabel.log")
        self.studies = None if studies is None else str(studies)
        self.conf = conf or {}
        self.args, self.env, self.headers = list(args or []), dict(env or {}), headers

    def start(self) -> "MonaiLabelServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        studies = ["--studies", self.studies] if self.studies is not None else []  # None: args say (e.g. --orthanc DIR)
        cmd = [sys.executable, str(APP_DIR / "serve.py"), *studies, "--port", str(self.port)]
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

