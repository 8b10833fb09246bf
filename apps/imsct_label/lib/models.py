"""The served weights: one folder, seeded from the bundle's shipped weights, reloaded on change.

Retraining publishes new ``localiser.pt`` / ``model.pt`` into the same folder by atomic rename;
every inference checks the files' modification times and rebuilds the cascade when they changed,
so a published model is served without restarting the server.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
from pathlib import Path

from imsct.cascade import Cascade
from imsct.runner import build_cascade

log = logging.getLogger(__name__)

WEIGHT_FILES = ("localiser.pt", "model.pt")


def seed_models(models_dir: Path, shipped_dir: Path) -> None:
    """Copy the shipped weights into ``models_dir`` where a file is missing (never overwrites)."""
    models_dir.mkdir(parents=True, exist_ok=True)
    for name in (*WEIGHT_FILES, "provenance.json"):
        dst, src = models_dir / name, shipped_dir / name
        if not dst.exists() and src.exists():
            tmp = dst.with_name(f".{name}.seed")
            shutil.copyfile(src, tmp)
            tmp.replace(dst)
            log.info("seeded %s from %s", dst, src)


class ModelStore:
    """The cascade built from ``models_dir``, rebuilt whenever a weight file changes.

    ``lock`` serialises every use of the networks (inference and Monte-Carlo dropout toggle
    module modes, so two users at once would disturb each other)."""

    def __init__(self, models_dir: str | Path, device: str = "cpu", **cascade_kw):
        self.models_dir = Path(models_dir)
        self.device = device
        self.cascade_kw = cascade_kw
        self.lock = threading.RLock()
        self._cascade: Cascade | None = None
        self._stamp: tuple | None = None
        self._digests: dict[tuple, str] = {}

    def paths(self) -> dict[str, Path]:
        return {name: self.models_dir / name for name in WEIGHT_FILES}

    def is_valid(self) -> bool:
        return all(p.is_file() for p in self.paths().values())

    def _stamps(self) -> tuple:
        out = []
        for name, p in self.paths().items():
            st = p.stat()
            out.append((name, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def version(self) -> dict[str, dict]:
        """Per weight file: modification time and a short SHA-256 (cached per mtime and size)."""
        out = {}
        for name, mtime_ns, size in self._stamps():
            key = (name, mtime_ns, size)
            if key not in self._digests:
                self._digests[key] = hashlib.sha256((self.models_dir / name).read_bytes()).hexdigest()[:16]
            out[name] = {"modified_time": mtime_ns / 1e9, "sha256": self._digests[key]}
        return out

    def version_key(self) -> str:
        """One string that changes whenever a served weight file does (cache key)."""
        return "+".join(f"{v['sha256']}" for v in self.version().values())

    def cascade(self) -> Cascade:
        """The current cascade (rebuilt when a weight file changed since the last call)."""
        with self.lock:
            stamp = self._stamps()
            if self._cascade is None or stamp != self._stamp:
                log.info("loading weights from %s (%s)", self.models_dir, stamp)
                self._cascade = build_cascade(self.models_dir, device=self.device, **self.cascade_kw)
                self._stamp = stamp
            return self._cascade
