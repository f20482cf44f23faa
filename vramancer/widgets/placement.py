"""The #placement panel: one column per device, one tile per contiguous run of layers, and
one column per host or disk tier (docs/usage/offload.md) with the layers whose weights it holds.

A tile is dragged onto another column to migrate it, the way Textual's scrollbar drags its
thumb: capture the mouse on press, follow it while it moves, release on the button coming up.
While a tile is over a column, the column says whether the move would fit, priced by the
engine's own memory model (`PlanSnapshot.would_fit`) against the latest free bytes; a move that
would not fit is refused here with a notification and never reaches the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich.text import Text
from textual import events, on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Container, Vertical
from textual.errors import NoWidget
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Static

from vramancer.config.units import format_bytes
from vramancer.widgets.labels import part_label

if TYPE_CHECKING:
    from vramancer.engine.events import DeviceInfo, DeviceSnapshot, PlanSnapshot

Part = int | str

# A column turns warm, then full, as its device fills (share of its memory in use). A device
# holding a model is meant to be well used: only the last tenth is worth a warning.
WARM, FULL = 0.90, 0.97
# The narrowest a column may be and still show a tile's label and size ("L15–25" over "54.0 MiB").
MIN_COLUMN_WIDTH = 12


def fits_as_columns(columns: int, rows: int, tiles: int, height: int) -> bool:
    """Whether `rows` rows of device columns, each with up to `tiles` tiles (two lines each
    where a narrow column puts the size under the label) and a border, fit `height` lines;
    else every device takes one line of its own."""
    return rows == 1 or rows * (2 * tiles + 2) <= height


def grid_shape(devices: int, width: int) -> tuple[int, int]:
    """(columns, rows) of device columns for a panel `width` cells wide: one row while every
    column gets MIN_COLUMN_WIDTH, else as few rows as keep them that wide, filled evenly."""
    most = max(width // MIN_COLUMN_WIDTH, 1)
    rows = -(-devices // most) if devices else 1
    columns = -(-devices // rows) if devices else 1
    return columns, rows


@dataclass(frozen=True)
class Verdict:
    """Whether a part range may move to a device, the sentence that says why not, and the
    decode speed the engine's measured pricing predicts after the move (None: not measured)."""

    device: str
    fits: bool
    reason: str = ""
    tokens_per_s: float | None = None
    now_tokens_per_s: float | None = None  # the current plan's prediction, for the change
    effect: str = ""  # what the move frees and takes, device by device (PlanSnapshot.move_effect)

    @property
    def speed(self) -> str:
        """" · ~18.2 tok/s (+1.3)": the predicted decode speed after the move, and its change."""
        if not self.tokens_per_s:
            return ""
        change = f" ({self.tokens_per_s - self.now_tokens_per_s:+.1f})" if self.now_tokens_per_s else ""
        return f" · ~{self.tokens_per_s:.1f} tok/s{change}"


class BlockTile(Widget, can_focus=True):
    """A contiguous run of layers on one device (or the embed / head part).

    The tile carries a selection inside its block, the whole block by default: shift+click on the
    layer strip picks a sub-range (first click one layer, second click extends), `[` / `]` drop a
    layer from either end, `a` takes the whole block again. Dragging or `m` moves the selection."""

    ALLOW_SELECT = False  # a press starts a drag, never a text selection

    BINDINGS = [
        Binding("m", "choose_target", "Move to…"),
        Binding("enter", "detail", "Device detail"),
        # As in nvitop and btop: arrows or vi keys go to the nearest tile that way, whichever
        # way the devices are laid out (columns side by side, rows of columns, a line each).
        Binding("left,h", "step('left')", "Tile left", show=False),
        Binding("right,l", "step('right')", "Tile right", show=False),
        Binding("up,k", "step('up')", "Tile up", show=False),
        Binding("down,j", "step('down')", "Tile down", show=False),
        Binding("left_square_bracket", "shrink_front", "Drop first layer", show=False),
        Binding("right_square_bracket", "shrink_back", "Drop last layer", show=False),
        Binding("a", "select_all", "Whole block", show=False),
    ]

    COMPONENT_CLASSES = {"blocktile--selected", "blocktile--unselected", "blocktile--note"}

    class DetailWanted(Message):
        """Enter on a tile: open its device's detail."""

        def __init__(self, device: str) -> None:
            super().__init__()
            self.device = device

    class TargetWanted(Message):
        """The keyboard path: the user pressed `m` on this tile and must now pick a device."""

        def __init__(self, tile: "BlockTile") -> None:
            super().__init__()
            self.tile = tile

    class DragOver(Message):
        """The dragged tile is over `column` now (None: over no column)."""

        def __init__(self, tile: "BlockTile", column: "DeviceColumn | None") -> None:
            super().__init__()
            self.tile, self.column = tile, column

    class Dropped(Message):
        """The dragged tile was let go over `column` (None: over no column)."""

        def __init__(self, tile: "BlockTile", column: "DeviceColumn | None") -> None:
            super().__init__()
            self.tile, self.column = tile, column

    def __init__(self, first: Part, last: Part, device: str, plan: PlanSnapshot) -> None:
        super().__init__(classes="block-tile")
        self.first, self.last, self.device = first, last, device
        self.plan = plan
        self.sel_first: Part = first
        self.sel_last: Part = last
        self.moving_to: str | None = None
        self._anchor: int | None = None
        self._dragging = False
        self.compact = False  # many devices: no layer strip, so every tile of a column stays in view
        self.one_line = False  # a line per device: the tile is its label and size, side by side
        if isinstance(first, str):
            self.add_class(f"-{first}")

    # --- what the tile holds -----------------------------------------------------------

    @property
    def is_layers(self) -> bool:
        return isinstance(self.first, int)

    @property
    def count(self) -> int:
        return int(self.last) - int(self.first) + 1 if self.is_layers else 1

    @property
    def selection(self) -> tuple[Part, Part]:
        return self.sel_first, self.sel_last

    @property
    def caption(self) -> tuple[str, str]:
        """What the tile says it holds: its label and its size."""
        return part_label(self.first, self.last), format_bytes(self.plan.part_bytes(self.first, self.last))

    @property
    def partial(self) -> bool:
        return self.selection != (self.first, self.last)

    def select(self, first: int, last: int) -> None:
        """Select layers first..last, clamped to this block."""
        lo, hi = int(self.first), int(self.last)
        first, last = max(lo, min(first, hi)), max(lo, min(last, hi))
        self.sel_first, self.sel_last = min(first, last), max(first, last)
        self.refresh(layout=True)

    def set_moving(self, device: str | None) -> None:
        self.moving_to = device
        self.set_class(device is not None, "-moving")
        self.refresh(layout=True)

    # --- drawing -----------------------------------------------------------------------

    def get_content_height(self, container, viewport, width: int) -> int:
        return len(self._lines(width))

    def get_content_width(self, container, viewport) -> int:
        return max(len(line) for line in self._lines(container.width))

    def render(self) -> Text:
        return Text("\n").join(self._lines(max(self.content_region.width, 4)))

    def _lines(self, width: int) -> list[Text]:
        label, size = self.caption
        if self.one_line:
            note = f" → {self.moving_to}…" if self.moving_to is not None else (
                f" [{part_label(*self.selection)}]" if self.partial else "")
            return [Text(f"{label} {size}{note}", no_wrap=True)]
        if len(label) + 3 + len(size) <= width:
            lines = [Text(f"{label} · {size}", no_wrap=True, overflow="ellipsis")]
        else:  # a narrow column: the size goes under the label rather than off the edge
            lines = [Text(label, no_wrap=True, overflow="ellipsis"), Text(size, no_wrap=True, overflow="ellipsis")]
        if self.is_layers and self.count > 1 and not self.compact:
            lines.append(self._strip(width))
        note = self.get_component_rich_style("blocktile--note")
        if self.moving_to is not None:
            what = part_label(*self.selection)
            lines.append(Text(f"moving {what} → {self.moving_to}…", note, no_wrap=True, overflow="ellipsis"))
        elif self.partial:
            size = format_bytes(self.plan.part_bytes(*self.selection))
            lines.append(Text(f"selected {part_label(*self.selection)} · {size}", note,
                              no_wrap=True, overflow="ellipsis"))
        return lines

    def _strip(self, width: int) -> Text:
        """One run of cells per layer, the selected layers lit: the target of shift+click."""
        strip = Text(no_wrap=True)
        selected = self.get_component_rich_style("blocktile--selected")
        unselected = self.get_component_rich_style("blocktile--unselected")
        for x in range(width):
            layer = self._layer_at(x, width)
            lit = int(self.sel_first) <= layer <= int(self.sel_last)
            strip.append("▆" if lit else "▁", selected if lit else unselected)
        return strip

    def _layer_at(self, x: int, width: int | None = None) -> int:
        width = width or max(self.content_region.width, 1)
        return int(self.first) + min(self.count - 1, max(x, 0) * self.count // width)

    # --- keyboard ----------------------------------------------------------------------

    def action_detail(self) -> None:
        self.post_message(self.DetailWanted(self.device))

    def action_step(self, direction: str) -> None:
        target = nearest(self, [t for t in self.screen.query(BlockTile) if t is not self and t.display], direction)
        if target is not None:
            target.focus()

    def action_choose_target(self) -> None:
        if self.moving_to is None:
            self.post_message(self.TargetWanted(self))

    def action_shrink_front(self) -> None:
        if self.is_layers and self.sel_first != self.sel_last:
            self.select(int(self.sel_first) + 1, int(self.sel_last))

    def action_shrink_back(self) -> None:
        if self.is_layers and self.sel_first != self.sel_last:
            self.select(int(self.sel_first), int(self.sel_last) - 1)

    def action_select_all(self) -> None:
        if self.is_layers:
            self.select(int(self.first), int(self.last))

    # --- mouse: shift+click selects, press-move-release drags ---------------------------

    def on_mouse_down(self, event: events.MouseDown) -> None:
        if event.button != 1 or self.moving_to is not None:
            return
        event.stop()
        if event.shift:
            self._shift_select(event)
            return
        self._dragging = True
        self.add_class("-dragging")
        self.capture_mouse()

    def _shift_select(self, event: events.MouseDown) -> None:
        if not self.is_layers:
            return
        x = event.x - self.gutter.left
        layer = self._layer_at(x)
        if self._anchor is None or not self.partial:
            self._anchor = layer
            self.select(layer, layer)
        else:
            self.select(self._anchor, layer)
            self._anchor = None

    def on_mouse_move(self, event: events.MouseMove) -> None:
        if self._dragging:
            self.post_message(self.DragOver(self, self._column_at(event.screen_x, event.screen_y)))

    def on_mouse_up(self, event: events.MouseUp) -> None:
        if not self._dragging:
            return
        event.stop()
        self._end_drag()
        self.post_message(self.Dropped(self, self._column_at(event.screen_x, event.screen_y)))

    def on_hide(self) -> None:
        if self._dragging:
            self._end_drag()
            self.post_message(self.DragOver(self, None))

    def on_unmount(self) -> None:
        if self._dragging:
            self.release_mouse()

    def _end_drag(self) -> None:
        self._dragging = False
        self.remove_class("-dragging")
        self.release_mouse()

    def _column_at(self, x: int, y: int) -> "DeviceColumn | None":
        try:
            widget, _ = self.screen.get_widget_at(x, y)
        except NoWidget:
            return None
        for node in widget.ancestors_with_self:
            if isinstance(node, DeviceColumn):
                return node
        return None


class DeviceColumn(Vertical):
    """Everything the plan put on one device, coloured by how full that device is."""

    def __init__(self, info: DeviceInfo) -> None:
        super().__init__(classes="device-column")
        self.device = info.name
        self.info = info
        self.border_title = info.name
        self.summary = Static("", classes="column-summary")
        self._summary_text = ""
        self.title = Static(info.name, classes="column-name", markup=False)  # shown as a line per device
        self.name_width = len(info.name)  # the panel's longest name, so the lines of devices align
        self.preview = Static("", classes="drop-preview")

    def compose(self) -> ComposeResult:
        yield self.title
        yield self.summary
        yield self.preview

    def show_fullness(self, used: int, total: int, need: int | None, empty_because: str = "") -> None:
        """How full the device is; why it holds nothing (`empty_because`), or what to do when
        it is over-committed."""
        # Levels by the share as shown: a device that reads "97%" is in the error colour.
        share = round(used / total, 2) if total else 0.0
        self.set_class(share < WARM, "-roomy")
        self.set_class(WARM <= share < FULL, "-warm")
        self.set_class(share >= FULL, "-full")
        self.set_class(bool(empty_because), "-empty")
        subtitle = f"{share:.0%} used"
        summary = f"needs {format_bytes(need)}" if need is not None else ""
        if empty_because:
            summary = empty_because
        elif share >= FULL and need is not None:
            summary = "over-committed: m moves a tile off, ctrl+p re-plans"
        if (subtitle, summary) != (self.border_subtitle, self._summary_text):  # unchanged: no redraw
            self.border_subtitle = subtitle
            self._summary_text = summary
            self.summary.update(summary)
            self.title.update(f"{self.device:<{self.name_width}} {share:4.0%}")

    def show_verdict(self, verdict: Verdict | None, what: str = "") -> None:
        """Preview a drop while a tile hovers over this column; None clears it."""
        self.set_class(verdict is not None and verdict.fits, "-drop-ok")
        self.set_class(verdict is not None and not verdict.fits, "-drop-bad")
        if verdict is None:
            self.preview.update("")
        elif verdict.fits:
            effect = f"\n{verdict.effect}" if verdict.effect else ""
            self.preview.update(f"✓ {what} fits here{verdict.speed}{effect}")
        else:
            self.preview.update(f"✗ {what} won't fit")

    async def set_tiles(self, tiles: list[BlockTile]) -> None:
        await self.query(BlockTile).remove()
        await self.mount_all(tiles, before=self.preview)


class PlacementPanel(Container):
    """The columns, the tiles, and the drag-to-migrate rules that tie them to the plan.

    The columns sit in a grid that wraps into rows when the devices are too many for one row,
    so every device is on screen and a drop target, at any count that leaves each a few cells."""

    class MoveRequested(Message):
        """The user asked for a move that fits: the App hands it to the engine."""

        def __init__(self, first: Part, last: Part, device: str) -> None:
            super().__init__()
            self.first, self.last, self.device = first, last, device

    class MoveRefused(Message):
        """A move the user asked for cannot fit: the App says so and logs it; nothing is sent."""

        def __init__(self, first: Part, last: Part, device: str, reason: str) -> None:
            super().__init__()
            self.first, self.last, self.device, self.reason = first, last, device, reason

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.border_title = "placement"
        self.plan: PlanSnapshot | None = None
        self.shown: PlanSnapshot | None = None  # the plan whose tiles are all on screen
        self.devices: tuple[DeviceInfo, ...] = ()
        self.free: dict[str, int] = {}
        self.used: dict[str, int] = {}
        self.moving: dict[tuple[Part, Part], str] = {}
        self.columns: dict[str, DeviceColumn] = {}
        self._hovered: DeviceColumn | None = None

    # --- what the App tells it -----------------------------------------------------------

    async def set_devices(self, devices: tuple[DeviceInfo, ...]) -> None:
        """New devices (a new load): new, empty columns. Awaited, so tiles have somewhere to go."""
        self.devices = devices
        self.plan = self.shown = None
        self.free, self.used, self.moving = {}, {}, {}
        self._hovered = None
        await self.remove_children()
        self.columns = {d.name: DeviceColumn(d) for d in devices}
        for column in self.columns.values():
            column.name_width = max(len(d.name) for d in devices)
        self._fit_grid()
        await self.mount_all(self.columns.values())

    def on_resize(self) -> None:
        self._fit_grid()

    def _fit_grid(self) -> None:
        columns, rows = grid_shape(len(self.columns), self.content_region.width or self.size.width)
        tiles = max(_tile_counts(self.plan).values(), default=1) if self.plan else 1
        height = self.content_region.height or self.size.height
        as_rows = bool(height) and not fits_as_columns(columns, rows, tiles, height)
        if as_rows:
            columns, rows = 1, len(self.columns)
        compact = rows > 1
        if (columns, rows) != (self.styles.grid_size_columns, self.styles.grid_size_rows):
            self.styles.grid_size_columns = columns
            self.styles.grid_size_rows = rows
        self.set_class(as_rows, "-rows")
        self.set_class(compact, "-compact")
        for tile in self.query(BlockTile):
            if (tile.compact, tile.one_line) != (compact, as_rows):
                tile.compact, tile.one_line = compact, as_rows
                tile.refresh(layout=True)

    async def show_plan(self, plan: PlanSnapshot) -> None:
        """Lay the tiles out afresh for a new placement, keeping focus on the moved range."""
        focused = self.screen.focused
        keep = focused.selection if isinstance(focused, BlockTile) and focused in self.walk_children() else None
        if self._hovered is not None:  # a drag in progress loses its tile with the old layout
            self._hovered.show_verdict(None)
            self._hovered = None
        self.plan = plan
        await self._show_tiers(plan)
        compact, one_line = self.has_class("-compact"), self.has_class("-rows")
        for name, column in self.columns.items():
            tiles = self._tiles_for(name, plan)
            for tile in tiles:
                tile.compact, tile.one_line = compact, one_line
            await column.set_tiles(tiles)
        self.shown = plan
        self._fit_grid()  # the tiles per device decide whether columns have room for them
        self._refresh_fullness()
        if keep is not None:
            self.call_after_refresh(self._focus_range, keep)

    def show_sample(self, snapshots: tuple[DeviceSnapshot, ...]) -> None:
        for snap in snapshots:
            self.free[snap.name] = snap.free
            self.used[snap.name] = snap.used
        self._refresh_fullness()

    def settle(self, first: Part, last: Part) -> None:
        """A move ended (done, refused or failed): its tile stops showing it as moving."""
        self.moving.pop((first, last), None)
        for tile in self.query(BlockTile):
            if tile.selection == (first, last):
                tile.set_moving(None)

    def settle_all(self) -> None:
        for first, last in list(self.moving):
            self.settle(first, last)

    # --- pricing a move ------------------------------------------------------------------

    def free_bytes(self) -> dict[str, int]:
        """Free bytes per device: the latest reading, else what the plan leaves of each device."""
        assert self.plan is not None
        return {d.name: self.free.get(d.name, d.total - self.plan.needs.get(d.name, 0)) for d in self.devices}

    def verdict(self, first: Part, last: Part, device: str) -> Verdict:
        assert self.plan is not None
        reason = self.plan.would_fit(first, last, device, self.free_bytes())
        speed = self.plan.predict_move(first, last, device) if reason is None else None
        effect = self.plan.move_effect(first, last, device) if reason is None else ""
        return Verdict(device, reason is None, reason or "", speed, self.plan.predicted_tokens_per_s if speed else None,
                       effect)

    def targets(self, tile: BlockTile) -> list[Verdict]:
        """Every other device (and tier), with whether the tile's selection fits there."""
        names = [d.name for d in self.devices] + [tier for tier, _ in (self.plan.tier_caps if self.plan else ())]
        return [self.verdict(*tile.selection, name) for name in names if name != tile.device]

    async def _show_tiers(self, plan: PlanSnapshot) -> None:
        """A column per tier the model was loaded with: a tile dropped there streams from it."""
        from vramancer.engine.events import DeviceInfo

        for tier, cap in plan.tier_caps:
            if tier not in self.columns:
                column = DeviceColumn(DeviceInfo(tier, "tier", f"{tier} tier", False, cap))
                column.add_class("-tier")
                column.name_width = max(column.name_width, *(c.name_width for c in self.columns.values()))
                self.columns[tier] = column
                await self.mount(column)

    def request_move(self, tile: BlockTile, device: str) -> bool:
        """Refuse a move that cannot fit (notification, nothing sent); else ask the App for it."""
        if self.plan is None or device == tile.device or tile.moving_to is not None:
            return False
        first, last = tile.selection
        verdict = self.verdict(first, last, device)
        if not verdict.fits:
            self.post_message(self.MoveRefused(first, last, device, verdict.reason))
            return False
        self.moving[(first, last)] = device
        tile.set_moving(device)
        self.post_message(self.MoveRequested(first, last, device))
        return True

    # --- the drag, as the tile reports it ------------------------------------------------

    @on(BlockTile.DragOver)
    def _drag_over(self, message: BlockTile.DragOver) -> None:
        message.stop()
        self._hover(message.tile, message.column)

    @on(BlockTile.Dropped)
    def _dropped(self, message: BlockTile.Dropped) -> None:
        message.stop()
        tile, column = message.tile, message.column
        self._hover(tile, None)
        if column is not None and column.device != tile.device and tile.is_attached:
            self.request_move(tile, column.device)

    def _hover(self, tile: BlockTile, column: DeviceColumn | None) -> None:
        if column is self._hovered:
            return
        if self._hovered is not None:
            self._hovered.show_verdict(None)
        self._hovered = column
        if column is not None and column.device != tile.device and self.plan is not None and tile.is_attached:
            column.show_verdict(self.verdict(*tile.selection, column.device), part_label(*tile.selection))

    # --- helpers -------------------------------------------------------------------------

    def _tiles_for(self, device: str, plan: PlanSnapshot) -> list[BlockTile]:
        """Tiles in model order: embed first, then its layer runs, then the head."""
        tiles = []
        if device in dict(plan.tier_caps):  # a tier: runs of the layers whose weights it holds
            layers = plan.tier_layers(device)
            runs = [[layer] for layer in layers[:1]]
            for layer in layers[1:]:
                if layer == runs[-1][-1] + 1:
                    runs[-1].append(layer)
                else:
                    runs.append([layer])
            return [BlockTile(run[0], run[-1], device, plan) for run in runs]
        if plan.embed == device:
            tiles.append(BlockTile("embed", "embed", device, plan))
        for block in plan.blocks:
            if block.device == device:
                tiles.append(BlockTile(block.first_layer, block.last_layer, device, plan))
        if plan.head == device:
            tiles.append(BlockTile("head", "head", device, plan))
        for tile in tiles:
            for (first, last), target in self.moving.items():
                if _within(first, last, tile.first, tile.last):
                    tile.sel_first, tile.sel_last = first, last
                    tile.moving_to = target
                    tile.add_class("-moving")
        return tiles

    def _refresh_fullness(self) -> None:
        for d in self.devices:
            column = self.columns.get(d.name)
            if column is None:
                continue
            need = self.plan.needs.get(d.name) if self.plan else None
            used = self.used.get(d.name, need or 0)
            column.show_fullness(used, d.total, need, why_empty(self.plan, d.name))
        for tier, cap in self.plan.tier_caps if self.plan else ():
            held = sum(self.plan.profile.layer_bytes[i] for i in self.plan.tier_layers(tier))
            self.columns[tier].show_fullness(held, cap, None, "" if held else "empty: drop layers to stream them")

    def _focus_range(self, selection: tuple[Part, Part]) -> None:
        for tile in self.query(BlockTile):
            if _within(*selection, tile.first, tile.last):
                tile.focus()
                return


def nearest(origin: Widget, others: list, direction: str):
    """The widget of `others` nearest to `origin` in `direction` (left, right, up, down) on
    screen, None when there is none that way. Distance along the direction counts once, across
    it twice, so the one straight ahead wins over one diagonally closer."""
    ox, oy = origin.region.center
    best, best_cost = None, None
    for other in others:
        x, y = other.region.center
        along, across = {"left": (ox - x, y - oy), "right": (x - ox, y - oy),
                         "up": (oy - y, x - ox), "down": (y - oy, x - ox)}[direction]
        if along <= 0:
            continue
        cost = along + 2 * abs(across)
        if best_cost is None or cost < best_cost:
            best, best_cost = other, cost
    return best


def why_empty(plan: PlanSnapshot | None, device: str) -> str:
    """Why the plan put nothing on `device` ("" when it holds something), as the planner says it."""
    if plan is None or _tile_counts(plan).get(device):
        return ""
    return f"empty: {plan.empty.get(device) or 'nothing placed on it'}"


def _tile_counts(plan: PlanSnapshot) -> dict[str, int]:
    """How many tiles each device's column holds under `plan`."""
    counts: dict[str, int] = {}
    for device in (plan.embed, plan.head, *(b.device for b in plan.blocks)):
        counts[device] = counts.get(device, 0) + 1
    return counts


def _within(first: Part, last: Part, block_first: Part, block_last: Part) -> bool:
    """Whether first..last lies inside block_first..block_last (embed/head only match themselves)."""
    if isinstance(first, str) or isinstance(block_first, str):
        return first == block_first
    return int(block_first) <= int(first) and int(last) <= int(block_last)
