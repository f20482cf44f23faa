"""The #links panel: every device-to-device link that has carried data, and the last migration."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widget import Widget
from textual.widgets import Static

from vramancer.engine.units import format_bytes, format_rate
from vramancer.widgets.charts import spark
from vramancer.widgets.labels import part_label

if TYPE_CHECKING:
    from vramancer.engine.events import LinkSnapshot, MigrationDone


HISTORY = 240


class LinkRow(Widget):
    """One link (src → dst): bandwidth over time, last and peak GB/s, bytes carried."""

    COMPONENT_CLASSES = {"linkrow--name", "linkrow--dim", "linkrow--trend"}

    def __init__(self, src: str, dst: str) -> None:
        super().__init__(classes="link-row")
        self.src, self.dst = src, dst
        self.rates: deque[float] = deque(maxlen=HISTORY)
        self.peak = 0.0
        self.last: LinkSnapshot | None = None

    def show(self, snap: LinkSnapshot) -> None:
        self.last = snap
        self.rates.append(snap.gb_per_s)
        self.peak = max(self.peak, snap.gb_per_s)
        self.refresh()

    def get_content_height(self, container, viewport, width: int) -> int:
        return 2

    def render(self) -> Text:
        """Line one: the link and its rates. Line two: bytes carried, then GB/s over time."""
        style = self.get_component_rich_style
        width = max(self.content_region.width, 10)
        rates = Text(no_wrap=True, overflow="ellipsis")
        rates.append(f"{self.src} → {self.dst}", style("linkrow--name"))
        carried = Text(no_wrap=True, overflow="ellipsis")
        if self.last is not None:
            snap = self.last
            rates.append(f"  last {format_rate(snap.gb_per_s * 1e9)} · peak {format_rate(self.peak * 1e9)}")
            carried.append(f"{format_bytes(snap.bytes)} · {snap.transfers} transfers ", style("linkrow--dim"))
        carried.append(spark(self.rates, self.peak, width - len(carried)), style("linkrow--trend"))
        return Text("\n").join([rates, carried])


class LinksPanel(VerticalScroll):
    """A row per link that has carried data, appearing as links come into use."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.border_title = "links"
        self.rows: dict[tuple[str, str], LinkRow] = {}
        self.note = Static("no data has crossed a link yet", classes="links-empty")
        self.migration = Static("", classes="last-migration")

    def compose(self) -> ComposeResult:
        yield self.note
        yield self.migration

    async def reset(self) -> None:
        """A new model brings new links: forget the old ones."""
        await self.query(LinkRow).remove()
        self.rows = {}
        self.note.display = True
        self.migration.update("")

    def show_sample(self, links: tuple[LinkSnapshot, ...]) -> None:
        for snap in links:
            if snap.transfers == 0:
                continue
            key = (snap.src, snap.dst)
            row = self.rows.get(key)
            if row is None:
                row = self.rows[key] = LinkRow(snap.src, snap.dst)
                self.mount(row, before=self.migration)
                self.note.display = False
            row.show(snap)

    def show_migration(self, done: MigrationDone) -> None:
        when = f" at token {done.step}" if done.step is not None else ""
        self.migration.update(
            f"last migration: {part_label(done.first, done.last)} {done.src} → {done.dst} · "
            f"{format_bytes(done.bytes)} in {done.seconds * 1000:.1f} ms · "
            f"{format_rate(done.bytes / done.seconds) if done.seconds > 0 else 'instant'}{when}"
        )
