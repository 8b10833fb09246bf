"""The served weights: one folder, seeded from the bundle's shipped weights, reloaded on change.

Retraining publishes new weights (the files of :data:`imsct.weights.CASCADE_MODELS`) into the same folder by atomic rename;
every inference checks the files' modification times and rebuilds the cascade when they changed,
so a published model is served without restarting the server.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from contextlib import contextmanager
from pathlib import Path

from imsct.cascade import Cascade
from imsct.io import copy_atomically
from imsct.weights import CASCADE_MODELS, spec

log = logging.getLogger(__name__)

SERVED = CASCADE_MODELS[False]  # model keys of imsct.weights the app serves and retrains


def seed_models(models_dir: Path, shipped_dir: Path) -> None:
    """Copy the shipped weights into ``models_dir`` where a file is missing (never overwrites)."""
    models_dir.mkdir(parents=True, exist_ok=True)
    for name in (*(spec(k).filename for k in SERVED), "provenance.json"):
        dst, src = models_dir / name, shipped_dir / name
        if not dst.exists() and src.exists():
            copy_atomically(src, dst)
            log.info("seeded %s from %s", dst, src)


class ModelStore:
    """The cascade built from ``models_dir``, rebuilt whenever a weight file changes.

    ``lock`` serialises every use of the networks (inference and Monte-Carlo dropout toggle
    module modes, so two users at once would disturb each other); an annotator's request takes it
    through :meth:`interactive`, and background work (uncertainty scores) waits while such a
    request waits or runs (:meth:`interactive_waiting`). A changed weight file that does
    not load (truncated, corrupt, another architecture) is refused: the error is logged once, kept
    in ``refused``, and the previous weights go on serving (their version is what ``version()``
    reports) until a loadable file appears."""

    def __init__(self, models_dir: str | Path, device: str = "cpu", **cascade_kw):
        self.models_dir = Path(models_dir)
        self.device = device
        self.cascade_kw = cascade_kw
        self.lock = threading.RLock()
        self._interactive = 0  # annotators' requests waiting for or holding ``lock``
        self._count_lock = threading.Lock()
        self._cascade: Cascade | None = None
        self._stamp: tuple | None = None
        self._digests: dict[tuple, str] = {}
        self._served_version: dict | None = None
        self.refused: dict | None = None  # {"files": stamp, "reason": str} of the last refused change

    @contextmanager
    def interactive(self):
        """``lock`` for an annotator's request: background users let it go first."""
        with self._count_lock:
            self._interactive += 1
        try:
            with self.lock:
                yield
        finally:
            with self._count_lock:
                self._interactive -= 1

    def interactive_waiting(self) -> bool:
        """Whether an annotator's request waits for the networks or uses them now."""
        return self._interactive > 0

    def paths(self) -> dict[str, Path]:
        """Served weight file per model key (``localiser``, ``tumor``)."""
        return {key: spec(key).path(self.models_dir) for key in SERVED}

    def is_valid(self) -> bool:
        return all(p.is_file() for p in self.paths().values())

    def _stamps(self) -> tuple:
        out = []
        for name, p in self.paths().items():
            st = p.stat()
            out.append((name, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def version(self) -> dict[str, dict]:
        """Per served model (key of :mod:`imsct.weights`): file name, modification time and a short SHA-256 (cached per mtime and size)."""
        if self.refused is not None and self._served_version is not None and self._stamps() == self.refused["files"]:
            return self._served_version
        out = {}
        paths = self.paths()
        for name, mtime_ns, size in self._stamps():
            key = (name, mtime_ns, size)
            if key not in self._digests:
                self._digests[key] = hashlib.sha256(paths[name].read_bytes()).hexdigest()[:16]
            out[name] = {"file": paths[name].name, "modified_time": mtime_ns / 1e9, "sha256": self._digests[key]}
        return out

    def version_key(self) -> str:
        """One string that changes whenever a served weight file does (cache key)."""
        return "+".join(f"{v['sha256']}" for v in self.version().values())

    def cascade(self) -> Cascade:
        """The current cascade (rebuilt when a weight file changed since the last call)."""
        with self.lock:
            stamp = self._stamps()
            if self._cascade is None or stamp != self._stamp:
                if self.refused is not None and stamp == self.refused["files"] and self._cascade is not None:
                    return self._cascade  # this change was refused already: keep serving
                log.info("loading weights from %s (%s)", self.models_dir, stamp)
                try:
                    # eager PyTorch: Monte-Carlo dropout scoring switches the network's dropout layers on
                    cascade = Cascade.from_models(self.models_dir, device=self.device, backend="eager", **self.cascade_kw)
                except Exception as exc:  # noqa: BLE001 - any unreadable weight file
                    reason = f"weights in {self.models_dir} could not be loaded: {type(exc).__name__}: {exc}"
                    self.refused = {"files": stamp, "reason": reason[:2000]}
                    if self._cascade is None:
                        raise RuntimeError(reason) from exc
                    log.error("%s; still serving the previous weights", reason)
                    return self._cascade
                self._cascade, self._stamp, self.refused = cascade, stamp, None
                self._served_version = self.version()
            return self._cascade
