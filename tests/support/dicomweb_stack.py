"""Orthanc holding a phantom study + the IMSCT MONAI Label app serving it (``--studies <orthanc>/dicom-web``).

One stack per pytest session (``shared_stack``), shared by test_dicomweb.py and test_ohif.py, stopped
at the end of the session. Everything runs on 127.0.0.1 on free ports, in temporary folders.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .orthanc import OrthancServer, missing_reason
from .servers import APP_DIR, MonaiLabelServer


def stack_missing_reason() -> str | None:
    if missing_reason():
        return missing_reason()
    if not (APP_DIR / "serve.py").exists():
        return f"MONAI Label app launcher not found ({APP_DIR / 'serve.py'})"
    return None


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
        mon = work / "monailabel"
        server = MonaiLabelServer(orthanc.dicomweb_url, mon, {"models_dir": mon / "models", "state_dir": mon / "state", "retrain_after": 0}).start()
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
