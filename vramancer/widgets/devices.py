"""The #devices panel: one card per device with its memory split, readings and trend, and a row
per host or disk tier that layers stream from (docs/usage/offload.md)."""

from __future__ import annotations

from collections import deque
from itertools import islice
from typing import TYPE_CHECKING

from rich.text import Text
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message
from textual.widget import Widget

from vramancer.config.units import format_bytes
from vramancer.widgets.charts import spark, time_axis_s
from vramancer.widgets.lines import LineWidget

if TYPE_CHECKING:
    from vramancer.engine.events import DeviceInfo, DeviceSnapshot, TierSnapshot


UNKNOWN = "—"
HISTORY = 240  # readings kept for the trends: four minutes at the dashboard's 1 Hz

# The parts a device's memory is split into on screen: (label, snapshot field, style).
MEMORY_PARTS = (("weights", "weights", "devicecard--weights"), ("KV", "kv", "devicecard--kv"),
                ("reserved", "reserved", "devicecard--reserved"),
                ("other processes", "other", "devicecard--other"), ("free", "free", "devicecard--free"))


def memory_parts(snap: DeviceSnapshot) -> list[tuple[str, int, str]]:
    """Each part's label, its bytes in `snap`, and its style."""
    return [(label, getattr(snap, field), style) for label, field, style in MEMORY_PARTS]


# How much a card shows, by the room the panel has for each device (lines per card).
FULL, TWO_LINES, ONE_LINE = "full", "two", "one"
FULL_HEIGHT = 8  # title, bar, legend (up to two lines), memory trend, utilisation trend, margin
# One-line cards go two to a line where more devices than lines would otherwise scroll and each
# half of the panel still holds a name, a bar of a few cells and "100%".
TWO_UP_WIDTH = 2 * 22 + 2
# Two-line cards draw memory and utilisation side by side: narrower, each graph is a cell or
# two, and one line per device (bar and share) says more.
TWO_LINE_WIDTH = 40


def reading(value: float | None, unit: str, digits: int = 0) -> str:
    """A telemetry number with its unit, or "—" when the device cannot tell."""
    return UNKNOWN if value is None else f"{value:.{digits}f}{unit}"



def trend_window_s(read_at, width: int) -> float:
    """Seconds a trend of `width` cells stands for, one reading per cell, from the readings' times."""
    return time_axis_s([b - a for a, b in zip(read_at, islice(read_at, 1, None))], width)

class DeviceCard(LineWidget):
    """One device: what it is, how its memory is split, how busy it is, and memory over time.

    A single widget of lines rather than a tree of labels: it takes a reading every second, its
    bar is sized to the width it is given, and a reading repaints only the lines it changes."""

    COMPONENT_CLASSES = {
        "devicecard--name",
        "devicecard--kind",
        "devicecard--weights",
        "devicecard--kv",
        "devicecard--reserved",
        "devicecard--other",
        "devicecard--free",
        "devicecard--dim",
        "devicecard--trend",
        "devicecard--util",
    }

    def __init__(self, info: DeviceInfo) -> None:
        super().__init__(classes="device-card")
        self.info = info
        self.snapshot: DeviceSnapshot | None = None
        self.used_history: deque[float] = deque(maxlen=HISTORY)
        # Each memory part over time, for the device's detail (label → bytes per reading).
        self.part_history: dict[str, deque[int]] = {label: deque(maxlen=HISTORY) for label, _, _ in MEMORY_PARTS}
        self.util_history: deque[float] = deque(maxlen=HISTORY)  # empty while the device cannot tell
        self.read_at: deque[float] = deque(maxlen=HISTORY)  # when each reading was taken
        self.mode = FULL
        self._trend_width = 0  # cells of the memory trend as last drawn
        self.name_width = len(info.name)  # the longest device name, so one-line bars line up

    def set_mode(self, mode: str, name_width: int) -> None:
        if (mode, name_width) != (self.mode, self.name_width):
            self.mode, self.name_width = mode, name_width
            self.set_class(mode != FULL, "-compact")
            self.rebuild()

    def show(self, snapshot: DeviceSnapshot) -> None:
        """A new reading: repaint only the lines it changes (a steady device costs nothing at
        idle once its trends are full), and lay out again only if the card's height changed."""
        self.snapshot = snapshot
        self.used_history.append(float(snapshot.used))
        for label, nbytes, _ in memory_parts(snapshot):
            self.part_history[label].append(nbytes)
        if snapshot.utilization is not None:
            self.util_history.append(snapshot.utilization)
        self.read_at.append(snapshot.timestamp)
        self.redraw()

    def build_lines(self, width: int) -> list[Text]:
        """The card's lines at `width` cells; the legend takes two lines when one is too narrow."""
        style = self.component_style
        info, snap = self.info, self.snapshot
        kind = "simulated" if info.simulated else info.label
        total = format_bytes(snap.total if snap else info.total)
        title = Text(no_wrap=True, overflow="ellipsis")
        title.append(info.name, style("devicecard--name"))
        title.append(f"  {kind}", style("devicecard--kind"))
        title.append(" " * max(width - len(info.name) - 2 - len(kind) - len(total), 1))
        title.append(total)
        if self.mode == ONE_LINE:
            return [self._one_line(width)]
        if snap is None:
            return [title, Text("waiting for the first reading…", style("devicecard--dim"))]
        if self.mode == TWO_LINES:  # the panel's subtitle states the trends' scale and window
            return [self._one_line(width), self._trends(snap, width)]
        legend = self._legend(snap)
        legend_lines: list[Text] = []  # as many items on each line as fit
        for item in legend:
            if legend_lines and len(legend_lines[-1]) + 1 + len(item) <= width:
                legend_lines[-1] = Text(" ").join([legend_lines[-1], item])
            else:
                legend_lines.append(item)
        return [title, self._bar(snap, width), *legend_lines, *self._trend_lines(snap, width)]

    def _trend_lines(self, snap: DeviceSnapshot, width: int) -> list[Text]:
        """Memory and utilisation over time, each with its scale and window (the full card)."""
        style = self.component_style
        others = [f"{name} {reading(value, unit)}" for name, value, unit in
                  (("temp", snap.temperature, "°C"), ("power", snap.power, " W")) if value is not None]
        extra = ("  " + "  ".join(others)) if others else ""
        memory = Text(no_wrap=True, overflow="ellipsis")
        memory.append("mem  ", style("devicecard--dim"))
        top = format_bytes(snap.total)
        self._trend_width = max(width - 5 - len(f" 0–{top} · 000 s"), 0)
        scale = f" 0–{top} · {self._window_s():.0f} s"
        memory.append(spark(self.used_history, snap.total, self._trend_width), style("devicecard--trend"))
        memory.append(scale, style("devicecard--dim"))
        util = Text(no_wrap=True, overflow="ellipsis")
        util.append("util ", style("devicecard--dim"))
        if snap.utilization is None:
            util.append(self._no_utilisation(), style("devicecard--dim"))
            util.append(extra, style("devicecard--dim"))
        else:
            util_scale = f" 0–100 % · now {snap.utilization:.0f} %{extra}"
            util.append(spark(self.util_history, 100.0, max(width - 5 - len(util_scale), 0)), style("devicecard--util"))
            util.append(util_scale, style("devicecard--dim"))
        return [memory, util]

    def _trends(self, snap: DeviceSnapshot, width: int) -> Text:
        """Memory and utilisation over time on one line (scale and window in the panel's legend)."""
        style = self.component_style
        line = Text(no_wrap=True, overflow="ellipsis")
        no_util = f" util {self._no_utilisation()}" if snap.utilization is None else ""
        each = (width - 4 - len(no_util)) if no_util else (width - 4 - 6) // 2
        self._trend_width = max(each, 0)
        line.append("mem ", style("devicecard--dim"))
        line.append(spark(self.used_history, snap.total, self._trend_width), style("devicecard--trend"))
        if no_util:
            line.append(no_util, style("devicecard--dim"))
        else:
            line.append(" util ", style("devicecard--dim"))
            line.append(spark(self.util_history, 100.0, self._trend_width), style("devicecard--util"))
        return line

    def _no_utilisation(self) -> str:
        """Why there is no utilisation to draw (rather than a line of zeros)."""
        return "n/a (simulated)" if self.info.simulated else "n/a (the device does not report it)"

    def _window_s(self) -> float:
        return trend_window_s(self.read_at, self._trend_width)

    def _one_line(self, width: int) -> Text:
        """Name, memory bar and share used: one line per device, for a rig of many devices."""
        style = self.component_style
        snap = self.snapshot
        line = Text(no_wrap=True, overflow="ellipsis")
        line.append(self.info.name.ljust(self.name_width + 1), style("devicecard--name"))
        if snap is None:
            line.append("waiting…", style("devicecard--dim"))
            return line
        used = f" {snap.used / snap.total:4.0%}" if snap.total else ""
        size = f" of {format_bytes(snap.total)}"
        if snap.total and width - self.name_width - 1 - len(used) - len(size) >= 8:
            used += size  # where a bar of 8 cells is left; else the full card and detail say it
        line.append_text(self._bar(snap, max(width - self.name_width - 1 - len(used), 4)))
        line.append(used)
        return line

    def _bar(self, snap: DeviceSnapshot, width: int) -> Text:
        """Weights, KV cache, other, free: each a run of cells in proportion to its bytes."""
        total = max(snap.total, 1)
        parts = [(snap.weights, "devicecard--weights", "█"), (snap.kv, "devicecard--kv", "█"),
                 (snap.reserved, "devicecard--reserved", "▒"), (snap.other, "devicecard--other", "█")]
        bar = Text()
        used_cells = 0
        for nbytes, component, glyph in parts:
            cells = round(nbytes / total * width)
            if nbytes > 0:
                cells = max(cells, 1)  # a non-zero share stays visible
            cells = min(cells, width - used_cells)
            bar.append(glyph * cells, self.component_style(component))
            used_cells += cells
        bar.append("░" * (width - used_cells), self.component_style("devicecard--free"))
        return bar

    def _legend(self, snap: DeviceSnapshot) -> list[Text]:
        style = self.component_style
        items = []
        for label, nbytes, component in memory_parts(snap):
            items.append(Text.assemble(("■ ", style(component)), f"{label} {format_bytes(nbytes)}"))
        return items


def layer_runs(layers: tuple[int, ...]) -> str:
    """"L3–9, L12" for the layers 3 to 9 and 12."""
    from vramancer.widgets.labels import part_label

    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ", ".join(part_label(first, last) for first, last in runs)


def rate_text(bytes_per_s: float) -> str:
    return f"{bytes_per_s / 1e9:.2f} GB/s"


class TierCard(LineWidget):
    """A host or disk tier, as a row of the devices panel: the layers whose weights it holds
    and the device they stream to, how full it is, the bytes it streams per token, and the
    rate it streams at over time (bytes copied out of it between two readings, per second)."""

    COMPONENT_CLASSES = {"devicecard--name", "devicecard--kind", "devicecard--weights", "devicecard--free",
                         "devicecard--dim", "devicecard--trend"}

    def __init__(self, snapshot: TierSnapshot) -> None:
        super().__init__(classes="tier-card")
        self.snapshot = snapshot
        self.rate_history: deque[float] = deque(maxlen=HISTORY)  # bytes per second between readings
        self.read_at: deque[float] = deque([snapshot.timestamp], maxlen=HISTORY)
        self.mode = FULL
        self.name_width = len(self.title)
        self._trend_width = 0

    @property
    def title(self) -> str:
        return f"{self.snapshot.name} tier"

    def set_mode(self, mode: str, name_width: int) -> None:
        if (mode, name_width) != (self.mode, self.name_width):
            self.mode, self.name_width = mode, name_width
            self.set_class(mode != FULL, "-compact")
            self.rebuild()

    def show(self, snapshot: TierSnapshot) -> None:
        """A new reading: the rate since the last one joins the trend."""
        previous = self.snapshot
        seconds = snapshot.timestamp - previous.timestamp
        if seconds > 0:
            self.rate_history.append(max(snapshot.streamed - previous.streamed, 0) / seconds)
            self.read_at.append(snapshot.timestamp)
        self.snapshot = snapshot
        self.redraw()

    @property
    def rate_now(self) -> float:
        return self.rate_history[-1] if self.rate_history else 0.0

    def build_lines(self, width: int) -> list[Text]:
        style = self.component_style
        snap = self.snapshot
        if self.mode == ONE_LINE:
            return [self._one_line(width)]
        if self.mode == TWO_LINES:
            return [self._one_line(width), self._trend(width)]
        where = f"  streams {layer_runs(snap.layers)} to {', '.join(snap.devices)}" if snap.layers else "  holds no layer"
        cap = format_bytes(snap.cap)
        title = Text(no_wrap=True, overflow="ellipsis")
        title.append(self.title, style("devicecard--name"))
        title.append(where, style("devicecard--kind"))
        title.append(" " * max(width - len(self.title) - len(where) - len(cap), 1))
        title.append(cap)
        facts = Text(no_wrap=True, overflow="ellipsis")
        facts.append(f"holds {format_bytes(snap.held)} · {format_bytes(snap.bytes_per_token)} per token",
                     style("devicecard--dim"))
        if snap.copy_gb_per_s:
            facts.append(f" · copies at {snap.copy_gb_per_s:.2f} GB/s", style("devicecard--dim"))
        return [title, self._bar(width), facts, self._trend(width)]

    def _trend(self, width: int) -> Text:
        """Bytes streamed per second over time, with its scale and window."""
        style = self.component_style
        top = max(self.rate_history, default=0.0)
        scale = f" 0–{rate_text(top)} · now {rate_text(self.rate_now)} · {self._window_s():.0f} s"
        line = Text(no_wrap=True, overflow="ellipsis")
        line.append("rate ", style("devicecard--dim"))
        self._trend_width = max(width - 5 - len(scale), 0)
        line.append(spark(self.rate_history, top, self._trend_width), style("devicecard--trend"))
        line.append(scale, style("devicecard--dim"))
        return line

    def _window_s(self) -> float:
        return trend_window_s(self.read_at, self._trend_width)

    def _one_line(self, width: int) -> Text:
        style = self.component_style
        snap = self.snapshot
        line = Text(no_wrap=True, overflow="ellipsis")
        line.append(self.title.ljust(self.name_width + 1), style("devicecard--name"))
        tail = f" {snap.held / snap.cap:4.0%} {rate_text(self.rate_now)}" if snap.cap else f" {rate_text(self.rate_now)}"
        line.append_text(self._bar(max(width - self.name_width - 1 - len(tail), 4)))
        line.append(tail)
        return line

    def _bar(self, width: int) -> Text:
        """What it holds of its cap."""
        snap = self.snapshot
        cells = min(round(snap.held / max(snap.cap, 1) * width), width)
        if snap.held:
            cells = max(cells, 1)
        bar = Text()
        bar.append("█" * cells, self.component_style("devicecard--weights"))
        bar.append("░" * (width - cells), self.component_style("devicecard--free"))
        return bar


class MemoryLegend(Widget):
    """What the bar's colours mean, once for every card, when the cards are too short to say it."""

    COMPONENT_CLASSES = {"devicecard--weights", "devicecard--kv", "devicecard--reserved", "devicecard--other",
                         "devicecard--free"}

    def render(self) -> Text:
        style = self.get_component_rich_style
        return Text(" ").join(Text.assemble(("■ ", style(component)), label) for label, _, component in MEMORY_PARTS)


class DevicesPanel(VerticalScroll):
    """Holds one DeviceCard per device of the loaded model, as large as the panel's height lets
    every card be: full cards, two lines each, or one line each under a shared legend.

    Focused, it has a cursor on one card: arrows or j/k (h/l across two-up lines) move it, Enter
    opens that device's detail, `s` sorts the cards (as planned, fullest first, most free first;
    re-sorted as readings come, like a process list). One focus stop for the whole rig, not one
    per device."""

    BINDINGS = [
        Binding("up,k", "line(-1)", "Device up", show=False),
        Binding("down,j", "line(1)", "Device down", show=False),
        Binding("left,h", "cursor(-1)", "Device left", show=False),
        Binding("right,l", "cursor(1)", "Device right", show=False),
        Binding("enter", "detail", "Device detail"),
        Binding("s", "sort", "Sort devices"),
    ]
    SORTS = ("as planned", "fullest first", "most free first")

    class DetailWanted(Message):
        """Enter on a device: open its detail."""

        def __init__(self, device: str) -> None:
            super().__init__()
            self.device = device

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.border_title = "devices"
        self.cards: dict[str, DeviceCard] = {}
        self.tiers: dict[str, TierCard] = {}  # after the devices, one per tier layers stream from
        self.legend = MemoryLegend(classes="memory-legend")
        self.cursor = 0  # the card Enter opens (its place in the order shown), marked while focused
        self.sort = self.SORTS[0]

    async def set_devices(self, devices: tuple[DeviceInfo, ...]) -> None:
        """A new model (and so maybe new devices): start the cards afresh."""
        await self.remove_children()
        self.tiers = {}
        self.cards = {d.name: DeviceCard(d) for d in devices}
        self.legend = MemoryLegend(classes="memory-legend")
        await self.mount_all([self.legend, *self.cards.values()])
        self.cursor = 0
        self._apply_sort()
        self._mark_cursor()
        self._fit_cards()
        # The panel's height may still be the one from before the cards were mounted: fit them
        # again once the layout has settled (no resize event follows if its size did not change).
        self.call_after_refresh(self._fit_cards)

    def on_resize(self) -> None:
        self._fit_cards()

    def action_line(self, step: int) -> None:
        """A line up or down: two devices where they go two to a line."""
        self.action_cursor(step * (2 if self.has_class("-two-up") else 1))

    def action_cursor(self, step: int) -> None:
        if not self.cards:
            return
        self.cursor = max(0, min(self.cursor + step, len(self.cards) - 1))
        self._mark_cursor()

    def action_detail(self) -> None:
        if self.cards:
            self.post_message(self.DetailWanted(self.shown()[self.cursor].info.name))

    def action_sort(self) -> None:
        """The next order of the cards; the cursor stays on its device."""
        self.sort = self.SORTS[(self.SORTS.index(self.sort) + 1) % len(self.SORTS)]
        self.border_title = "devices" if self.sort == self.SORTS[0] else f"devices · {self.sort}"
        self._apply_sort()

    def shown(self) -> list[DeviceCard]:
        """The cards in the order they are shown."""
        return [child for child in self.children if isinstance(child, DeviceCard)]

    def _apply_sort(self) -> None:
        cards = list(self.cards.values())  # as planned: the devices' own order
        if self.sort != self.SORTS[0]:
            def fullness(card: DeviceCard) -> float:
                snap = card.snapshot
                return (snap.total - snap.free) / snap.total if snap is not None and snap.total else 0.0

            def free(card: DeviceCard) -> int:
                return card.snapshot.free if card.snapshot is not None else 0

            cards.sort(key=fullness if self.sort == "fullest first" else free, reverse=True)
        shown = self.shown()
        if cards == shown:
            return  # the same order: no layout
        under_cursor = shown[self.cursor] if shown else None
        for card in [*cards, *self.tiers.values()]:  # the tiers stay after the devices
            if card is not self.children[-1]:
                self.move_child(card, after=self.children[-1])
        self.cursor = cards.index(under_cursor) if under_cursor in cards else 0
        self._mark_cursor()

    def _mark_cursor(self) -> None:
        cards = self.shown()
        for index, card in enumerate(cards):
            card.set_class(index == self.cursor, "-cursor")
        if cards:
            self.scroll_to_widget(cards[self.cursor], animate=False)

    def mode_for_size(self) -> str:
        """The card form that shows every card in the room the panel has."""
        count, height = len(self.cards) + len(self.tiers), self.room_for_cards()
        # The width without a scrollbar: the mode chosen makes the cards fit, so none shows. (The
        # width with one, taken while a previous mode overflowed, could flip the choice.)
        legend = len(self.legend.render().wrap(self.app.console, max(self.content_region.width, 1)))
        if height is None or count * FULL_HEIGHT <= height:
            return FULL
        if legend + count * 2 <= height and self.content_region.width >= TWO_LINE_WIDTH:
            return TWO_LINES
        return ONE_LINE

    def room_for_cards(self) -> int | None:
        """Rows the cards may take; None when the panel grows with them without limit.

        A panel whose height follows its content (`height: auto`, as in the narrow layout) may
        grow up to its max-height, so that is its room. Its present height is no guide: it is
        whatever the cards mounted or drawn last made it, and one-line cards make a panel just
        tall enough for one-line cards, so the form chosen would depend on what was on screen
        before (the size before the cards were laid out), not on the terminal."""
        styles = self.styles
        if styles.height is None or not styles.height.is_auto:
            return self.scrollable_content_region.height or self.size.height
        if styles.max_height is None:
            return None
        container = self.parent.size if isinstance(self.parent, Widget) else self.app.size
        room = int(styles.max_height.resolve(container, self.app.size))
        if styles.box_sizing == "border-box":
            room -= styles.gutter.height
        return max(room, 0)

    def two_up(self, mode: str) -> bool:
        """Whether one-line cards go two to a line: one each would not all fit, and two do."""
        room = self.room_for_cards()
        return (mode == ONE_LINE and room is not None and len(self.cards) + 2 > room
                and self.content_region.width >= TWO_UP_WIDTH)

    def _fit_cards(self) -> None:
        if not self.cards:
            return
        mode = self.mode_for_size()
        self.set_class(self.two_up(mode), "-two-up")
        self.legend.display = mode != FULL
        name_width = max(len(name) for name in [*self.cards, *(card.title for card in self.tiers.values())])
        for card in [*self.cards.values(), *self.tiers.values()]:
            card.set_mode(mode, name_width)
        self._state_trends()

    def show_sample(self, snapshots: tuple[DeviceSnapshot, ...], tiers: tuple[TierSnapshot, ...] = ()) -> None:
        for snap in snapshots:
            card = self.cards.get(snap.name)
            if card is not None:
                card.show(snap)
        self._show_tiers(tiers)
        if self.sort != self.SORTS[0]:
            self._apply_sort()
        self._state_trends()

    def _show_tiers(self, tiers: tuple[TierSnapshot, ...]) -> None:
        """Each tier's reading on its row; a tier seen for the first time gets a row after the
        devices (a model loaded without tiers shows none)."""
        fresh = [TierCard(snap) for snap in tiers if snap.name not in self.tiers]
        for snap in tiers:
            if snap.name in self.tiers:
                self.tiers[snap.name].show(snap)
        if fresh and self.cards:
            self.tiers.update({card.snapshot.name: card for card in fresh})
            self.mount_all(fresh)
            self._fit_cards()

    def _state_trends(self) -> None:
        """Two-line cards have no room for their trends' scale: the panel's border states it for all."""
        card = next(iter(self.cards.values()), None)
        subtitle = "" if card is None or card.mode != TWO_LINES else \
            f"trends: {card._window_s():.0f} s · mem 0–size · util 0–100 %"
        if subtitle != self.border_subtitle:
            self.border_subtitle = subtitle
