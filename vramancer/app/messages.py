"""Engine events, wrapped as Textual messages so they reach the App thread.

The engine calls `emit` on its own threads; the App turns each event into one of these and
`post_message`s it (thread-safe). Telemetry arrives several times a second and tokens arrive
hundreds of times a second, so those messages say they may be replaced by a newer one of their
kind (toolong's pattern): a busy UI handles the latest, never a backlog.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.message import Message

if TYPE_CHECKING:
    from vramancer.engine import events as ev


class EngineEvent(Message):
    """Any engine event that must be handled one by one (load, plan, migration, errors)."""

    def __init__(self, event: ev.Event) -> None:
        super().__init__()
        self.event = event


class DevicesSampled(Message):
    """The latest device telemetry; an older one still queued is dropped."""

    def __init__(self, sample: ev.DeviceSample) -> None:
        super().__init__()
        self.sample = sample

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, DevicesSampled)


class LinksSampled(Message):
    """The latest link telemetry; an older one still queued is dropped."""

    def __init__(self, sample: ev.LinkSample) -> None:
        super().__init__()
        self.sample = sample

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, LinksSampled)


class TokensReady(Message):
    """Tokens are waiting in the App's token buffer. Carries no text itself, so any number of
    these collapse into one and the handler drains everything buffered so far."""

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, TokensReady)
