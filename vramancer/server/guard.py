"""What every HTTP request passes before a route sees it: counted by route and status, its
path without a trailing slash, and the browser checks (Origin, Host, Content-Type).

A page open in the user's browser can send requests to a server on 127.0.0.1. Three rules
keep it out unless the user said otherwise:
- Origin: a browser names the page's origin on every cross-site request; only origins given
  with --cors-origin pass (403 otherwise), and only they get CORS headers and preflight answers
  (Starlette's CORSMiddleware, which then never sees an origin it must refuse).
- Host: a DNS-rebinding page reaches 127.0.0.1 under its own name, which the Host header
  still carries; only loopback names, the address the server was started on and --allow-host
  names pass (403 otherwise).
- Content-Type: a page may POST text/plain or form bodies anywhere without a preflight, but
  never application/json; so a body must say it is JSON (415 otherwise).
Every refusal is an OpenAI error object, like the routes' own.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from starlette.middleware.cors import CORSMiddleware
from starlette.routing import BaseRoute, Match

from vramancer.config.errors import VramancerError
from vramancer.server import protocol as p

Scope = dict
ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]
LOOPBACK_NAMES = ("localhost", "localhost.")
BODY_METHODS = ("POST", "PUT", "PATCH")
COUNTED_METHODS = ("GET", "POST", "OPTIONS", "HEAD")  # any other is counted as OTHER: labels stay few
UNMATCHED = "unmatched"  # the route label of paths no route serves: one series, whatever was asked


def check_origin(origin: str) -> str:
    """An origin as browsers send it (scheme://host[:port], nothing more), or one sentence why not."""
    parts = urlsplit(origin)
    if origin == "*" or (parts.scheme in ("http", "https") and parts.netloc and not parts.path
                         and not parts.query and not parts.fragment and "@" not in parts.netloc):
        return origin
    raise VramancerError(f"--cors-origin {origin!r} is not an origin such as https://chat.example or "
                         "http://localhost:3000 (scheme, host and port only), nor '*'.")


def _host_name(host_header: str) -> str:
    """The name in a Host header, without its port ("[::1]:8000" -> "::1")."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_loopback_name(name: str) -> bool:
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True  # browsers resolve *.localhost to loopback themselves, never through DNS
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


async def _refuse(send, error: p.ApiError, extra_headers: list | None = None) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), str(v).encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


class BrowserGuard:
    """Origin, Host and Content-Type checks, with CORS for the allowed origins (see above)."""

    def __init__(self, app: ASGIApp, cors_origins: tuple[str, ...] = (), allowed_hosts: tuple[str, ...] = (),
                 own_host: str = "") -> None:
        self.origins = {o.rstrip("/").lower() for o in cors_origins}
        self.any_origin = "*" in self.origins
        self.any_host = "*" in allowed_hosts
        self.hosts = {h.lower() for h in allowed_hosts}
        if own_host and own_host not in ("0.0.0.0", "::", ""):
            self.hosts.add(own_host.lower())  # the address the user chose to serve on is theirs
        inner = _ContentTypeAndHost(app, self)
        self.app = (CORSMiddleware(inner, allow_origins=sorted(self.origins), allow_methods=["GET", "POST"],
                                   allow_headers=["*"], max_age=600) if self.origins else inner)

    def host_allowed(self, name: str) -> bool:
        return self.any_host or _is_loopback_name(name) or name in self.hosts

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        origin = _header(scope, b"origin")
        if origin is not None and not (self.any_origin or origin.rstrip("/").lower() in self.origins):
            return await _refuse(send, p.ApiError(
                403, f"requests from web pages at {origin} are not allowed; start the server with "
                     f"--cors-origin {origin} to allow them.", code="origin_not_allowed"))
        await self.app(scope, receive, send)


class _ContentTypeAndHost:
    def __init__(self, app: ASGIApp, guard: BrowserGuard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive, send) -> None:
        host = _header(scope, b"host")
        if host is not None and not self.guard.host_allowed(_host_name(host)):
            name = _host_name(host)
            return await _refuse(send, p.ApiError(
                403, f"this server does not answer to the Host name '{name}'; start it with --allow-host {name} "
                     f"if that name is meant to reach it.", code="host_not_allowed"))
        if scope["method"] in BODY_METHODS:
            given = _header(scope, b"content-type")
            media = (given or "").split(";", 1)[0].strip().lower()
            if media != "application/json":
                said = f"'{given}'" if given else "no Content-Type"
                return await _refuse(send, p.ApiError(
                    415, f"the body must be JSON sent with 'Content-Type: application/json', not {said}.",
                    code="unsupported_media_type"))
        await self.app(scope, receive, send)


class NoTrailingSlash:
    """`/v1/chat/completions/` is served as `/v1/chat/completions`, not redirected: a 307 makes
    some clients drop the body or the key."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and len(path) > 1 and path.endswith("/"):
            scope = {**scope, "path": path.rstrip("/") or "/"}
            if scope.get("raw_path"):
                scope["raw_path"] = scope["raw_path"].rstrip(b"/") or b"/"
        await self.app(scope, receive, send)


class CountRequests:
    """Counts every request by route (the route's template; one label for paths no route
    serves) and by the status it was answered with, refusals before any route included."""

    def __init__(self, app: ASGIApp, routes: list[BaseRoute], count: Callable[[str, str, int], None]) -> None:
        self.app = app
        self.routes = routes
        self.count = count

    def route_of(self, scope: Scope) -> str:
        path = scope["path"].rstrip("/") or "/"
        probe = {**scope, "path": path, "method": "GET"}  # matched by path alone: a 405 still names its route
        for route in self.routes:
            match, _ = route.matches(probe)
            if match is not Match.NONE:
                return route.path
        return UNMATCHED

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 0

        async def counting_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            # 499 (nginx's word): the client left before a status line went out.
            method = scope["method"] if scope["method"] in COUNTED_METHODS else "OTHER"
            self.count(self.route_of(scope), method, status or 499)
