"""The #links panel: tokens decoded per second, every device-to-device link that has carried
data, and the last migration."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Static

from vramancer.config.units import format_bytes, format_rate
from vramancer.widgets.charts import spark, time_axis_s
from vramancer.widgets.labels import part_label
from vramancer.widgets.lines import LineWidget

if TYPE_CHECKING:
    from vramancer.engine.events import LinkSnapshot, MigrationDone


HISTORY = 240


def per_second(nbytes: float) -> str:
    """Bytes per second of a sampling interval: small rates stay readable ("867 KiB/s", "0 B/s")."""
    return f"{format_bytes(round(nbytes))}/s"


class LinkRow(LineWidget):
    """One link (src → dst): bytes/s in each sampling interval over time (zero when idle), on a
    stated scale and window; the last transfers' rate and the peak; bytes carried."""

    COMPONENT_CLASSES = {"linkrow--name", "linkrow--dim", "linkrow--trend"}

    def __init__(self, src: str, dst: str, since: float) -> None:
        super().__init__(classes="link-row")
        self.src, self.dst = src, dst
        self.rates: deque[float] = deque(maxlen=HISTORY)  # bytes/s in each interval
        self.intervals: deque[float] = deque(maxlen=HISTORY)  # seconds each interval lasted
        self.peak = 0.0
        self.last: LinkSnapshot | None = None
        self._since = since  # when the interval before the first sample began (nothing carried then)
        self._trend_width = 0

    def show(self, snap: LinkSnapshot) -> None:
        before_bytes, before_time = (self.last.bytes, self.last.timestamp) if self.last else (0, self._since)
        seconds = max(snap.timestamp - before_time, 1e-3)
        rate = max(snap.bytes - before_bytes, 0) / seconds
        self.last = snap
        self.rates.append(rate)
        self.intervals.append(seconds)
        self.peak = max(self.peak, rate)
        self.redraw()

    @property
    def rate_now(self) -> float:
        return self.rates[-1] if self.rates else 0.0

    def window_s(self, width: int) -> float:
        """Seconds the graph stands for at `width` cells (one cell per sample)."""
        return time_axis_s(self.intervals, width)

    def build_lines(self, width: int) -> list[Text]:
        """Line one: the link, its rates and what it carried. Line two: bytes/s over time, with
        its scale and window after it (the graph takes what the scale leaves)."""
        style = self.component_style
        rates = Text(no_wrap=True, overflow="ellipsis")
        rates.append(f"{self.src} → {self.dst}", style("linkrow--name"))
        if self.last is not None:
            snap = self.last
            rates.append(f"  now {per_second(self.rate_now)} · peak {per_second(self.peak)} · ")
            rates.append(f"{format_bytes(snap.bytes)} in {snap.transfers} transfers · "
                         f"last {format_rate(snap.gb_per_s * 1e9)}", style("linkrow--dim"))
        graph = Text(no_wrap=True, overflow="ellipsis")
        top = per_second(self.peak)
        self._trend_width = max(width - len(f" 0–{top} · 000 s"), 0)
        graph.append(spark(self.rates, self.peak, self._trend_width), style("linkrow--trend"))
        graph.append(f" 0–{top} · {self.window_s(self._trend_width):.0f} s", style("linkrow--dim"))
        return [rates, graph]


class DecodeRow(LineWidget):
    """Tokens decoded per second over time (every answer and server request together), on a
    stated scale and window, with now and peak; hidden until the first token."""

    COMPONENT_CLASSES = {"linkrow--name", "linkrow--dim", "decoderow--trend"}

    def __init__(self) -> None:
        super().__init__(classes="link-row decode-row")
        self.rates: deque[float] = deque(maxlen=HISTORY)  # tokens/s in each interval
        self.intervals: deque[float] = deque(maxlen=HISTORY)
        self.peak = 0.0
        self.tokens = 0  # decoded since the dashboard started
        self._counted: tuple[int, float] | None = None  # (tokens, when) at the previous reading
        self._trend_width = 0

    def show(self, tokens: int, now: float) -> None:
        """The running count of decoded tokens at `now` (seconds): one more interval of the graph."""
        before = self._counted
        self._counted = (tokens, now)
        self.tokens = tokens
        if before is None or now <= before[1]:
            return
        rate = (tokens - before[0]) / (now - before[1])
        self.rates.append(rate)
        self.intervals.append(now - before[1])
        self.peak = max(self.peak, rate)
        if tokens and not self.display:
            self.display = True
        self.redraw()

    def build_lines(self, width: int) -> list[Text]:
        style = self.component_style
        now = self.rates[-1] if self.rates else 0.0
        head = Text(no_wrap=True, overflow="ellipsis")
        head.append("decode", style("linkrow--name"))
        head.append(f"  now {now:.1f} tok/s · peak {self.peak:.1f} tok/s · {self.tokens} tokens decoded")
        graph = Text(no_wrap=True, overflow="ellipsis")
        self._trend_width = max(width - len(f" 0–{self.peak:.1f} tok/s · 000 s"), 0)
        window = time_axis_s(self.intervals, self._trend_width)
        graph.append(spark(self.rates, self.peak, self._trend_width), style("decoderow--trend"))
        graph.append(f" 0–{self.peak:.1f} tok/s · {window:.0f} s", style("linkrow--dim"))
        return [head, graph]


class LinksPanel(VerticalScroll):
    """A row per link that has carried data, appearing as links come into use."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.border_title = "links"
        self.rows: dict[tuple[str, str], LinkRow] = {}
        self._sampled_at: float | None = None  # when the previous sample was taken
        self.note = Static("no data has crossed a link yet", classes="links-empty")
        self.migration = Static("", classes="last-migration")
        self.decode = DecodeRow()
        self.decode.display = False

    def compose(self) -> ComposeResult:
        yield self.decode
        yield self.note
        yield self.migration

    async def reset(self) -> None:
        """A new model brings new links: forget the old ones."""
        await self.query(LinkRow).remove()
        self.rows = {}
        self._sampled_at = None
        self.note.display = True
        self.migration.update("")

    def show_sample(self, links: tuple[LinkSnapshot, ...]) -> None:
        for snap in links:
            if snap.transfers == 0:
                continue
            key = (snap.src, snap.dst)
            row = self.rows.get(key)
            if row is None:
                since = self._sampled_at if self._sampled_at is not None else snap.timestamp - 0.5
                row = self.rows[key] = LinkRow(snap.src, snap.dst, since)
                self.mount(row, before=self.migration)
                self.note.display = False
            row.show(snap)
        if links:
            self._sampled_at = max(snap.timestamp for snap in links)

    def show_replan_move(self, what: str, src: str, dst: str, nbytes: int) -> None:
        """A move a re-plan made (moved with the rest of the plan, so it has no timing of its own)."""
        self.migration.update(f"last migration: {what} {src} → {dst} · {format_bytes(nbytes)} · by a re-plan")

    def show_migration(self, done: MigrationDone) -> None:
        when = f" at token {done.step}" if done.step is not None else ""
        self.migration.update(
            f"last migration: {part_label(done.first, done.last)} {done.src} → {done.dst} · "
            f"{format_bytes(done.bytes)} in {done.seconds * 1000:.1f} ms · "
            f"{format_rate(done.bytes / done.seconds) if done.seconds > 0 else 'instant'}{when}"
        )
