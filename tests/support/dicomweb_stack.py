"""The IMSCT MONAI Label app on a local Orthanc holding a phantom study, started as ``make serve`` starts
it: ``apps/imsct_label/serve.py --orthanc DIR --orthanc-port P --store-bids BIDS`` (serve.py starts
Orthanc with :mod:`imsct.orthanc`, stores the BIDS folder as DICOM written by :mod:`imsct.dicom`,
serves the app on Orthanc's DICOMweb root, and stops Orthanc when it stops).

One stack per pytest session (``shared_stack``), shared by test_dicomweb.py and test_ohif.py, stopped
at the end of the session. Everything runs on 127.0.0.1 on free ports, in temporary folders.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from imsct.processes import free_port

from .orthanc import missing_reason
from .servers import APP_DIR, MonaiLabelServer


def stack_missing_reason() -> str | None:
    if missing_reason():
        return missing_reason()
    if not (APP_DIR / "serve.py").exists():
        return f"MONAI Label app launcher not found ({APP_DIR / 'serve.py'})"
    return None


@dataclass
class OrthancOfServe:
    """The Orthanc that serve.py started (its address; serve.py owns the process)."""
    port: int
    workdir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"


@dataclass
class Stack:
    orthanc: OrthancOfServe
    server: MonaiLabelServer
    study: object  # imsct.dicom.StudyFiles of the phantom in Orthanc
    bids_dir: Path
    workdir: Path


_STACK: Stack | None = None


def study_files(folder: Path, patient_id: str):
    """:class:`imsct.dicom.StudyFiles` of a study that serve.py wrote to ``folder`` (``T2w/``, ``T1w_Gd/``)."""
    import pydicom

    from imsct import dicom

    t2, t1 = sorted((folder / "T2w").glob("*.dcm")), sorted((folder / "T1w_Gd").glob("*.dcm"))
    if not t2 or not t1:
        raise RuntimeError(f"{folder}: serve.py wrote no T2w/ and T1w_Gd/ DICOM series")
    head = lambda f: pydicom.dcmread(f, stop_before_pixels=True)  # noqa: E731
    return dicom.StudyFiles(patient_id, str(head(t2[0]).StudyInstanceUID), str(head(t2[0]).SeriesInstanceUID),
                            str(head(t1[0]).SeriesInstanceUID), t2 + t1)


def shared_stack(request, tmp_path_factory, phantom_dir) -> Stack:
    """Start (once per session) serve.py with a local Orthanc holding the first phantom subject as a DICOM study."""
    global _STACK
    if _STACK is not None:
        return _STACK
    work = tmp_path_factory.mktemp("dicomweb-stack")
    bids = work / "bids"  # the first subject only
    (bids / "sub-001").mkdir(parents=True)
    (bids / "sub-001" / "anat").symlink_to(Path(phantom_dir) / "sub-001" / "anat")
    orthanc = OrthancOfServe(free_port(), work / "orthanc")
    mon = work / "monailabel"
    server = MonaiLabelServer(None, mon, {"models_dir": mon / "models", "state_dir": mon / "state", "retrain_after": 0},
                              args=["--orthanc", str(orthanc.workdir), "--orthanc-port", str(orthanc.port),
                                    "--store-bids", str(bids)]).start()
    try:
        study = study_files(orthanc.workdir / "dicom" / "sub-001", "sub-001")
    except BaseException:
        server.stop()
        raise

    def stop():
        global _STACK
        server.stop()
        _STACK = None

    request.config.add_cleanup(stop)  # end of the pytest session
    _STACK = Stack(orthanc, server, study, Path(phantom_dir), work)
    return _STACK
