"""The #events panel: a running log of what the engine did, one line per event."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from rich.text import Text
from textual.widgets import RichLog

from vramancer.config.units import format_bytes, format_rate
from vramancer.widgets.labels import part_label

if TYPE_CHECKING:
    from vramancer.engine import events as ev
    from vramancer.widgets.requests import ServedRequest


def describe_plan(plan: ev.PlanSnapshot) -> str:
    """The placement in model order, e.g. "embed sim0 · L0–14 sim0 · L15–29 sim1 · head sim1"."""
    parts = [f"embed {plan.embed}"] + [f"{b.label} {b.device}" for b in plan.blocks] + [f"head {plan.head}"]
    return " · ".join(parts)


def describe(event: ev.Event) -> tuple[str, str] | None:
    """(line, style) for an event worth a line in the log; None for the ones that are not."""
    from vramancer.engine import (
        events as ev,  # events arrive once the engine is imported
    )

    if isinstance(event, ev.Loaded):
        pool = " (simulated)" if event.simulated else ""
        return (f"loaded {event.model} · {event.dtype} · context {event.context} · "
                f"{len(event.devices)} devices{pool}", "bold")
    if isinstance(event, ev.PlanChanged):
        return f"plan ({event.plan.strategy}): {describe_plan(event.plan)}", ""
    if isinstance(event, ev.MigrationStarted):
        return f"moving {part_label(event.first, event.last)} → {event.device}…", "dim"
    if isinstance(event, ev.MigrationDone):
        rate = format_rate(event.bytes / event.seconds) if event.seconds > 0 else "instant"
        when = f" at token {event.step}" if event.step is not None else ""
        why = f" ({event.reason})" if event.reason else ""
        return (f"moved {part_label(event.first, event.last)} {event.src} → {event.dst} · "
                f"{format_bytes(event.bytes)} in {event.seconds * 1000:.1f} ms · {rate}{when}{why}", "green")
    if isinstance(event, ev.MigrationNotDone):
        return f"refused {part_label(event.first, event.last)} → {event.device}: {event.reason}", "yellow"
    if isinstance(event, ev.GenerationDone):
        if isinstance(event.request_id, str):
            return None  # a server request: the App logs its outcome with who asked (request_outcome)
        rate = f" · {event.decode_tokens_per_s:.1f} tok/s" if event.decode_tokens_per_s else ""
        verb = "cancelled after" if event.cancelled else "answered"
        return f"{verb} {event.new_tokens} tokens{rate}", "dim"
    if isinstance(event, ev.Notice):
        return event.message, "yellow"
    if isinstance(event, ev.Error):
        return f"{event.command} failed: {event.message}", "bold red"
    return None


def request_outcome(request: ServedRequest, total_s: float | None = None) -> tuple[str, str]:
    """(line, style) for how a server request ended: id, who asked, tokens, finish reason."""
    who = f" from {request.client}" if request.client else ""
    if request.note:  # refused
        return f"request {request.request_id}{who} refused ({request.finish_reason}): {request.note}", "yellow"
    took = f" in {total_s:.2f} s" if total_s is not None else ""
    return (f"request {request.request_id}{who} · {request.tokens} tokens{took} · {request.finish_reason}",
            "dim" if request.finish_reason != "cancelled" else "yellow")


MAX_ENTRIES = 1000


class EventsLog(RichLog):
    """Engine events as they happen, plus the dashboard's own notes (exports, refusals).

    RichLog wraps a line once, at the width it has when written; the entries are kept so that a
    resize wraps them all again at the new width (no lines cut mid-word, no sideways scrolling)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(wrap=True, markup=False, max_lines=MAX_ENTRIES, min_width=10, **kwargs)
        self.border_title = "events"
        self.entries: deque[tuple[str, str]] = deque(maxlen=MAX_ENTRIES)
        self._wrapped_at = 0

    def show(self, event: ev.Event) -> None:
        line = describe(event)
        if line is not None:
            self.note(*line)

    def note(self, text: str, style: str = "") -> None:
        self.entries.append((text, style))
        self.write(Text(text, style=style))

    def on_resize(self) -> None:
        width = self.scrollable_content_region.width
        if width == self._wrapped_at:
            return
        self._wrapped_at = width
        if self.entries:
            self.clear()
            for text, style in self.entries:
                self.write(Text(text, style=style))
