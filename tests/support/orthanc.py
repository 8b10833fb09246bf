"""A throw-away Orthanc for tests: the product's own :class:`imsct.orthanc.LocalOrthanc` (the one
``apps/imsct_label/serve.py --orthanc`` starts), on a free loopback port, its storage in a temporary
folder.

``with OrthancServer(tmp_dir) as orthanc: orthanc.dicomweb_url``; it raises with Orthanc's log when
the server does not come up.
"""

from __future__ import annotations

from imsct.orthanc import LocalOrthanc, dicomweb_plugin, missing_reason, orthanc_binary  # noqa: F401


class OrthancServer(LocalOrthanc):
    def __init__(self, workdir, start_timeout: float = 60.0):
        super().__init__(workdir, port=None, start_timeout=start_timeout, name="IMSCT-test")

    def upload(self, files) -> int:
        """Store DICOM files through Orthanc's REST API (POST /instances); returns how many."""
        return self.store(files)
