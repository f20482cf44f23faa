"""From the engine worker's threads to the server's event loop.

The worker calls `emit` on its own thread (and the telemetry's). `Bridge.on_event` routes a
request's events to that request's asyncio queue with `loop.call_soon_threadsafe`, keyed by
request_id, and keeps what the routes ask about the engine: is a model loaded, under which
name. It also records each request's outcome and latencies as its events arrive, so a request
whose client went away (its handler gone) is still counted when the engine lets it go.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from vramancer.engine import events as ev
from vramancer.server.metrics import ServerMetrics

REQUEST_EVENTS = (ev.RequestQueued, ev.RequestStarted, ev.PromptScored, ev.Token, ev.GenerationDone,
                  ev.RequestRefused)


@dataclass
class RequestStream:
    """One request's events, in order, on the server's loop; each stamped when it arrived."""

    loop: asyncio.AbstractEventLoop
    started: float = field(default_factory=time.perf_counter)  # when the HTTP request was read
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    heard: bool = False  # any event arrived for it (a Submit error without an id goes to the unheard)
    first_token: float | None = None
    last_token: float | None = None

    def put(self, event: ev.Event, at: float) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (at, event))
        except RuntimeError:
            pass  # the server's loop is closed: nobody is left to read it

    async def next(self) -> tuple[float, ev.Event]:
        return await self.queue.get()


@dataclass(frozen=True)
class ModelState:
    """What the server knows of the engine: nothing yet, loading, loaded (with names), or failed."""

    name: str | None = None  # the loaded model's display name
    loading: bool = True
    error: str | None = None  # why the last load failed

    @property
    def ready(self) -> bool:
        return self.name is not None

    def names(self) -> tuple[str, ...]:
        """The names a request may use: the display name and its short id (lower case, without
        the file's quantisation suffix: "SmolLM2-135M-Instruct.Q4_1" -> "smollm2-135m-instruct")."""
        if self.name is None:
            return ()
        return (self.name, short_id(self.name))


def short_id(name: str) -> str:
    return name.split(".", 1)[0].lower() or name.lower()


class Bridge:
    """The server's event sink: requests' events to their queues, the rest to state and metrics."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.model = ModelState()
        self._streams: dict[str, RequestStream] = {}
        self._lock = threading.Lock()  # the worker's thread adds events while the loop opens streams

    def open(self, request_id: str) -> RequestStream:
        """Called on the server's loop before the request is submitted, so no event is missed."""
        stream = RequestStream(asyncio.get_running_loop())
        with self._lock:
            self._streams[request_id] = stream
        return stream

    def forget(self, request_id: str) -> None:
        """The request will never be answered (it could not even be submitted)."""
        with self._lock:
            self._streams.pop(request_id, None)

    @property
    def open_requests(self) -> int:
        with self._lock:
            return len(self._streams)

    def on_event(self, event: ev.Event) -> None:
        """Any thread. Cheap: a dictionary look-up and a hand-over to the loop."""
        at = time.perf_counter()
        if isinstance(event, REQUEST_EVENTS):
            self._request_event(event, at)
        elif isinstance(event, ev.Loaded):
            self.model = ModelState(event.model, loading=False)
        elif isinstance(event, ev.LoadProgress):
            if not self.model.loading:
                self.model = ModelState(self.model.name, loading=True)
        elif isinstance(event, ev.Error):
            self._error(event, at)
        self.metrics.on_event(event)

    def _request_event(self, event, at: float) -> None:
        final = isinstance(event, (ev.GenerationDone, ev.RequestRefused))
        with self._lock:
            stream = self._streams.pop(event.request_id, None) if final else self._streams.get(event.request_id)
        if stream is None:
            return  # not one of ours (the dashboard's console), or already answered
        stream.heard = True
        m = self.metrics
        if isinstance(event, ev.Token):
            if stream.first_token is None:
                stream.first_token = at
                m.ttft.observe(at - stream.started)
            else:
                m.inter_token.observe(at - stream.last_token)
            stream.last_token = at
        elif isinstance(event, ev.GenerationDone):
            m.requests.labels(event.finish_reason or ("cancelled" if event.cancelled else "stop")).inc()
            m.tokens.inc(event.new_tokens)
            m.prompt_tokens.inc(event.prompt_tokens)
            m.duration.observe(at - stream.started)
        elif isinstance(event, ev.RequestRefused):
            m.requests.labels(event.reason).inc()
        stream.put(event, at)

    def _error(self, event: ev.Error, at: float) -> None:
        if event.command == "Load":
            self.model = ModelState(self.model.name, loading=False, error=event.message)
        elif event.command == "Submit":
            # The worker could not take a Submit at all; the error names no request, so every
            # request still waiting for its first word gets it.
            with self._lock:
                unheard = {rid: s for rid, s in self._streams.items() if not s.heard}
                for rid in unheard:
                    del self._streams[rid]
            for stream in unheard.values():
                self.metrics.requests.labels("error").inc()
                stream.put(event, at)
