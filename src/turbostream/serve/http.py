"""The plain-HTTP side of the server's one port: static files of the browser client, /healthz, /metrics, and the
Origin check every WebSocket handshake passes first (answered in websockets' process_request hook).

    /              the browser client (web/index.html, app.js, style.css)
    /view          the viewer page (web/view.html, view.js)
    /healthz       200 "ok" once every engine is warmed up; 503 while loading/warming (or if one failed), naming it
    /readyz        for load balancers: 200 while a new stream would be served at once; 503 while warming up, full,
                   failed or shutting down
    /metrics       Prometheus text (a registry per server)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import importlib.resources
import ipaddress
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers, MultipleValuesError
from websockets.http11 import Request, Response

from .guard import throttled

log = logging.getLogger("turbostream.server")

STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
    "/view": ("view.html", "text/html; charset=utf-8"),
    "/view.js": ("view.js", "text/javascript; charset=utf-8"),
    "/params.js": ("params.js", "text/javascript; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
WS_PATHS = ("/ws", "/view/ws")
PROBE_PATHS = ("/healthz", "/readyz")


def web_files() -> dict[str, bytes]:
    """The browser client's files, read once: from the installed package turbostream.web, else the source tree."""
    names = {name for name, _ in STATIC.values()}
    roots: list[Any] = []
    with contextlib.suppress(ModuleNotFoundError, TypeError):
        roots.append(importlib.resources.files("turbostream.web"))
    roots.append(Path(__file__).resolve().parents[3] / "web")
    for root in roots:
        files = {}
        for name in names:
            entry = root / name
            if entry.is_file():
                files[name] = entry.read_bytes()
        if "index.html" in files:
            return files
    log.warning("browser client files (web/) not found; / will answer 404")
    return {}


def query_params(path: str) -> dict[str, str]:
    """A request path's query as typed: ?token=a+b gives "a+b" (percent escapes decoded; '+' is not a space here).

    Form decoding (parse_qs, the browser's URLSearchParams) turns '+' into a space, and tokens are often base64,
    which is full of '+'. A repeated name keeps its last value.
    """
    params = {}
    for part in urlsplit(path).query.split("&"):
        if part:
            name, _, value = part.partition("=")
            params[unquote(name)] = unquote(value)
    return params


def token_matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a token from the URL with the configured one."""
    return given is not None and hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode())


def is_loopback_host(host: str) -> bool:
    """True for names and addresses that only this machine can reach (localhost, 127.0.0.0/8, ::1)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OriginPolicy:
    """Cross-site WebSocket hijacking defence: same origin (by Host), or an --allow-origin; no Origin = no browser.

    websockets' own `origins=` needs the list up front; "same origin" depends on the Host the browser used (a LAN
    address, a hostname, port 0), so the check is made per request. On a loopback bind the Host must name loopback
    too, which keeps DNS-rebinding pages out.
    """

    def __init__(self, bind_host: str, allow_origins: tuple[str, ...]) -> None:
        self.loopback_only = is_loopback_host(bind_host)
        self.allowed = {o.rstrip("/") for o in allow_origins}
        # The names the --allow-origin pages were loaded from: a proxy on this machine that passes the public Host on
        # (nginx's `proxy_set_header Host $host`) reaches a loopback-bound server under one of them.
        self.allowed_hosts = {urlsplit(o).netloc.lower() for o in self.allowed if o != "*"}

    def allows(self, request: Request) -> bool:
        try:
            origin = request.headers.get("Origin")
            host = request.headers.get("Host")
        except MultipleValuesError:
            return False
        if origin is None:
            return True
        origin = origin.rstrip("/")
        if "*" in self.allowed or origin in self.allowed:
            return True
        if not host or origin not in (f"http://{host}", f"https://{host}"):
            return False
        return self.host_allowed(request)

    def host_allowed(self, request: Request) -> bool:
        """On a loopback bind, whether the request's Host names loopback or an --allow-origin's host (a DNS-rebinding
        page's names its own domain); True on other binds, with --allow-origin '*', and for a request without Host
        (no browser sends one)."""
        if not self.loopback_only or "*" in self.allowed:
            return True
        try:
            host = request.headers.get("Host")
            return host is None or host.lower() in self.allowed_hosts \
                or is_loopback_host(urlsplit(f"//{host}").hostname or "")
        except (MultipleValuesError, ValueError):  # Host twice, or malformed ("[::1"): not a loopback name
            return False


def response(status: int, body: bytes, content_type: str) -> Response:
    headers = Headers([
        ("Content-Type", content_type), ("Content-Length", str(len(body))), ("Connection", "close"),
        ("Cache-Control", "no-cache"), ("X-Content-Type-Options", "nosniff"),
        # The page URL may carry ?token=: keep it out of Referer headers.
        ("Referrer-Policy", "no-referrer"),
    ])
    return Response(status, "OK" if status == 200 else "Error", headers, body)


class HttpFront:
    """websockets' process_request hook: answers plain GETs itself and lets allowed WebSocket handshakes through."""

    def __init__(self, origins: OriginPolicy, health: Callable[[], tuple[int, str]],
                 metrics: Callable[[], tuple[bytes, str]], *,
                 readiness: Callable[[], tuple[int, str]] | None = None,
                 admit: Callable[[ServerConnection, Request], Response | None] | None = None,
                 on_origin_refused: Callable[[], None] | None = None) -> None:
        self.origins, self.health, self.metrics = origins, health, metrics
        self.readiness = readiness or health
        self.admit = admit  # may answer an allowed handshake before the upgrade (503 through a trusted proxy)
        self.on_origin_refused = on_origin_refused  # counts a handshake refused for its Origin (403)
        self.files = web_files()

    def __call__(self, connection: ServerConnection, request: Request) -> Response | None:
        try:
            path = urlsplit(request.path).path
        except ValueError:  # a malformed request target ("//[", "http://[::1/ws"): the peer's error, not ours
            return connection.respond(400, "Bad Request\n")
        if request.method not in ("GET", "HEAD"):
            answer = connection.respond(405, "Method Not Allowed\n")
            answer.headers["Allow"] = "GET, HEAD"
            return answer
        answer = self._answer(connection, request, path)
        if answer is not None and request.method == "HEAD":
            answer = dataclasses.replace(answer, body=b"")  # Content-Length stays that of the GET
        return answer

    def _answer(self, connection: ServerConnection, request: Request, path: str) -> Response | None:
        if path in WS_PATHS:
            if not self.origins.allows(request):
                origin = _header_for_log(request, "Origin")
                origin = origin if len(origin) <= 100 else origin[:100] + "..."
                if self.on_origin_refused is not None:
                    self.on_origin_refused()
                throttled.warning(f"origin {origin}", "rejected a WebSocket from Origin %r", origin)
                return connection.respond(403, "Forbidden: this Origin may not connect (see --allow-origin)\n")
            return None if self.admit is None else self.admit(connection, request)  # None: the handshake goes on
        # The health probes answer any Host (a proxy's or an orchestrator's check names the service it likes; they
        # tell up or ready, no more). The pages and /metrics of a loopback-bound server answer loopback names and the
        # hosts of --allow-origin only (its WebSockets check the Origin, above): a DNS-rebinding page would read
        # /metrics as its own origin's.
        if path not in PROBE_PATHS and not self.origins.host_allowed(request):
            return connection.respond(403, "Forbidden: this server is bound to loopback and answers loopback names "
                                            "(and the hosts of --allow-origin) only\n")
        if path == "/healthz":
            status, text = self.health()
            return connection.respond(status, text)
        if path == "/readyz":
            status, text = self.readiness()
            return connection.respond(status, text)
        if path == "/metrics":
            return response(200, *self.metrics())
        if path in STATIC and STATIC[path][0] in self.files:
            name, content_type = STATIC[path]
            return response(200, self.files[name], content_type)
        return connection.respond(404, "Not Found\n")


def _header_for_log(request: Request, name: str) -> str:
    """Every value of a header, for a log line (a repeated header must not raise while it is being refused)."""
    return ", ".join(request.headers.get_all(name)) or "(none)"
