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
    """One link (src → dst): its rate in each sampling interval over time (zero when idle), on a
    stated scale and window; the rate now and the peak over the window; bytes carried.

    A rate is the bytes an interval carried over the seconds the link was busy carrying them:
    the transfers' own durations, or the migration's span where a migration ran (its bytes then
    took that long, bookkeeping included, as its logged GB/s says). Never the sampling interval:
    108 MiB moved in 45 ms is 2.4 GB/s, not 108 MiB over a quarter-second sample."""

    COMPONENT_CLASSES = {"linkrow--name", "linkrow--dim", "linkrow--trend"}

    def __init__(self, src: str, dst: str, since: float) -> None:
        super().__init__(classes="link-row")
        self.src, self.dst = src, dst
        # (start, end, bytes, transfer seconds) of each sampling interval, wall-clock times
        self.samples: deque[tuple[float, float, int, float]] = deque(maxlen=HISTORY)
        self.migrations: deque[tuple[float, float, float]] = deque(maxlen=16)  # (start, end, bytes/s) of migrations
        self.rates: list[float] = []  # bytes/s of each interval, from `samples`
        self.last: LinkSnapshot | None = None
        self._since = since  # when the interval before the first sample began (nothing carried then)
        self._trend_width = 0

    def show(self, snap: LinkSnapshot) -> None:
        before = self.last
        start = before.timestamp if before else self._since
        carried = max(snap.bytes - (before.bytes if before else 0), 0)
        busy = max(snap.seconds - (before.seconds if before else 0.0), 0.0)
        self.last = snap
        self.samples.append((start, snap.timestamp, carried, busy))
        self._rate_all()

    def migrated(self, start: float, end: float, rate: float) -> None:
        """A migration ran on this link from `start` to `end` (wall clock) at `rate` bytes/s (its
        bytes over its time): the intervals it overlaps were busy at least that long, and their
        bytes moved no faster than it did, whichever sample got them (a migration that spans
        two samples' boundary gives each only part of its time)."""
        self.migrations.append((start, end, rate))
        self._rate_all()

    def _rate_all(self) -> None:
        self.rates = [self._rate(*sample) for sample in self.samples]
        self.redraw()

    def _rate(self, start: float, end: float, carried: int, busy: float) -> float:
        if not carried:
            return 0.0
        for m_start, m_end, m_rate in self.migrations:
            overlap = min(end, m_end) - max(start, m_start)
            if overlap > 0:
                busy = max(busy, overlap, carried / m_rate if m_rate > 0 else 0.0)
        return carried / busy if busy > 0 else 0.0

    @property
    def rate_now(self) -> float:
        return self.rates[-1] if self.rates else 0.0

    def peak(self, width: int | None = None) -> float:
        """The highest rate the graph shows (the last `width` intervals): it falls as the busy
        intervals leave the window, so the scale follows what the link does now."""
        width = self._trend_width if width is None else width
        return max(self.rates[-width:] if width > 0 else self.rates, default=0.0)

    def window_s(self, width: int) -> float:
        """Seconds the graph stands for at `width` cells (one cell per sample)."""
        return time_axis_s([end - start for start, end, _, _ in self.samples], width)

    def build_lines(self, width: int) -> list[Text]:
        """Line one: the link and its rates; line two, when line one has no room for it, what it
        carried; last, the rate over time with its scale and window (the graph takes what the
        scale leaves)."""
        style = self.component_style
        scale_room = len(" 0–0000.0 MiB/s · 000 s")
        graph_width = width - scale_room if width - scale_room >= MIN_GRAPH else width
        peak = self.peak(graph_width)
        head = Text()
        head.append(f"{self.src} → {self.dst}", style("linkrow--name"))
        items = [head]
        if self.last is not None:
            snap = self.last
            dim = style("linkrow--dim")
            head.append(f"  now {per_second(self.rate_now)}")
            items += [Text(f"peak {per_second(peak)}"),
                      Text(f"{format_bytes(snap.bytes)} in {snap.transfers} transfers", dim),
                      Text(f"last {format_rate(snap.gb_per_s * 1e9)}", dim)]
        lines = fold(items, width)
        top = per_second(peak)
        return [*lines, *trend_lines(width, len(f" 0–{top} · 000 s"),
                                     lambda cells: spark(self.rates, peak, cells), style("linkrow--trend"),
                                     lambda cells: f" 0–{top} · {self.window_s(cells):.0f} s", style("linkrow--dim"),
                                     self._keep_width)]

    def _keep_width(self, cells: int) -> None:
        self._trend_width = cells


DECODE_BIN_S = 1.0  # the tok/s graph's cell: tokens decoded in each second
DECODE_WINDOW_S = 10.0  # each cell's rate is over this many seconds of decoding (see DecodeRow)
MIN_GRAPH = 10  # cells a graph needs beside its scale; fewer, and the scale goes on its own line


def fold(items: list[Text], width: int) -> list[Text]:
    """`items` joined by " · ", as many on each line as fit `width`: a narrow panel gets more
    lines rather than figures cut off."""
    lines: list[Text] = []
    for item in items:
        if lines and len(lines[-1]) + 3 + len(item) <= width:
            lines[-1].append(" · ")
            lines[-1].append_text(item)
        else:
            lines.append(item.copy())
    for line in lines:
        line.no_wrap, line.overflow = True, "ellipsis"
    return lines


def trend_lines(width: int, scale_width: int, graph, graph_style, scale, scale_style, keep=None) -> list[Text]:
    """A graph and its scale: on one line where the graph keeps MIN_GRAPH cells beside the
    scale, else the graph over the whole width and the scale under it. `graph(cells)` and
    `scale(cells)` draw them for a graph `cells` wide; `keep(cells)` is told the width chosen."""
    cells = width - scale_width
    beside = cells >= MIN_GRAPH
    cells = cells if beside else width
    if keep is not None:
        keep(max(cells, 0))
    line = Text(no_wrap=True, overflow="ellipsis")
    line.append(graph(max(cells, 0)), graph_style)
    if beside:
        line.append(scale(cells), scale_style)
        return [line]
    return [line, Text(scale(cells).strip(), scale_style, no_wrap=True, overflow="ellipsis")]


class DecodeRow(LineWidget):
    """Tokens decoded per second over time (every answer and server request together), on a
    stated scale and window, with now and the peak over the window; hidden until the first token.

    Counted from the engine's own clock: each Token says when it left the engine and how many
    tokens its answer had then, so the tokens between two of an answer's Tokens were decoded
    in that span, and are spread over the seconds it covers. The first text of an answer
    starts its clock (the time before it is the prompt's, not decoding). When the App got round
    to drawing them does not enter into it.

    Each second drawn is the rate over the last DECODE_WINDOW_S seconds of decoding: tokens
    decoded in them over the time anything was decoding in them (an idle second counts for
    nothing, and one where nothing decoded is drawn as zero). Second by second, a busy
    machine's rate swings: one-second cells drew peaks ~30 % over the answer's measured rate."""

    COMPONENT_CLASSES = {"linkrow--name", "linkrow--dim", "decoderow--trend"}

    def __init__(self) -> None:
        super().__init__(classes="link-row decode-row")
        self.bins: dict[int, float] = {}  # second (engine's clock // DECODE_BIN_S) → tokens decoded in it
        self.busy: dict[int, float] = {}  # second → seconds of it in which something was decoding
        self._busy_until = float("-inf")  # the end of the latest span counted in `busy`
        self.tokens = 0  # decoded since the dashboard started
        self._answers: dict[int | str, tuple[int, float]] = {}  # request → (tokens so far, when)
        self._now = 0.0  # the latest time the row was told of
        self._drawn_second: int | None = None  # the second the graph was last drawn in
        self._trend_width = 0

    def add(self, request_id: int | str, step: int, at: float) -> None:
        """A Token of `request_id` at `at` (engine's time.monotonic): its answer had `step` tokens
        then (0: not told; the Token counts for one)."""
        before = self._answers.get(request_id)
        count = step - before[0] if step and before else (step if step else 1)
        if before is not None and step and count <= 0:
            return
        self.tokens += count
        self._answers[request_id] = (step if step else (before[0] if before else 0) + 1, at)
        if before is not None and at > before[1]:
            self._spread(count, before[1], at)
        if not self.display:
            self.display = True

    def finish(self, request_id: int | str, new_tokens: int) -> None:
        """The answer is complete with `new_tokens`: count any not yet told (the batch's)."""
        before = self._answers.pop(request_id, None)
        self.tokens += max(new_tokens - (before[0] if before else 0), 0)
        self._drawn_second = None  # the count is final: shown at the next `show`, whatever the second

    def _spread(self, count: int, start: float, end: float) -> None:
        span = end - start
        for cell, overlap in _cells(start, end):
            self.bins[cell] = self.bins.get(cell, 0.0) + count * overlap / span
        # Answers decode together in a batch: their spans overlap, and a second is busy once.
        # Tokens reach the App in the engine's order, so what is new is after `_busy_until`.
        for cell, overlap in _cells(max(start, self._busy_until), end):
            self.busy[cell] = self.busy.get(cell, 0.0) + overlap
        self._busy_until = max(self._busy_until, end)
        oldest = int(end // DECODE_BIN_S) - HISTORY
        for table in (self.bins, self.busy):
            for stale in [c for c in table if c < oldest]:
                del table[stale]

    def rates(self, width: int, now: float) -> list[float]:
        """tok/s of the last `width` whole seconds before `now` (the second under way is not
        finished, so it would read low), each over the DECODE_WINDOW_S seconds up to it."""
        last = int(now // DECODE_BIN_S) - 1
        window = max(int(DECODE_WINDOW_S // DECODE_BIN_S), 1)
        rates = []
        for cell in range(last - width + 1, last + 1):
            if not self.busy.get(cell):
                rates.append(0.0)
                continue
            cells = range(cell - window + 1, cell + 1)
            rates.append(sum(self.bins.get(c, 0.0) for c in cells) / sum(self.busy.get(c, 0.0) for c in cells))
        return rates

    def show(self, now: float) -> None:
        """Time has moved on to `now` (time.monotonic): the graph moves with it. It draws whole
        seconds, so it is drawn again once a second at most, however often tokens arrive (a
        redraw for each batch of a busy server's tokens took the time key presses wait on)."""
        self._now = max(self._now, now)
        second = int(self._now // DECODE_BIN_S)
        if second != self._drawn_second:
            self._drawn_second = second
            self.redraw()

    def peak(self, width: int | None = None, now: float | None = None) -> float:
        width = self._trend_width if width is None else width
        return max(self.rates(max(width, 1), self._now if now is None else now), default=0.0)

    def build_lines(self, width: int) -> list[Text]:
        style = self.component_style
        scale = len(" 0–000.0 tok/s · 000 s")
        self._trend_width = width - scale if width - scale >= MIN_GRAPH else width  # as trend_lines lays it out
        rates = self.rates(max(self._trend_width, 1), self._now)
        now, peak = rates[-1], max(rates)
        head = Text()
        head.append("decode", style("linkrow--name"))
        head.append(f"  now {now:.1f} tok/s")
        items = [head, Text(f"peak {peak:.1f} tok/s"), Text(f"{self.tokens} tokens decoded")]
        return [*fold(items, width), *trend_lines(width, scale, lambda n: spark(rates[-n:] if n else [], peak, n),
                                   style("decoderow--trend"),
                                   lambda n: f" 0–{peak:.1f} tok/s · {n * DECODE_BIN_S:.0f} s", style("linkrow--dim"))]


def _cells(start: float, end: float):
    """(cell, seconds of [start, end) in it) for every DECODE_BIN_S cell the span covers."""
    cell = int(start // DECODE_BIN_S)
    while cell * DECODE_BIN_S < end:
        overlap = min(end, (cell + 1) * DECODE_BIN_S) - max(start, cell * DECODE_BIN_S)
        if overlap > 0:
            yield cell, overlap
        cell += 1


class LinksPanel(VerticalScroll):
    """A row per link that has carried data, appearing as links come into use."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.border_title = "links"
        self.rows: dict[tuple[str, str], LinkRow] = {}
        self.spans: dict[tuple[str, str], list[tuple[float, float, float]]] = {}  # migrations, per link
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
        self.spans = {}
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
                row.migrations.extend(self.spans.get(key, ()))
                self.mount(row, before=self.migration)
                self.note.display = False
            row.show(snap)
        if links:
            self._sampled_at = max(snap.timestamp for snap in links)

    def show_replan_move(self, what: str, src: str, dst: str, nbytes: int) -> None:
        """A move a re-plan made (moved with the rest of the plan, so it has no timing of its own)."""
        self.migration.update(f"last migration: {what} {src} → {dst} · {format_bytes(nbytes)} · by a re-plan")

    def show_migration(self, done: MigrationDone) -> None:
        for src in done.src.split("+"):  # a move gathered from several devices names them all
            key = (src, done.dst)
            span = (done.at - done.seconds, done.at, done.bytes / done.seconds if done.seconds > 0 else 0.0)
            self.spans.setdefault(key, []).append(span)
            if key in self.rows:
                self.rows[key].migrated(*span)
        when = f" at token {done.step}" if done.step is not None else ""
        self.migration.update(
            f"last migration: {part_label(done.first, done.last)} {done.src} → {done.dst} · "
            f"{format_bytes(done.bytes)} in {done.seconds * 1000:.1f} ms · "
            f"{format_rate(done.bytes / done.seconds) if done.seconds > 0 else 'instant'}{when}"
        )
