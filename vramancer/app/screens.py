"""Screens over the dashboard: help, choosing a device for a move, loading another model."""

from __future__ import annotations

from dataclasses import replace

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Markdown, OptionList, Select, Static
from textual.widgets.option_list import Option

from vramancer.config.options import LoadOptions
from vramancer.config.validation import WEIGHTS
from vramancer.widgets.placement import Verdict

HELP = """\
# VRAMancer

One language model, split across several devices. Watch the split; change it live.

## Panels
- **devices**: memory of each device: model weights, KV cache, reserved (set aside by this
  model, not yet used), other processes, free; memory (0 to the device's size) and utilisation
  (0–100 %) over time, with the seconds they span ("n/a (simulated)" where a device cannot tell
  its utilisation); temperature and power where the device tells them. With many devices, two
  lines each (the graphs' scale on the panel's border), then one line each.
- **placement**: a column per device, a tile per run of layers on it, plus the embed and head.
  A column's border takes the warning colour at 90 % used and the error colour at 97 %, with
  what to do about it; an empty device says why. Many devices wrap into rows of columns, then
  one line each.
- **links**: tokens decoded per second over time (every answer and server request); then data
  that crossed between devices: bytes/s over time (bytes over the time the transfers took, or
  a migration's own time; zero when idle; the scale and the time span at its end), now, the
  peak over the graph's window, bytes carried, the last transfers' rate.
- **console**: talk to the model. Each prompt is sent with the earlier turns; while an answer
  streams, the line under it counts its tokens and their rate. With a server running, its
  requests show beside the conversation: who asked, the prompt's head, tokens so far, tok/s,
  and how each ended; the header adds running and waiting sequences and their tok/s.
- **header**: *predicted* tok/s is what the engine expects from the current placement, priced
  from measured device and link timings; *measured* is the decode speed of the last answer.
  A drop preview shows the predicted speed after the move and its change, and what the move
  frees and takes on each device (tied embeddings and head: the head's own copy of the table).
- **events**: what the engine did: loads, plans, migrations, refusals, errors, and how each
  server request ended.

## Moving layers
- **Drag** a tile onto another column and let go. While you hover, the column says whether it
  would fit; a move that cannot fit is refused and nothing changes.
- **Part of a block**: shift+click a layer on the tile's strip, shift+click another to extend;
  or focus the tile and press `[` / `]` to drop a layer from either end, `a` for the whole block.
- **Keyboard**: tab to a tile, press `m`, pick the device.
- Moves work while an answer streams; the answer carries on unchanged.

## Keys
esc closes this help. The prompt has the focus at start, and there single keys type: `?`, `q`,
`/`, `p`, `z` act only off the prompt (esc leaves it). The ctrl and function keys work anywhere.

| key | does |
|---|---|
| z/f2 | zoom the panel holding the focus to the whole screen, and back (esc too); f2 works anywhere |
| ←↓↑→/hjkl | on a tile: the nearest tile that way; on devices: the next device |
| enter | on a tile or a device: its detail (memory over time, layers, links); on the prompt: send it |
| s | on devices: sort them (as planned, fullest first, most free first) |
| esc | cancel the answer streaming; otherwise leave the prompt for the placement |
| ↑/↓ | on the prompt: earlier / later prompts |
| ctrl+l | new conversation |
| / | back to the prompt |
| p | to the placement (the tile of the first layers) |
| tab/⇧tab | move between tiles, panels and the prompt |
| m | move the focused tile to another device |
| ctrl+p | commands: load a model, re-plan, export metrics |
| ctrl+e | export metrics to a JSON file in the working directory |
| f1/? | this help (? only off the prompt) |
| ctrl+q/q | quit (q only off the prompt) |
"""


class HelpScreen(ModalScreen[None]):
    """Keys, panels and the drag gesture, in one page."""

    BINDINGS = [
        Binding("escape,q,question_mark,f1", "dismiss", "Close"),
    ]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-body"):
            yield Markdown(HELP)

    def action_dismiss(self) -> None:  # type: ignore[override]
        self.dismiss(None)


class DeviceDetailScreen(ModalScreen[None]):
    """One device over the whole screen: its memory parts over time, what the plan put on it,
    the links it sends and receives on. Drawn by `describe()` (the App's, from what the panels
    hold), again every second while it is open."""

    BINDINGS = [Binding("escape,enter,q", "dismiss", "Close")]
    REFRESH_S = 1.0

    def __init__(self, device: str, describe) -> None:
        super().__init__()
        self.device = device
        self.describe = describe
        self.body = Static("", id="detail-text")

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="detail-body"):
            yield self.body
            yield Label("esc or enter closes", classes="dialog-hint")

    def on_mount(self) -> None:
        self.query_one("#detail-body").border_title = self.device
        self._draw()
        self.set_interval(self.REFRESH_S, self._draw)

    def _draw(self) -> None:
        self.body.update(self.describe(self.device))

    def action_dismiss(self) -> None:  # type: ignore[override]
        self.dismiss(None)


class MoveTargetScreen(ModalScreen[str | None]):
    """The keyboard path of a migration: pick the device the selected layers go to."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, what: str, verdicts: list[Verdict]) -> None:
        super().__init__()
        self.what = what
        self.verdicts = verdicts

    def compose(self) -> ComposeResult:
        with Vertical(id="move-dialog"):
            yield Label(f"Move {self.what} to…", id="move-title")
            options = []
            for verdict in self.verdicts:
                if verdict.fits:
                    effect = f"\n  {verdict.effect}" if verdict.effect else ""
                    options.append(Option(f"{verdict.device} · fits{verdict.speed}{effect}", id=verdict.device))
                else:  # listed, so the user sees why, but not selectable
                    options.append(Option(f"{verdict.device} · won't fit: {verdict.reason}", id=verdict.device,
                                          disabled=True))
            yield OptionList(*options, id="move-targets")
            yield Label("enter moves · esc cancels", classes="dialog-hint")

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def action_cancel(self) -> None:
        self.dismiss(None)


class LoadModelScreen(ModalScreen[LoadOptions | None]):
    """Load another model (or the same one differently): the dashboard's --model/--devices flags."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, current: LoadOptions) -> None:
        super().__init__()
        self.current = current

    def compose(self) -> ComposeResult:
        from vramancer.planning.placement import (
            STRATEGIES,  # imported (and so quick) once the engine is up
        )

        current = self.current
        with Vertical(id="load-dialog"):
            yield Label("Load a model", id="load-title")
            yield Label("model: default, a folder, a .gguf file or a hub id")
            yield Input(current.model, id="load-model")
            yield Label("devices: auto, cuda:0,cpu, sim:3x2GiB …")
            yield Input(current.devices, id="load-devices")
            with Horizontal(classes="load-row"):
                with Vertical():
                    yield Label("strategy")
                    yield Select([(s, s) for s in STRATEGIES], value=current.strategy, allow_blank=False,
                                 id="load-strategy")
                with Vertical():
                    yield Label("context (tokens)")
                    yield Input(str(current.context), id="load-context", type="integer")
                with Vertical():
                    yield Label("dtype")
                    yield Select([(d, d) for d in ("auto", "float32", "float16", "bfloat16")],
                                 value=current.dtype, allow_blank=False, id="load-dtype")
                with Vertical():
                    yield Label("weights")
                    yield Select([(w, w) for w in WEIGHTS], value=current.weights, allow_blank=False,
                                 id="load-weights")
            with Horizontal(classes="load-row"):
                yield Button("Load", variant="primary", id="load-go")
                yield Button("Cancel", id="load-cancel")

    @on(Button.Pressed, "#load-go")
    @on(Input.Submitted)
    def _load(self) -> None:
        context_text = self.query_one("#load-context", Input).value.strip()
        if not (context_text.isascii() and context_text.isdigit()) or int(context_text) < 1:  # "²" is a digit to isdigit()
            self.notify("The context is a number of tokens, at least 1.", severity="error")
            return
        # What the dialog does not show (cluster token, rebalancing, graphs) stays as it was.
        self.dismiss(replace(
            self.current,
            model=self.query_one("#load-model", Input).value.strip() or "default",
            devices=self.query_one("#load-devices", Input).value.strip() or "auto",
            strategy=str(self.query_one("#load-strategy", Select).value),
            context=int(context_text),
            dtype=str(self.query_one("#load-dtype", Select).value),
            weights=str(self.query_one("#load-weights", Select).value),
        ))

    @on(Button.Pressed, "#load-cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
