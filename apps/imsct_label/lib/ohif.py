"""OHIF's MONAI Label panel points to the server that served the page.

The panel in MONAI Label 0.8.5's OHIF build (``/ohif/``) takes its server address from the cookie
``MONAILABEL_SERVER_URL``; without one it writes and uses ``http://<page host>:8000/``, whatever
port the page came from. Cookies are shared by every port of a host, so once written, a server on
another port kept being sent the 8000 one. Here every HTML page under ``/ohif/`` goes out with

    Set-Cookie: MONAILABEL_SERVER_URL=<scheme>://<Host header>[root path]/; Path=[root path]/ohif; SameSite=Strict

(the path the panel gives its own cookie, so it replaces a stale one) and ``Cache-Control: no-store``
(a page the browser took from its cache would set nothing): the panel shows this server's own
address, and its connect button connects to it. An address the user types into the panel holds
until the next page load. :class:`OhifServerCookie` is put into the web app by ``lib/web.py``.
"""

from __future__ import annotations

OHIF_PREFIX = "/ohif"
PANEL_COOKIE = "MONAILABEL_SERVER_URL"
_UNSAFE = set(' ;,"\\\r\n\t')  # characters a cookie value (or a Host header worth trusting) cannot hold


def _header(scope, name: bytes) -> str:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v.decode("latin-1").strip()
    return ""


def own_base_url(scope) -> str | None:
    """``scheme://host[:port][root path]/`` of the server as the request addressed it (its ``Host``
    header), None without a usable ``Host``."""
    host = _header(scope, b"host")
    root = (scope.get("root_path") or "").rstrip("/")
    if not host or "/" in host or _UNSAFE & set(host) or _UNSAFE & set(root):
        return None
    scheme = "https" if scope.get("scheme") == "https" else "http"
    return f"{scheme}://{host}{root}/"


def panel_cookie(scope) -> str | None:
    """The ``Set-Cookie`` value for a page of ``scope`` (None when the request names no usable host)."""
    base = own_base_url(scope)
    if base is None:
        return None
    root = (scope.get("root_path") or "").rstrip("/")
    cookie = f"{PANEL_COOKIE}={base}; Path={root}{OHIF_PREFIX}; SameSite=Strict"
    return cookie + "; Secure" if scope.get("scheme") == "https" else cookie


def is_ohif_page_request(scope) -> bool:
    if scope.get("type") != "http" or scope.get("method") not in ("GET", "HEAD"):
        return False
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path == OHIF_PREFIX or path.startswith(OHIF_PREFIX + "/")


class OhifServerCookie:
    """ASGI middleware: HTML answers under ``/ohif/`` set the panel's server cookie (module docstring)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        cookie = panel_cookie(scope) if is_ohif_page_request(scope) else None
        if cookie is None:
            return await self.app(scope, receive, send)

        async def send_with_cookie(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                kind = next((v for k, v in headers if k.lower() == b"content-type"), b"")
                if kind.startswith(b"text/html"):
                    # never from the browser's cache: a page from the cache would not set the cookie
                    headers = [(k, v) for k, v in headers if k.lower() not in (b"cache-control", b"etag", b"last-modified")]
                    message = {**message, "headers": [*headers, (b"set-cookie", cookie.encode("latin-1")),
                                                      (b"cache-control", b"no-store")]}
            await send(message)

        return await self.app(scope, receive, send_with_cookie)
