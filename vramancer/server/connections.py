"""How long a client may hold a connection, and how many may be open at once.

uvicorn closes a connection idle between two requests after `timeout_keep_alive`, and h11
bounds the size of a request's headers (`h11_max_incomplete_event_size`); both are used as
they are. What uvicorn lacks is added here, on its own h11 protocol class:
- a header deadline: from connecting (or from the previous answer) to the end of the
  request's headers. A socket that never sends a byte, or sends its headers a byte a second
  (slowloris), is closed when it passes; partial headers get a 408 first.
- a cap on open connections, checked when a connection is accepted: one more is answered
  with a 503 at once and closed, so a flood never takes every file descriptor (uvicorn's
  `limit_concurrency` only refuses once a request has been read, holding the socket until
  then, and logs each refusal). The refusals are logged once per interval, with their count.
- malformed HTTP is answered with an OpenAI error object instead of uvicorn's plain text.
The body deadline is the routes' (`routes._read_json`), which can answer a 408 in the open.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from vramancer.server.protocol import ApiError

log = logging.getLogger("uvicorn.error")  # the server's log: uvicorn's handlers already print it
FD_RESERVE = 64  # descriptors kept for everything else: model files, the worker, telemetry


@dataclass(frozen=True)
class Limits:
    """Connection deadlines (seconds) and the connection cap of one server."""

    max_connections: int = 1024
    keep_alive_s: float = 5.0  # idle between two requests on one connection
    header_s: float = 10.0  # to the end of a request's headers
    body_s: float = 30.0  # from the headers to the end of the body
    max_header_bytes: int = 16 * 1024
    log_interval_s: float = 10.0  # a message that repeats is logged at most this often


class RateLimitedLog(logging.Filter):
    """Lets each kind of message (its template, before arguments) through once per interval;
    the next one that passes says how many like it were held back. A flood of bad requests
    or refused connections then costs a line every few seconds, not a line each."""

    def __init__(self, interval_s: float) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._seen: dict[str, tuple[float, int]] = {}  # template -> (last let through, held back since)

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)
        now = time.monotonic()
        last, held = self._seen.get(key, (-math.inf, 0))
        if now - last < self.interval_s:
            self._seen[key] = (last, held + 1)
            return False
        self._seen[key] = (now, 0)
        if held:
            record.msg = f"{record.getMessage()} ({held} more like it were not logged)"
            record.args = ()
        return True


def install_log_filter(interval_s: float) -> None:
    """One rate limit on the server's log per process, however many servers run in it."""
    if not any(isinstance(f, RateLimitedLog) for f in log.filters):
        log.addFilter(RateLimitedLog(interval_s))


def room_for_connections(wanted: int) -> int:
    """The connection cap that fits this process's descriptor limit, raising the soft limit
    towards the hard one when that makes room (as servers commonly do)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        in_use = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else FD_RESERVE
    except (OSError, ValueError):
        return wanted
    needed = wanted + in_use + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - in_use - FD_RESERVE))


def raw_error(error: ApiError, reason: str) -> bytes:
    """A whole HTTP/1.1 error response, for answers written before or outside h11's request cycle."""
    body = json.dumps(error.body()).encode()
    head = (f"HTTP/1.1 {error.status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("latin-1") + body


def protocol_class(limits: Limits, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the header deadline and the connection cap of `limits`."""
    busy = raw_error(ApiError(503, f"the server holds {max_connections} open connections, as many as it takes; "
                                   f"try again shortly.", "server_error", code="too_many_connections"),
                     "Service Unavailable")
    too_slow = raw_error(ApiError(408, f"the request's headers did not arrive within {limits.header_s:g} s.",
                                  code="request_timeout"), "Request Timeout")

    class GuardedH11Protocol(H11Protocol):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._refused = False
            self._header_deadline = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            if len(self.server_state.connections) >= max_connections:
                self._refused = True
                transport.write(busy)
                transport.close()
                log.warning("refused a connection: %d are open, the most this server takes (--max-connections).",
                            max_connections)
                return
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc) -> None:
            if self._refused:
                return  # never counted among the connections: nothing to undo
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()  # the headers are in; the body's deadline is the route's

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's headers get the same time

        def send_400_response(self, msg: str) -> None:
            """Malformed HTTP (or headers over the size limit): an OpenAI error, then close."""
            self._disarm()
            body = json.dumps(ApiError(400, "the request is not valid HTTP/1.1 (or its headers are over "
                                            f"{limits.max_header_bytes // 1024} KiB).").body()).encode()
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            try:
                self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request")))
                self.transport.write(self.conn.send(h11.Data(data=body)))
                self.transport.write(self.conn.send(h11.EndOfMessage()))
            except h11.LocalProtocolError:
                pass  # h11 will not answer in this state: closing says enough
            self.transport.close()

        def _arm(self) -> None:
            self._disarm()
            self._header_deadline = self.loop.call_later(limits.header_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _headers_too_slow(self) -> None:
            self._header_deadline = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self.conn.trailing_data[0]:  # part of a request came: say why it ends
                self.transport.write(too_slow)
            self.transport.close()

    return GuardedH11Protocol
