"""Orthanc holding a phantom study + the IMSCT MONAI Label app serving it (``--studies <orthanc>/dicom-web``).

One stack per pytest session (``shared_stack``), shared by test_dicomweb.py and test_ohif.py, stopped
at the end of the session. Everything runs on 127.0.0.1 on free ports, in temporary folders.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from orthanc_server import OrthancServer, free_port, missing_reason, stop_process, wait_for

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "apps" / "imsct_label"


def stack_missing_reason() -> str | None:
    if missing_reason():
        return missing_reason()
    if not (APP_DIR / "serve.py").exists():
        return f"MONAI Label app launcher not found ({APP_DIR / 'serve.py'})"
    return None


class MonaiLabelServer:
    """``apps/imsct_label/serve.py --studies URL`` (monailabel start_server) on a free loopback port."""

    def __init__(self, studies: str, workdir: Path, conf: dict | None = None, start_timeout: float = 240.0):
        self.studies = studies
        self.workdir = Path(workdir)
        self.conf = conf or {}
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log_path = self.workdir / "monailabel.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "MonaiLabelServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = {"models_dir": str(self.workdir / "models"), "state_dir": str(self.workdir / "state"),
                "retrain_after": "0", **self.conf}
        # the app's own launcher (monailabel start_server --app apps/imsct_label, on 127.0.0.1)
        cmd = [sys.executable, str(APP_DIR / "serve.py"), "--studies", self.studies, "--port", str(self.port)]
        for k, v in conf.items():
            cmd += ["--conf", k, str(v)]
        env = dict(os.environ, MONAI_LABEL_DICOMWEB_CACHE_PATH=str(self.workdir / "dicom-cache"),
                   MONAI_LABEL_DATASTORE_CACHE_PATH=str(self.workdir / "dicom-cache"),
                   MONAI_LABEL_SESSION_PATH=str(self.workdir / "sessions"),
                   OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONPATH=str(ROOT))
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, env=env, start_new_session=True)
        if wait_for(f"{self.url}/info/", self.proc, self.start_timeout):
            return self
        log = self.log_path.read_text(errors="replace")
        self.stop()
        raise RuntimeError(f"MONAI Label server did not start ({' '.join(cmd)}); its log:\n{log[-6000:]}")

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""


@dataclass
class Stack:
    orthanc: OrthancServer
    server: MonaiLabelServer
    study: object  # imsct.dicom.StudyFiles of the phantom in Orthanc
    bids_dir: Path
    workdir: Path


_STACK: Stack | None = None


def shared_stack(request, tmp_path_factory, phantom_dir) -> Stack:
    """Start (once per session) Orthanc with the first phantom subject as a DICOM study, and the app on it."""
    global _STACK
    if _STACK is not None:
        return _STACK
    from imsct import dicom

    work = tmp_path_factory.mktemp("dicomweb-stack")
    study = dicom.write_study(phantom_dir / "sub-001" / "anat" / "sub-001_T2w.nii.gz",
                              phantom_dir / "sub-001" / "anat" / "sub-001_T1w.nii.gz", work / "dicom" / "sub-001", "sub-001")
    orthanc = OrthancServer(work / "orthanc").start()
    try:
        orthanc.upload(study.files)
        server = MonaiLabelServer(orthanc.dicomweb_url, work / "monailabel").start()
    except BaseException:
        orthanc.stop()
        raise

    def stop():
        global _STACK
        server.stop()
        orthanc.stop()
        _STACK = None

    request.config.add_cleanup(stop)  # end of the pytest session
    _STACK = Stack(orthanc, server, study, Path(phantom_dir), work)
    return _STACK
