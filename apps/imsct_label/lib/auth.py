"""A shared-secret token in front of every route of the MONAI Label server (used by ``serve.py``).

One token (a random string kept in a file readable by its owner only, or the environment variable
``IMSCT_LABEL_TOKEN``) is required on every request, checked in constant time:

* ``Authorization: Bearer <token>``: MONAILabelClient (``client.update_auth(...)``), scripts, curl;
* the cookie ``imsct_label_token``, set by the login page ``/auth/login`` (a form, POST): the
  browser path for OHIF, whose page, static files, DICOMweb proxy and API calls all come from this
  server's origin. The cookie is HttpOnly and SameSite=Strict. A ``?token=`` query is not accepted:
  it would end in browser histories, proxies' and servers' logs.

Open without the token: ``GET /auth/`` (says that a token is required) and ``POST /auth/token``
(MONAI Label's login route: a form with ``username`` and ``password``; answers the bearer token when
the password is the token), which is how the 3D Slicer MONAI Label plugin logs in: it asks for a
user name and password, any user name and the token as password. ``GET /auth/token/valid`` tells a
client whether its token is still right. Everything else answers 401 with a JSON message and
``WWW-Authenticate: Bearer`` (a browser asking for a page gets the login form with that status).
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import json
import os
import secrets
import stat
from pathlib import Path
from urllib.parse import parse_qs, quote

TOKEN_ENV = "IMSCT_LABEL_TOKEN"
COOKIE = "imsct_label_token"
MIN_TOKEN_CHARS = 16
MAX_FORM_BYTES = 8192
LOGIN_PATH = "/auth/login"
OPEN_ROUTES = {("GET", "/auth"), ("GET", "/auth/"), ("POST", "/auth/token"), ("GET", LOGIN_PATH), ("POST", LOGIN_PATH)}


class TokenError(ValueError):
    """A token file or value that cannot be used; the message names the file and the problem."""


def is_loopback(host: str) -> bool:
    """True for an address only this machine reaches (127.0.0.0/8, ::1, ``localhost``); any other
    address or host name counts as reachable from the network."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def check_token(token: str, source: str) -> str:
    token = token.strip()
    bad = sorted({c for c in token if not (0x21 <= ord(c) <= 0x7E) or c in '",;\\'})
    if len(token) < MIN_TOKEN_CHARS or bad:
        problem = f"characters not allowed: {''.join(bad)!r}" if bad else f"{len(token)} characters"
        raise TokenError(f"{source}: a token is at least {MIN_TOKEN_CHARS} printable ASCII characters without spaces, "
                         f"quotes, commas, semicolons or backslashes ({problem}); "
                         "e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return token


def load_or_create_token(path: str | os.PathLike) -> tuple[str, bool]:
    """The token kept in ``path``; a missing file is created with a new random token, readable and
    writable by its owner only (mode 0600). Returns ``(token, created)``."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never replaces a file
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return token, True
    if not path.is_file():
        raise TokenError(f"token file {path}: not a regular file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenError(f"token file {path}: cannot be read ({exc})") from None
    return check_token(text, f"token file {path}"), False


def loose_permissions(path: str | os.PathLike) -> str:
    """A warning when other users may read the token file, else ''."""
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"token file {path} is readable by other users (mode {stat.S_IMODE(mode):04o}); chmod 600 {path}"
    return ""


def _same(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode("utf-8", "replace"), token.encode())


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _bearer(headers: dict[str, str]) -> str | None:
    scheme, _, value = headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _cookie(headers: dict[str, str]) -> str | None:
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE:
            return value
    return None


def _local_target(target: str) -> str:
    """Where the login page may send the browser: a path of this server, never another site."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/ohif/"


LOGIN_FORM = """<!doctype html><html><head><meta charset="utf-8"><title>IMSCT label server: token</title></head>
<body style="font-family: sans-serif; max-width: 32em; margin: 4em auto">
<h2>IMSCT label server</h2><p>{message}</p>
<form method="post" action="{action}"><input type="hidden" name="next" value="{next}">
<label>Token <input type="password" name="token" autofocus autocomplete="current-password" size="40"></label>
<button type="submit">Open</button></form></body></html>"""


class TokenAuth:
    """ASGI middleware: every HTTP request and WebSocket must carry the token (see the module)."""

    def __init__(self, app, token: str, realm: str = "imsct-label"):
        self.app = app
        self.token = check_token(token, "token")
        self.realm = realm

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)  # lifespan
        headers = _headers(scope)
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        authorised = _same(_bearer(headers), self.token) or _same(_cookie(headers), self.token)
        if scope["type"] == "websocket":
            if authorised:
                return await self.app(scope, receive, send)
            return await send({"type": "websocket.close", "code": 1008})
        method = scope["method"]
        if (method, path) in OPEN_ROUTES:
            return await self._auth_route(method, path, scope, receive, send, headers, authorised)
        if path == "/auth/token/valid":
            if authorised:
                return await self._send(send, 200, {"username": "token", "roles": []})
        elif authorised:
            return await self.app(scope, receive, send)
        await self._refuse(scope, send, headers, path)

    # ---- answers -----------------------------------------------------------------------------

    async def _send(self, send, status: int, body, headers: dict | None = None, content_type: str = "application/json"):
        data = (json.dumps(body) if content_type == "application/json" else body).encode()
        raw = [(b"content-type", f"{content_type}; charset=utf-8".encode()), (b"content-length", str(len(data)).encode()),
               (b"cache-control", b"no-store")]
        raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": data})

    def _challenge(self) -> dict:
        return {"WWW-Authenticate": f'Bearer realm="{self.realm}"'}

    async def _refuse(self, scope, send, headers, path):
        wants_page = scope["method"] == "GET" and "text/html" in headers.get("accept", "")
        if wants_page:  # a browser opening a page: the login form, still with status 401
            query = scope.get("query_string", b"").decode("latin-1")
            target = path + ("?" + query if query else "")
            page = self._form("This server needs its access token.", target)
            return await self._send(send, 401, page, self._challenge(), "text/html")
        given = "authorization" in headers or _cookie(headers) is not None
        detail = ("wrong access token" if given else
                  "this server requires its access token: send 'Authorization: Bearer <token>' "
                  f"(browsers: log in at {LOGIN_PATH})")
        await self._send(send, 401, {"detail": detail}, self._challenge())

    def _form(self, message: str, target: str) -> str:
        return LOGIN_FORM.format(message=html.escape(message), action=LOGIN_PATH, next=html.escape(_local_target(target)))

    async def _auth_route(self, method, path, scope, receive, send, headers, authorised):
        if method == "GET" and path in ("/auth", "/auth/"):
            return await self._send(send, 200, {"enabled": True, "client_id": "imsct-label", "realm": self.realm,
                                                "login": LOGIN_PATH, "scheme": "bearer"})
        if method == "GET":  # the login page
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            return await self._send(send, 200, self._form("Enter the server's access token.", query.get("next", ["/ohif/"])[0]),
                                    content_type="text/html")
        form = await self._read_form(receive, headers)
        if form is None:
            return await self._send(send, 413, {"detail": f"form larger than {MAX_FORM_BYTES} bytes"})
        if path == "/auth/token":  # MONAI Label's password login: the password is the token
            if _same(form.get("password"), self.token):
                return await self._send(send, 200, {"access_token": self.token, "token_type": "Bearer"})
            return await self._send(send, 401, {"detail": "wrong access token (give it as the password)"}, self._challenge())
        target = _local_target(form.get("next", "/ohif/"))
        if not _same(form.get("token"), self.token):
            return await self._send(send, 401, self._form("Wrong token.", target), self._challenge(), "text/html")
        secure = "; Secure" if scope.get("scheme") == "https" else ""
        cookie = f"{COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict{secure}"
        await self._send(send, 303, {"detail": "logged in"}, {"Location": quote(target, safe="/?=&%:;,+@-._~!$'()*"),
                                                               "Set-Cookie": cookie})

    async def _read_form(self, receive, headers) -> dict[str, str] | None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > MAX_FORM_BYTES:
                return None
            if not message.get("more_body"):
                break
        if "application/x-www-form-urlencoded" not in headers.get("content-type", ""):
            return {}
        return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}


def protect(app, token: str) -> None:
    """Require ``token`` on every route of the (not yet started) FastAPI/Starlette ``app``. The check
    sits inside the app's CORS middleware, so that browsers' preflight requests are answered and a
    refusal still carries the CORS headers a web viewer needs to read it."""
    from starlette.middleware import Middleware

    if getattr(app, "middleware_stack", None) is not None:
        raise RuntimeError("the server application has already started; protect() must come first")
    app.user_middleware.append(Middleware(TokenAuth, token=token))
