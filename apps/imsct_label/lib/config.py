"""The app's options (``--conf KEY VALUE`` of ``monailabel start_server``), checked once.

A bad value stops the app at start with a message naming the key, the value and what is expected.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from imsct.weights import DEFAULT_MODELS_DIR

DEFAULTS = {
    "models_dir": "",  # served weights; default <studies>/.imsct/models (seeded from shipped_models)
    "state_dir": "",  # retraining state (split, rounds, caches); default <studies>/.imsct/state
    "shipped_models": "",  # default <repository>/bundle/models
    "device": "",  # default: cuda when available, else cpu
    "retrain_after": "5",  # new final labels that start a background retraining round (0: never)
    "retrain_models": "tumor",  # trainers started by that trigger, comma-separated (tumor, localiser)
    "train_iterations": "50",
    "train_batch_size": "2",
    "min_new_labels": "1",  # a round needs this many new (or changed) final labels of training cases, else it is refused
    "train_validations": "2",  # validation number measured this many times during a round (besides before and after)
    "tumor_patch": "128,128,32",
    "localiser_patch": "256,128,32",
    "gate_tolerance": "0.02",  # largest allowed drop of whole-tumour Dice on earlier centres' validation cases
    "replay": "0.5",
    "ewc_lambda": "10000",
    "mc_samples": "4",  # Monte-Carlo dropout passes of the uncertainty strategy
    "max_upload_mb": "512",  # uploads (images, labels) larger than this once decompressed are refused (HTTP 413)
    "allow_origin": "",  # web origins besides the server's own allowed to send requests, comma-separated
}
TRAINERS = ("tumor", "localiser")
# names before the model took its label's spelling (0.1): still accepted, with a warning
RENAMED = {"tumour_patch": "tumor_patch"}
RENAMED_TRAINERS = {"tumour": "tumor"}


class ConfError(ValueError):
    pass


def _number(conf, key, kind=int, lo=0):
    try:
        v = kind(conf[key])
    except ValueError:
        raise ConfError(f"--conf {key} {conf[key]!r}: expected {'an integer' if kind is int else 'a number'}") from None
    if v < lo:
        raise ConfError(f"--conf {key} {v}: must be at least {lo}")
    return v


def _patch(conf, key):
    try:
        p = tuple(int(x) for x in str(conf[key]).split(","))
    except ValueError:
        p = ()
    if len(p) != 3 or any(x < 16 or x % 16 for x in p):
        raise ConfError(f"--conf {key} {conf[key]!r}: expected three multiples of 16, e.g. 128,128,32")
    return p


@dataclass
class AppConfig:
    models_dir: Path
    state_dir: Path
    shipped_models: Path
    device: str
    retrain_after: int
    retrain_models: tuple[str, ...]
    train_iterations: int
    train_batch_size: int
    tumor_patch: tuple[int, int, int]
    localiser_patch: tuple[int, int, int]
    gate_tolerance: float
    replay: float
    ewc_lambda: float
    mc_samples: int
    max_upload_mb: float = 512.0
    min_new_labels: int = 1
    train_validations: int = 2
    allow_origins: tuple[str, ...] = ()

    @classmethod
    def from_conf(cls, conf: dict | None, app_dir: str, studies: str) -> "AppConfig":
        import logging

        log = logging.getLogger(__name__)
        conf = dict(conf or {})
        for old, new in RENAMED.items():
            if old in conf:
                log.warning("--conf %s is now called %s; using its value", old, new)
                conf.setdefault(new, conf.pop(old))
        unknown = sorted(k for k in (conf or {}) if k not in DEFAULTS and k != "server_mode" and not k.startswith("dicomweb_"))
        if unknown:
            log.warning("unknown --conf keys ignored: %s (known: %s)", unknown, sorted(DEFAULTS))
        c = {**DEFAULTS, **{k: str(v) for k, v in (conf or {}).items()}}
        if studies.startswith(("http://", "https://")):
            # remote datastore: served weights and state in the user's cache folder, never in the source tree
            import os

            home = Path(os.environ.get("IMSCT_LABEL_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imsct-label")
            base = home / hashlib.sha256(studies.encode()).hexdigest()[:12]
        else:
            base = Path(studies) / ".imsct"
        device = c["device"]
        if not device:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        models = tuple(m.strip() for m in c["retrain_models"].split(",") if m.strip())
        if any(m in RENAMED_TRAINERS for m in models):
            log.warning("--conf retrain_models: trainer 'tumour' is now called 'tumor'")
            models = tuple(RENAMED_TRAINERS.get(m, m) for m in models)
        bad = [m for m in models if m not in TRAINERS]
        if bad:
            raise ConfError(f"--conf retrain_models {c['retrain_models']!r}: unknown trainer(s) {bad}; choose from {list(TRAINERS)}")
        return cls(
            models_dir=Path(c["models_dir"]) if c["models_dir"] else base / "models",
            state_dir=Path(c["state_dir"]) if c["state_dir"] else base / "state",
            shipped_models=Path(c["shipped_models"]) if c["shipped_models"] else DEFAULT_MODELS_DIR,
            device=device,
            retrain_after=_number(c, "retrain_after"),
            retrain_models=models,
            train_iterations=_number(c, "train_iterations", int, 1),
            train_batch_size=_number(c, "train_batch_size", int, 1),
            tumor_patch=_patch(c, "tumor_patch"),
            localiser_patch=_patch(c, "localiser_patch"),
            gate_tolerance=_number(c, "gate_tolerance", float),
            replay=_number(c, "replay", float),
            ewc_lambda=_number(c, "ewc_lambda", float),
            mc_samples=_number(c, "mc_samples", int, 2),
            max_upload_mb=_number(c, "max_upload_mb", float),
            min_new_labels=_number(c, "min_new_labels", int, 1),
            train_validations=_number(c, "train_validations", int, 0),
            allow_origins=parse_origins(c["allow_origin"], "--conf allow_origin"),
        )


def normalise_origin(origin: str) -> str | None:
    """``scheme://host[:port]`` in lower case without a default port (80 for http, 443 for https),
    the form browsers send in the ``Origin`` header; None for anything else (a path, a query,
    credentials, another scheme, ``null``)."""
    from urllib.parse import urlsplit

    try:
        u = urlsplit(origin.strip())
        port = u.port
    except ValueError:
        return None
    if u.scheme not in ("http", "https") or not u.hostname or u.username or u.password or u.path not in ("", "/") \
            or u.query or u.fragment:
        return None
    host = u.hostname.lower()
    host = f"[{host}]" if ":" in host else host
    default = 80 if u.scheme == "http" else 443
    return f"{u.scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


def parse_origins(value: str, source: str) -> tuple[str, ...]:
    """Comma-separated web origins (``http://viewer.example:3000``) as :func:`normalise_origin`
    writes them; :class:`ConfError` naming ``source`` and the entry otherwise (``*`` included:
    any web page could then act with the annotators' cookies)."""
    out = []
    for item in (v.strip() for v in str(value).split(",")):
        if not item:
            continue
        norm = normalise_origin(item)
        if norm is None:
            raise ConfError(f"{source} {item!r}: expected a web origin, scheme://host[:port] (e.g. http://viewer.example:3000), "
                            "without a path; '*' (every web page) is not accepted")
        out.append(norm)
    return tuple(dict.fromkeys(out))
