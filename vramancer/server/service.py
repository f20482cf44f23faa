"""InferenceServer: the HTTP server of one engine worker, on uvicorn, on a thread of its own.

The same object serves `vramancer serve` (headless) and `vramancer --serve` (inside the
dashboard's process, sharing its worker): whoever owns the worker passes `server.on_event` the
worker's events (a fan-out when the dashboard watches them too) and sets `server.submit` to the
worker's `submit`. uvicorn runs on its own thread and loop, so neither the dashboard's loop nor
the CLI's main thread (which keeps the signals) is taken by it.
"""

from __future__ import annotations

import copy
import logging
import queue
import socket
import sys
import threading
import time
from typing import Callable

from vramancer.config.errors import VramancerError
from vramancer.engine import events as ev
from vramancer.server.access import listen
from vramancer.server.bridge import Bridge
from vramancer.server.connections import (
    Limits,
    install_log_filter,
    protocol_class,
    room_for_connections,
)
from vramancer.server.metrics import ServerMetrics
from vramancer.server.routes import create_app

START_TIMEOUT_S = 10.0
GRACEFUL_S = 0.5  # open streams get this long to end when the server stops (the lifetime allows 1.2 s)
DRAIN_POLL_S = 0.05
WORKER_STOP_S = 0.3  # the worker ends what runs within one decode step
FLUSH_S = 0.3  # for the last events of the answers ended at the drain's deadline to be sent


def _refuse_until_started(command: ev.Command) -> None:
    raise VramancerError("the engine has not started yet.")


class InferenceServer:
    """An OpenAI-compatible server over an engine worker's commands and events."""

    def __init__(self, submit: Callable[[ev.Command], None] | None = None, api_key: bytes | None = None,
                 quiet: bool = False, cors_origins: tuple[str, ...] = (), allowed_hosts: tuple[str, ...] = (),
                 limits: Limits | None = None, tokenizer_source: Callable[[], object | None] | None = None) -> None:
        """`submit` sends a command to the worker (settable later, once the worker exists);
        `api_key`: requests to /v1 must carry it as a bearer token; `quiet`: log nothing to the
        terminal (the dashboard owns it); `cors_origins`: web pages allowed to call it;
        `allowed_hosts`: Host names it answers to besides loopback ones and its own address;
        `limits`: connection deadlines and cap; `tokenizer_source`: the loaded engine's
        tokenizer, for /tokenize (settable later, like `submit`)."""
        self.submit = submit or _refuse_until_started
        self.api_key = api_key
        self.quiet = quiet
        self.cors_origins = tuple(cors_origins)
        self.allowed_hosts = tuple(allowed_hosts)
        self.limits = limits or Limits()
        self.tokenizer_source = tokenizer_source or (lambda: None)
        self.tokenizer_lock = threading.Lock()  # one tokenizing request at a time on the server's copy
        self._tokenizer: tuple[object, object] | None = None  # (the engine's, our copy of it)
        self.metrics = ServerMetrics()
        self.bridge = Bridge(self.metrics)
        self.created = int(time.time())
        self.own_host = ""  # set by start: the address it listens on is a Host it answers to
        self.app = None
        self.host = ""
        self.port = 0
        self.max_connections = self.limits.max_connections
        self._uvicorn = None
        self._thread: threading.Thread | None = None
        self.draining = False  # stopping: new requests are refused (503 shutting_down), running ones finish

    def tokenizer(self):
        """A copy of the loaded engine's tokenizer, for the routes' own use: the worker's thread
        encodes and decodes with the original at the same time, and a fast tokenizer changes
        state as it is used. Copied once per loaded model; None before a load."""
        original = self.tokenizer_source()
        if original is None:
            return None
        with self.tokenizer_lock:
            if self._tokenizer is None or self._tokenizer[0] is not original:
                self._tokenizer = (original, copy.deepcopy(original))
            return self._tokenizer[1]

    def on_event(self, event: ev.Event) -> None:
        """The server's event sink: call it with every event the worker emits (any thread)."""
        self.bridge.on_event(event)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def start(self, host: str = "127.0.0.1", port: int = 8000, sock: socket.socket | None = None) -> int:
        """Listen on host:port (0: a free port), or on `sock` already listening there, and serve
        on a thread; returns the port."""
        import uvicorn

        sock = sock or listen(host, port)
        self.host, self.port = host, sock.getsockname()[1]
        self.own_host = host
        self.app = create_app(self)
        limits = self.limits
        self.max_connections = room_for_connections(limits.max_connections)
        if self.max_connections < limits.max_connections and not self.quiet:
            print(f"vramancer: warning: this process may open too few files for {limits.max_connections} connections; "
                  f"taking at most {self.max_connections}.", file=sys.stderr, flush=True)
        install_log_filter(limits.log_interval_s)
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=GRACEFUL_S, log_config=None if self.quiet else
                                uvicorn.config.LOGGING_CONFIG, http=protocol_class(limits, self.max_connections),
                                timeout_keep_alive=limits.keep_alive_s,
                                h11_max_incomplete_event_size=limits.max_header_bytes)
        if self.quiet:  # uvicorn's own messages would draw over the dashboard
            logging.getLogger("uvicorn").addHandler(logging.NullHandler())
            logging.getLogger("uvicorn").propagate = False
        self._uvicorn = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [sock]},
                                        name="vramancer-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise VramancerError(f"the HTTP server on {host}:{self.port} did not start.")
            time.sleep(0.01)
        return self.port

    def drain(self, worker, seconds: float) -> None:
        """Stop gracefully: refuse new requests, let the running ones finish for up to
        `seconds`, then end the rest (each stream gets a last chunk with its finish_reason and
        [DONE]; a whole answer still waited for gets the 503 shutting_down) and stop the worker."""
        self.draining = True
        deadline = time.monotonic() + seconds
        while self.bridge.open_requests and time.monotonic() < deadline:
            time.sleep(DRAIN_POLL_S)
        worker.shutdown(timeout=WORKER_STOP_S)  # what still runs ends, cancelled, with what it made
        deadline = time.monotonic() + FLUSH_S  # their last events reach their handlers
        while self.bridge.open_requests and time.monotonic() < deadline:
            time.sleep(DRAIN_POLL_S / 5)

    def stop(self, timeout: float = 1.0) -> None:
        """Stop listening; streams still open get GRACEFUL_S to finish."""
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)


def run_serve(options, sock: socket.socket, host: str, api_key: bytes | None, max_batch: int,
              ready: Callable[[str], None] = print, cors_origins: tuple[str, ...] = (),
              allowed_hosts: tuple[str, ...] = (), limits: Limits | None = None, drain_s: float = 5.0) -> int:
    """`vramancer serve`: listen at once (GET /health answers 503 while the model loads), load,
    say so in one line, and serve until SIGTERM, SIGINT, SIGHUP or a closed terminal, then drain
    (`InferenceServer.drain`, up to `drain_s`). A model that cannot load ends it with the load's
    one sentence and status 2."""
    from vramancer.engine.worker import EngineWorker
    from vramancer.platforms.lifetime import DEADLINE_S, Lifetime

    server = InferenceServer(api_key=api_key, cors_origins=cors_origins, allowed_hosts=allowed_hosts, limits=limits)
    server.start(host, sock.getsockname()[1], sock)

    happenings: queue.Queue = queue.Queue()  # Loaded, or a failed Load

    def emit(event: ev.Event) -> None:
        server.on_event(event)
        if isinstance(event, ev.Loaded) or (isinstance(event, ev.Error) and event.command == "Load"):
            happenings.put(event)

    worker = EngineWorker(emit, max_batch=max_batch)
    server.submit = worker.submit
    server.tokenizer_source = lambda: getattr(worker.engine, "tokenizer", None)
    stop_reasons: list[str] = []  # a signal handler only appends (takes no lock a waiting thread could hold)
    # The drain's deadline comes first; the lifetime's forced exit only past it.
    lifetime = Lifetime(stop_reasons.append, deadline_s=drain_s + DEADLINE_S).install()
    lifetime.watch_terminal()
    worker.start()
    worker.submit(ev.Load(options))
    status = 0
    try:
        while not stop_reasons:
            try:
                happening = happenings.get(timeout=0.1)
            except queue.Empty:
                continue
            if isinstance(happening, ev.Loaded):
                kind = " (simulated)" if happening.simulated else ""
                devices = ", ".join(d.name for d in happening.devices)
                ready(f"vramancer: serving {happening.model} on {server.url} · devices {devices}{kind} · "
                      f"max batch {max_batch} · metrics on {server.url.removesuffix('/v1')}/metrics")
            elif isinstance(happening, ev.Error):
                print(f"vramancer: {happening.message}", file=sys.stderr)
                status = 2
                break
    finally:
        server.drain(worker, drain_s if stop_reasons else 0.0)
        server.stop(GRACEFUL_S + 0.2)
        lifetime.uninstall()
    return status
