"""A local Orthanc (DICOM server with its DICOMweb plugin) for IMSCT's studies.

``apps/imsct_label/serve.py --orthanc DIR`` (``make serve``) starts one, stores studies in it as DICOM
(:mod:`imsct.dicom`) and serves the MONAI Label app on its DICOMweb root, so that OHIF (``/ohif/``)
has a DICOMweb source; the tests start theirs with the same class (``tests/support/orthanc.py``)::

    with LocalOrthanc("demo/orthanc") as orthanc:          # or LocalOrthanc(DIR, port=8042).start()
        orthanc.store(imsct.dicom.write_study(t2, t1, out, "sub-001").files)
        print(orthanc.dicomweb_url)                        # http://127.0.0.1:<port>/dicom-web

It runs ``/usr/sbin/Orthanc`` (Debian package ``orthanc``; plugin ``libOrthancDicomWeb.so`` from
``orthanc-dicomweb``) with a configuration written to ``DIR/orthanc.json``: HTTP on 127.0.0.1 at the
given port or a free one, connections from this machine only (``RemoteAccessAllowed`` false: Orthanc
1.10 has no bind-address option, it refuses every other client), no authentication, the DICOM
protocol off, storage and index in ``DIR/db`` (kept between runs), its log in ``DIR/orthanc.log``.
Orthanc runs in its own process group and gets SIGTERM when the starting process dies (Linux), so it
never outlives the server that uses it; :meth:`LocalOrthanc.stop` (or leaving the ``with`` block)
stops it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .processes import LOOPBACK, free_port, port_in_use, start_logged, stop_process

BINARY_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc", "/usr/local/sbin/Orthanc", "/usr/local/bin/Orthanc")
PLUGIN_NAME = "libOrthancDicomWeb.so"
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc", "/usr/lib/x86_64-linux-gnu/orthanc",
               "/usr/lib/aarch64-linux-gnu/orthanc", "/usr/local/share/orthanc/plugins")
INSTALL_HINT = "install the Debian packages: sudo apt-get install orthanc orthanc-dicomweb"


class OrthancError(RuntimeError):
    """Orthanc is not installed, its port is taken, it did not start, or it refused a file."""


def orthanc_binary() -> str | None:
    """Path of the Orthanc executable (``ORTHANC_BINARY`` when set), None when it is not installed."""
    given = os.environ.get("ORTHANC_BINARY")
    if given:
        return given if os.access(given, os.X_OK) else None
    for c in BINARY_CANDIDATES:
        if os.access(c, os.X_OK):
            return c
    return shutil.which("Orthanc")


def dicomweb_plugin() -> str | None:
    """Path of Orthanc's DICOMweb plugin (``ORTHANC_DICOMWEB_PLUGIN`` when set), None when it is not installed."""
    given = os.environ.get("ORTHANC_DICOMWEB_PLUGIN")
    if given:
        return given if Path(given).is_file() else None
    for d in PLUGIN_DIRS:
        p = Path(d) / PLUGIN_NAME
        if p.is_file():
            return str(p)
    return None


def missing_reason() -> str | None:
    """Why a local Orthanc cannot start here, with how to install what is missing (None when it can)."""
    if not orthanc_binary():
        where = os.environ.get("ORTHANC_BINARY") or ", ".join(BINARY_CANDIDATES[:2]) + " or Orthanc on PATH"
        return f"the Orthanc DICOM server is not installed (looked for {where}); {INSTALL_HINT}"
    if not dicomweb_plugin():
        where = os.environ.get("ORTHANC_DICOMWEB_PLUGIN") or f"{PLUGIN_NAME} in {', '.join(PLUGIN_DIRS[:3])}"
        return f"Orthanc's DICOMweb plugin is not installed (looked for {where}); {INSTALL_HINT}"
    return None


class LocalOrthanc:
    """One Orthanc process serving HTTP and DICOMweb on 127.0.0.1, its files in ``workdir``.

    ``port``: the HTTP port (refused with :class:`OrthancError` when taken); None picks a free one.
    """

    @staticmethod
    def previous_port(workdir: str | os.PathLike) -> int | None:
        """The port an earlier run in ``workdir`` used (its ``orthanc.json``) when it is free now, else None:
        the DICOMweb address, and so the app's caches keyed by it, stay the same across runs."""
        try:
            port = int(json.loads((Path(workdir) / "orthanc.json").read_text())["HttpPort"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return port if 0 < port < 65536 and not port_in_use(port) else None

    def __init__(self, workdir: str | os.PathLike, port: int | None = None, start_timeout: float = 60.0,
                 name: str = "IMSCT"):
        self.workdir = Path(workdir)
        self.requested_port = port
        self.port = port or 0
        self.start_timeout = start_timeout
        self.name = name
        self.proc = None
        self.log_path = self.workdir / "orthanc.log"
        self.config_path = self.workdir / "orthanc.json"

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def config(self) -> dict:
        """Orthanc's configuration (written to ``workdir/orthanc.json``)."""
        db = self.workdir / "db"
        return {
            "Name": self.name,
            "StorageDirectory": str(db),
            "IndexDirectory": str(db),
            "HttpPort": self.port,
            "HttpServerEnabled": True,
            "RemoteAccessAllowed": False,  # clients on this machine only
            "AuthenticationEnabled": False,
            "DicomServerEnabled": False,
            "DicomPort": free_port(),  # unused (DICOM protocol off), must not clash should it be enabled
            "WebDavEnabled": False,
            "StorageCompression": False,
            "ConcurrentJobs": 1,
            "HttpThreadsCount": 8,
            "Plugins": [dicomweb_plugin()],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado",
                         "Ssl": False, "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
        }

    def start(self) -> "LocalOrthanc":
        reason = missing_reason()
        if reason:
            raise OrthancError(reason)
        if self.requested_port and port_in_use(self.requested_port):
            raise OrthancError(f"port {self.requested_port} on {LOOPBACK} is already in use (another Orthanc?); "
                               f"give another port, or none to take a free one")
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OrthancError(f"{self.workdir}: cannot create the Orthanc folder ({exc.strerror})") from None
        last_log = ""
        for _attempt in range(1 if self.requested_port else 3):  # a free port can be taken between probing and binding
            self.port = self.requested_port or free_port()
            self.config_path.write_text(json.dumps(self.config(), indent=1))
            self.proc, last_log = start_logged([orthanc_binary(), str(self.config_path)], self.log_path,
                                               f"{self.url}/system", self.start_timeout, self.workdir, die_with_parent=True)
            if self.proc is not None:
                return self
        raise OrthancError(f"Orthanc did not start (configuration {self.config_path}, log {self.log_path}); "
                           f"the end of its log:\n{last_log[-4000:]}")

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def __enter__(self) -> "LocalOrthanc":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------------------------------------

    def store(self, files) -> int:
        """Store DICOM files through Orthanc's REST API (``POST /instances``; an instance already
        there is kept, so storing a study again adds nothing). Returns how many were sent."""
        import requests

        n = 0
        with requests.Session() as s:
            for f in files:
                r = s.post(f"{self.url}/instances", data=Path(f).read_bytes(), timeout=60)
                if not r.ok:
                    raise OrthancError(f"Orthanc refused {f}: HTTP {r.status_code} {r.text[:300]}")
                n += 1
        return n

    def _listing(self, level: str) -> list[dict]:
        import requests

        r = requests.get(f"{self.url}/{level}", params={"expand": ""}, timeout=60)
        if not r.ok:
            raise OrthancError(f"Orthanc at {self.url} did not list its {level}: HTTP {r.status_code} {r.text[:300]}")
        return r.json()

    def series_descriptions(self) -> list[str]:
        """``SeriesDescription`` of every series Orthanc holds (REST API)."""
        return [str(s.get("MainDicomTags", {}).get("SeriesDescription", "")) for s in self._listing("series")]

    def study_uids(self) -> list[str]:
        """``StudyInstanceUID`` of every study Orthanc holds, sorted by patient id."""
        studies = sorted(self._listing("studies"), key=lambda s: str(s.get("PatientMainDicomTags", {}).get("PatientID", "")))
        return [str(s.get("MainDicomTags", {}).get("StudyInstanceUID", "")) for s in studies]
