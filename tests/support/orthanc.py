"""Start a throw-away Orthanc (with its DICOMweb plugin) for tests.

``with OrthancServer(tmp_dir) as orthanc: orthanc.dicomweb_url`` runs ``/usr/sbin/Orthanc`` with a
generated configuration in ``tmp_dir``: HTTP on a free loopback port, DICOM protocol off, no
authentication, remote access refused, storage inside ``tmp_dir``. It waits for ``/system`` to
answer and raises with Orthanc's log when the server does not come up.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import requests
from .servers import LoggedServer, free_port, start_logged

ORTHANC_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc", "/usr/lib/x86_64-linux-gnu/orthanc")


def orthanc_binary() -> str | None:
    for c in ORTHANC_CANDIDATES:
        if os.access(c, os.X_OK):
            return c
    return shutil.which("Orthanc")


def dicomweb_plugin() -> str | None:
    for d in PLUGIN_DIRS:
        p = Path(d) / "libOrthancDicomWeb.so"
        if p.exists():
            return str(p)
    return None


def missing_reason() -> str | None:
    """Why Orthanc tests cannot run here (None when they can)."""
    if not orthanc_binary():
        return "Orthanc binary not installed (Debian package 'orthanc'; .ci/run installs it)"
    if not dicomweb_plugin():
        return "Orthanc DICOMweb plugin not installed (Debian package 'orthanc-dicomweb')"
    return None


class OrthancServer(LoggedServer):
    def __init__(self, workdir: str | os.PathLike, start_timeout: float = 60.0):
        super().__init__(workdir, start_timeout, "orthanc.log")

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def _config(self) -> dict:
        return {
            "Name": "IMSCT-test",
            "StorageDirectory": str(self.workdir / "db"),
            "IndexDirectory": str(self.workdir / "db"),
            "HttpPort": self.port,
            "HttpServerEnabled": True,
            "DicomServerEnabled": False,
            "DicomPort": free_port(),  # unused (DICOM server off) but must not clash if enabled
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "StorageCompression": False,
            "ConcurrentJobs": 1,
            "HttpThreadsCount": 8,
            "Plugins": [dicomweb_plugin()],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado",
                         "Ssl": False, "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
        }

    def start(self) -> "OrthancServer":
        reason = missing_reason()
        if reason:
            raise RuntimeError(reason)
        self.workdir.mkdir(parents=True, exist_ok=True)
        last_log = ""
        for _attempt in range(3):  # a free port can be taken between probing and binding
            self.port = free_port()
            cfg = self.workdir / "orthanc.json"
            cfg.write_text(json.dumps(self._config(), indent=1))
            self.proc, last_log = start_logged([orthanc_binary(), "--verbose", str(cfg)], self.log_path,
                                               f"{self.url}/system", self.start_timeout, self.workdir)
            if self.proc is not None:
                return self
        raise RuntimeError(f"Orthanc did not start (config {self.workdir / 'orthanc.json'}); its log:\n{last_log[-6000:]}")

    # convenience -----------------------------------------------------------------------------
    def upload(self, files) -> int:
        """Store DICOM files through Orthanc's REST API (POST /instances); returns how many."""
        n = 0
        for f in files:
            r = requests.post(f"{self.url}/instances", data=Path(f).read_bytes(), timeout=30)
            if not r.ok:
                raise RuntimeError(f"Orthanc refused {f}: {r.status_code} {r.text[:300]}")
            n += 1
        return n
