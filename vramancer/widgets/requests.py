"""The server's requests in the console: one line each, as they arrive, stream and end.

A request served over HTTP (`vramancer --serve`) is not the console's own conversation: it is
shown beside it, compact, so a person sees who asks what while still using the prompt. The list
keeps the most recent requests only, and redraws on a timer, never once per token: eight
streams at tens of tokens a second each must not make the screen fall behind.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from rich.text import Text
from textual.widget import Widget

from vramancer.widgets.labels import terminal_safe

if TYPE_CHECKING:
    from vramancer.engine.events import GenerationDone, RequestQueued, RequestRefused

KEPT = 200  # requests remembered; the screen shows as many of the latest as its lines allow
REDRAW_INTERVAL = 0.5  # seconds between redraws while tokens stream: twice a second, as a monitor does
HEAD = 28  # characters of the prompt shown

QUEUED, STREAMING, FINISHED, CANCELLED, REFUSED = "queued", "streaming", "finished", "cancelled", "refused"


@dataclass
class ServedRequest:
    """What the dashboard knows of one server request; updated as its events arrive."""

    request_id: str
    client: str
    prompt_head: str
    prompt_tokens: int
    max_tokens: int
    state: str = QUEUED
    tokens: int = 0
    first_token_at: float | None = None  # when the App received its first tokens
    first_tokens: int = 0  # how many came in that first batch (the rate counts those after it)
    last_token_at: float | None = None
    tokens_per_s: float | None = None  # the engine's decode figure once done, else measured here
    finish_reason: str = ""
    note: str = ""  # why it was refused

    @property
    def active(self) -> bool:
        return self.state in (QUEUED, STREAMING)

    def rate(self) -> float | None:
        """Decode tokens/s: the engine's own once finished, else from the tokens received so far."""
        if self.tokens_per_s is not None:
            return self.tokens_per_s
        if self.first_token_at is not None and self.last_token_at is not None:
            elapsed = self.last_token_at - self.first_token_at
            return (self.tokens - self.first_tokens) / elapsed if elapsed > 0 else None
        return None


class ServerRequests(Widget):
    """The latest server requests, newest at the bottom, one line each: id, who asked, the
    prompt's head, tokens so far (of the most asked for), tok/s, and how it ended."""

    COMPONENT_CLASSES = {"requests--id", "requests--dim", "requests--active", "requests--done",
                         "requests--cancelled", "requests--refused"}

    def __init__(self, clock: Callable[[], float] = time.monotonic, **kwargs) -> None:
        super().__init__(**kwargs)
        self.clock = clock
        self.requests: OrderedDict[str, ServedRequest] = OrderedDict()
        self.total = 0  # requests seen since the dashboard started
        self._redraw_pending = False

    # --- what the App tells it ---------------------------------------------------------------

    def queued(self, event: RequestQueued) -> ServedRequest:
        return self._add(ServedRequest(event.request_id, event.client, event.prompt_head, event.prompt_tokens,
                                       event.max_tokens))

    def _add(self, request: ServedRequest) -> ServedRequest:
        self.requests[request.request_id] = request
        self.total += 1
        self._forget_old()
        self.refresh()
        return request

    def started(self, request_id: str) -> None:
        request = self.requests.get(request_id)
        if request is not None and request.state == QUEUED:
            request.state = STREAMING
            self.refresh()

    def add_tokens(self, request_id: str, count: int) -> None:
        """`count` more tokens of a request (many arrive between two redraws: one redraw for all)."""
        request = self.requests.get(request_id)
        if request is None or not request.active or count <= 0:
            return
        now = self.clock()
        if request.first_token_at is None:
            request.first_token_at, request.first_tokens = now, count
        request.last_token_at = now
        request.tokens += count
        request.state = STREAMING
        if not self._redraw_pending:
            self._redraw_pending = True
            self.set_timer(REDRAW_INTERVAL, self._redraw)

    def done(self, event: GenerationDone) -> ServedRequest:
        request = self.requests.get(str(event.request_id))
        if request is None:  # queued before the dashboard could hear of it: it still gets its line
            request = self._add(ServedRequest(str(event.request_id), "", "", event.prompt_tokens, 0))
        request.tokens = event.new_tokens
        request.tokens_per_s = event.decode_tokens_per_s
        request.finish_reason = event.finish_reason or ("cancelled" if event.cancelled else "stop")
        request.state = CANCELLED if event.cancelled or event.finish_reason == "cancelled" else FINISHED
        self.refresh()
        return request

    def refused(self, event: RequestRefused) -> ServedRequest:
        request = self.requests.get(event.request_id)
        if request is None:  # refused before it was queued (queue full): still worth a line
            request = self._add(ServedRequest(event.request_id, "", "", 0, 0))
        request.state = REFUSED
        request.finish_reason = event.reason
        request.note = event.message
        self.refresh()
        return request

    def _forget_old(self) -> None:
        """Keep the latest KEPT requests, dropping finished ones first (a running one stays)."""
        while len(self.requests) > KEPT:
            oldest_done = next((key for key, r in self.requests.items() if not r.active), None)
            self.requests.pop(oldest_done if oldest_done is not None else next(iter(self.requests)))

    def _redraw(self) -> None:
        self._redraw_pending = False
        self.refresh()

    # --- drawing -------------------------------------------------------------------------------

    @property
    def counts(self) -> tuple[int, int]:
        """(active, ended) among the requests kept."""
        active = sum(1 for r in self.requests.values() if r.active)
        return active, len(self.requests) - active

    def render(self) -> Text:
        height = max(self.content_region.height, 1)
        width = max(self.content_region.width, 20)
        shown = list(self.requests.values())[-(height - 1):] if height > 1 else []
        active, _ = self.counts
        title = Text(no_wrap=True, overflow="ellipsis")
        title.append(f"server · {self.total} requests · {active} active", self.get_component_rich_style("requests--dim"))
        hidden = self.total - len(shown)
        if hidden > 0:
            title.append(f" · {hidden} earlier not shown", self.get_component_rich_style("requests--dim"))
        return Text("\n").join([title, *(self._line(r, width) for r in shown)])

    def _line(self, request: ServedRequest, width: int) -> Text:
        style = self.get_component_rich_style
        line = Text(no_wrap=True, overflow="ellipsis")
        line.append(request.request_id[-8:], style("requests--id"))
        if request.client:
            line.append(f" {request.client}", style("requests--dim"))
        if request.state == REFUSED:
            line.append(f" refused ({request.finish_reason}): {request.note}", style("requests--refused"))
            return line
        rate = request.rate()
        budget = f"/{request.max_tokens}" if request.max_tokens else ""
        figures = f" {request.tokens}{budget} tok" + (f" · {rate:.1f} tok/s" if rate else "")
        ending = {QUEUED: "queued", STREAMING: "streaming",
                  FINISHED: f"finished ({request.finish_reason})", CANCELLED: "cancelled"}[request.state]
        ending_style = {QUEUED: "requests--dim", STREAMING: "requests--active", FINISHED: "requests--done",
                        CANCELLED: "requests--cancelled"}[request.state]
        head = terminal_safe(request.prompt_head.replace("\n", " "))
        head = head if len(head) <= HEAD else head[:HEAD - 1] + "…"
        room = width - len(line) - len(figures) - len(ending) - 6
        if room > 6:
            line.append(f' "{head[:room]}"' if len(head) <= room else f' "{head[:room - 1]}…"')
        line.append(figures)
        line.append(" · ")
        line.append(ending, style(ending_style))
        return line
