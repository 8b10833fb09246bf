"""What the app changes in MONAI Label's web server (``monailabel.app:app``, FastAPI).

**Web origins.** MONAI Label 0.8.5 answers every ``Origin`` with
``Access-Control-Allow-Origin`` and ``Access-Control-Allow-Credentials: true`` and allows every
method: any web page a user of the machine opens could read the studies and upload, label,
delete and train. Here a request that carries an ``Origin`` header (browsers send it on every
cross-origin request and on same-origin POST/PUT/DELETE) is answered only when that origin is
the server's own (the ``Origin`` names the host and port of the request's ``Host`` header: the
page came from this server, e.g. OHIF at ``/ohif/``) or one configured (``--conf allow_origin
URL[,URL]``, ``serve.py --allow-origin URL``, or MONAI Label's ``MONAI_LABEL_CORS_ORIGINS``).
Any other origin, ``null`` included, gets HTTP 403 before any route runs, token or not, without
CORS headers; a WebSocket is closed (1008). Requests without ``Origin`` (scripts, the Python
client, 3D Slicer) are not affected. CORS headers (with credentials) are sent to the configured
origins only.

**Malformed requests** get a 4xx with a message instead of MONAI Label's bare 500:

* a request naming a model, trainer, strategy or scoring method the app does not have
  (``/infer/<model>``, ``/batch/infer/<model>``, ``/train/<trainer>``, ``/activelearning/<strategy>``,
  ``/scoring/<method>``): 404 with the names there are (checked before the route runs, so an
  unknown trainer does not start a background task that can only fail);
* a JSON form field (``params`` of uploads, label saves and inferences, ``info`` of the info
  routes) that is not a JSON object: 400 naming the field, checked before MONAI Label copies the
  request's files to the temp folder (its route functions are wrapped, :data:`JSON_FORM_FIELDS`);
* MONAI Label's own "image / label not found": 404; its "invalid input": 400;
* a retraining round that has too few new final labels to train on (``POST /train/<trainer>``):
  409 with the reason and the number of labels still needed (:meth:`lib.train.StageTrainer.refusal`),
  instead of a background task that ends "DONE" having trained nothing.

**No request waits behind another.** MONAI Label 0.8.5's route functions are ``async def`` and
do their work (an inference, Monte-Carlo dropout scoring, file checks of an upload) without
ever awaiting, on the server's one event loop: while one runs, no other request is even read,
so ``/info`` waited behind every queued inference. :class:`BlockingRoutesInThreads` runs the
requests of :data:`THREADED_ROUTES` in worker threads, each with its own event loop, so the
server's loop stays free for ``/info``, ``/datastore``, ``/activelearning`` and the rest; the
networks are shared under :attr:`lib.models.ModelStore.lock` (one inference at a time on them,
file reading and writing outside the lock).

:func:`install` is called by the app when it is created, i.e. while the server starts (MONAI
Label creates it in the web app's start-up, after the middleware was built); it replaces MONAI
Label's CORS middleware in the list and has the stack rebuilt for the first request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys

from .config import normalise_origin, parse_origins
from .ohif import OhifServerCookie

log = logging.getLogger(__name__)

# path prefix (one name after it) -> what the name is, attribute of the MONAI Label app holding them
TASK_ROUTES = {
    "/infer/": ("model", "_infers"),
    "/batch/infer/": ("model", "_infers"),
    "/train/": ("trainer", "_trainers"),
    "/activelearning/": ("strategy", "_strategies"),
    "/scoring/": ("scoring method", "_scoring_methods"),
}


# MONAI Label route functions that json.loads a form field (after copying the request's files to
# the temp folder, which a failure then leaves behind): module, function, field
JSON_FORM_FIELDS = (
    ("monailabel.endpoints.datastore", "add_image", "params"),
    ("monailabel.endpoints.datastore", "save_label", "params"),
    ("monailabel.endpoints.datastore", "update_image_info", "info"),
    ("monailabel.endpoints.datastore", "update_label_info", "info"),
    ("monailabel.endpoints.infer", "run_inference", "params"),
)


def json_object_field(value, field: str) -> None:
    """HTTP 400 unless ``value`` (a form field's text) is empty or a JSON object."""
    from fastapi import HTTPException

    if not value:
        return
    try:
        parsed = json.loads(value)
    except (TypeError, ValueError) as exc:
        raise HTTPException(400, f"form field '{field}' is not valid JSON ({exc}); send a JSON object, e.g. {{}}") from None
    if not isinstance(parsed, dict):
        raise HTTPException(400, f"form field '{field}' must be a JSON object, e.g. {{}}, not {type(parsed).__name__}")


def _checking_json(function, field: str):
    import functools
    import inspect

    signature = inspect.signature(function)

    @functools.wraps(function)
    def checked(*args, **kwargs):
        json_object_field(signature.bind(*args, **kwargs).arguments.get(field), field)
        return function(*args, **kwargs)

    checked.imsct_checked = True
    return checked


def _wrap_json_fields() -> None:
    import importlib

    for module, name, field in JSON_FORM_FIELDS:
        mod = importlib.import_module(module)
        function = getattr(mod, name)
        if not getattr(function, "imsct_checked", False):
            setattr(mod, name, _checking_json(function, field))  # the route looks the function up at each call


# (method, path prefix) of the requests run in a worker thread: MONAI Label's handlers for them block
THREADED_ROUTES = (
    ("POST", "/infer/"),
    ("POST", "/batch/infer/"),
    ("POST", "/activelearning/"),
    ("POST", "/scoring/"),
    ("POST", "/train/"),  # the check of the labels a round would train on reads every final label
    ("PUT", "/datastore/"),  # uploads and label saves: size and content checks, Dice of the saved label
    ("GET", "/datastore/dataset"),  # a zip of the whole datastore
)
THREADED_REQUESTS_AT_ONCE = 32  # worker threads for them (others wait for a free one, on no thread)


class BlockingRoutesInThreads:
    """ASGI middleware: the requests of :data:`THREADED_ROUTES` go on to the rest of the web app
    (routing, MONAI Label's handler, exception handlers) in a worker thread with an event loop of
    its own; their ``receive`` and ``send`` are relayed to the server's loop. Any other request
    is served on the server's loop as before."""

    def __init__(self, app, routes=THREADED_ROUTES, at_once: int = THREADED_REQUESTS_AT_ONCE):
        self.app = app
        self.routes = tuple(routes)
        self.at_once = at_once
        self._limiter = None  # made on the server's loop, at the first threaded request

    def threaded(self, scope) -> bool:
        if scope["type"] != "http":
            return False
        method, path = scope.get("method", ""), _path(scope)
        return any(method == m and path.startswith(prefix) for m, prefix in self.routes)

    async def __call__(self, scope, receive, send):
        if not self.threaded(scope):
            return await self.app(scope, receive, send)
        import anyio.to_thread

        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.at_once)
        server_loop = asyncio.get_running_loop()

        def relayed(channel):
            async def call(*args):
                return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(channel(*args), server_loop))
            return call

        thread_receive, thread_send = relayed(receive), relayed(send)
        await anyio.to_thread.run_sync(lambda: asyncio.run(self.app(scope, thread_receive, thread_send)), limiter=self._limiter)


def _refusing_training(run_model):
    """``monailabel.endpoints.train.run_model`` refusing a round the trainer says it cannot run
    usefully (HTTP 409 with the reason, also logged); the check runs before any task starts."""
    import functools

    @functools.wraps(run_model)
    def checked(model, *args, **kwargs):
        from fastapi import HTTPException

        check = getattr(_instance(), "training_refusal", None)
        reason = check(model) if check is not None and model else None
        if reason:
            log.warning("POST /train/%s refused: %s", model, reason)
            raise HTTPException(409, reason)
        return run_model(model, *args, **kwargs)

    checked.imsct_checked = True
    return checked


def _wrap_training_route() -> None:
    import monailabel.endpoints.train as train

    if not getattr(train.run_model, "imsct_checked", False):
        train.run_model = _refusing_training(train.run_model)  # the route looks the function up at each call


def _headers(scope) -> list[tuple[str, str]]:
    return [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope.get("headers", [])]


def _path(scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return (path[len(root):] or "/") if root and path.startswith(root) else path


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), (b"cache-control", b"no-store")]})
    await send({"type": "http.response.body", "body": data})


def own_origin(origin: str, host: str | None) -> bool:
    """Whether ``origin`` (an ``Origin`` header) is the server's own: its host and port are the
    request's ``Host`` header (default port of the origin's scheme when the header has none)."""
    norm = normalise_origin(origin)
    if norm is None or not host:
        return False
    scheme = norm.split("://", 1)[0]
    return normalise_origin(f"{scheme}://{host.strip()}") == norm


class OriginGuard:
    """ASGI middleware: refuse requests from web origins other than the server's own and ``allowed``."""

    def __init__(self, app, allowed: tuple[str, ...] = ()):
        self.app = app
        self.allowed = frozenset(allowed)

    def refused_origin(self, scope) -> str | None:
        headers = _headers(scope)
        host = next((v for k, v in headers if k == "host"), None)
        for key, origin in headers:
            if key == "origin" and normalise_origin(origin) not in self.allowed and not own_origin(origin, host):
                return origin
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        origin = self.refused_origin(scope)
        if origin is None:
            return await self.app(scope, receive, send)
        log.warning("refused a %s %s from the web origin %r", scope.get("method", "websocket"), _path(scope), origin)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        await _send_json(send, 403, {"detail": (
            f"request from the web origin {origin!r} refused: this server answers pages of its own origin and the "
            "origins given with serve.py --allow-origin (--conf allow_origin)")})


class KnownTaskNames:
    """ASGI middleware: 404 for a request naming a model / trainer / strategy / scoring method the
    app does not have (:data:`TASK_ROUTES`)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("method") == "POST":
            path = _path(scope)
            for prefix, (what, attr) in TASK_ROUTES.items():
                name = path[len(prefix):].rstrip("/") if path.startswith(prefix) else ""
                if name and "/" not in name:
                    known = sorted(getattr(_instance(), attr, None) or {})
                    if name not in known:
                        return await _send_json(send, 404, {"detail": f"unknown {what} {name!r}; this server has: "
                                                                      f"{', '.join(known) or '(none)'}"})
                    break
        return await self.app(scope, receive, send)


def _instance():
    from monailabel.interfaces.utils.app import app_instance

    return app_instance()


async def _monailabel_error(request, exc):
    from fastapi.responses import JSONResponse
    from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException, MONAILabelError

    if isinstance(exc, (ImageNotFoundException, LabelNotFoundException)):
        return JSONResponse(status_code=404, content={"detail": exc.msg})
    if exc.error == MONAILabelError.INVALID_INPUT:
        return JSONResponse(status_code=400, content={"detail": exc.msg})
    return JSONResponse(status_code=500, content={"detail": f"{exc.error.value}: {exc.msg}"})


def monai_label_origins() -> tuple[str, ...]:
    """The origins set in MONAI Label's own ``MONAI_LABEL_CORS_ORIGINS`` (empty: none)."""
    from monailabel.config import settings

    given = [str(o) for o in (settings.MONAI_LABEL_CORS_ORIGINS or [])]
    return parse_origins(",".join(given), "MONAI_LABEL_CORS_ORIGINS")


def install(allow_origins: tuple[str, ...]) -> tuple[str, ...] | None:
    """Put the origin check, the CORS policy of ``allow_origins`` (plus MONAI_LABEL_CORS_ORIGINS)
    and the 4xx answers into the running MONAI Label web app. Returns the allowed origins, or None
    outside the server (a training subprocess, a test using the app in process)."""
    web = sys.modules.get("monailabel.app")
    if web is None:
        return None
    from fastapi.middleware.cors import CORSMiddleware
    from monailabel.interfaces.exception import MONAILabelException
    from starlette.middleware import Middleware

    allowed = tuple(dict.fromkeys([*allow_origins, *monai_label_origins()]))
    app = web.app
    kept = [m for m in app.user_middleware if m.cls not in (CORSMiddleware, OriginGuard, KnownTaskNames, BlockingRoutesInThreads, OhifServerCookie)]
    app.user_middleware[:] = [
        Middleware(OriginGuard, allowed=allowed),
        Middleware(CORSMiddleware, allow_origins=list(allowed), allow_credentials=True, allow_methods=["*"], allow_headers=["*"]),
        *kept,  # the access token (lib/auth.py) when serve.py was given one
        Middleware(OhifServerCookie),  # OHIF's MONAI Label panel set to this server (lib/ohif.py)
        Middleware(KnownTaskNames),
        Middleware(BlockingRoutesInThreads),  # innermost: every check above answers on the server's loop
    ]
    app.exception_handlers[MONAILabelException] = _monailabel_error
    _wrap_json_fields()
    _wrap_training_route()
    app.middleware_stack = None  # rebuilt with the list above for the next request
    log.info("web origins allowed besides the server's own: %s", list(allowed) or "none")
    return allowed
