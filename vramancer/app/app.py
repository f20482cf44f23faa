"""The dashboard App: turns engine events into widget updates and user input into commands.

The App thread only renders and handles input. All engine work happens on the EngineWorker's
thread; its events come back through `post_message`, which is safe from any thread.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Footer
from textual.worker import Worker, WorkerState

from vramancer.app.commands import DashboardCommands
from vramancer.app.messages import (
    DevicesSampled,
    EngineEvent,
    LinksSampled,
    TokensReady,
)
from vramancer.app.metrics import metrics_document, write_metrics
from vramancer.config.options import LoadOptions
from vramancer.config.units import format_bytes, format_rate
from vramancer.platforms.lifetime import Lifetime, exit_now
from vramancer.widgets.charts import spark
from vramancer.widgets.console import ConsolePanel
from vramancer.widgets.devices import MEMORY_PARTS, DevicesPanel
from vramancer.widgets.events_log import EventsLog, request_outcome
from vramancer.widgets.header import LoadBar, ModelHeader
from vramancer.widgets.labels import part_label
from vramancer.widgets.links import DECODE_BIN_S, LinksPanel, per_second
from vramancer.widgets.placement import BlockTile, PlacementPanel, why_empty

if TYPE_CHECKING:  # the engine (and torch) is imported after the first frame, on a thread
    from vramancer.engine import events as ev
    from vramancer.engine.worker import EngineWorker

DEFAULT_SAMPLING = {"max_new_tokens": 256, "temperature": 0.0}
_PART_STYLE = {label: style for label, _, style in MEMORY_PARTS}
# How long quitting waits for the worker: it stops within one decode step (milliseconds); a
# load in progress cannot stop part-way, and its daemon thread ends with the process.
SHUTDOWN_TIMEOUT = 1.0
IMPORT_STAGE = "importing torch, transformers"
# Device and link readings per second: once a second, what nvitop defaults to (btop: every 2 s).
# The engine's own default is twice (engine/telemetry.py; docs/design/scheduling.md); at that rate
# the idle dashboard measured 1.9-3.6 % of a core against 1.5-1.7 % at once a second (`vramancer
# --devices auto` in a pseudo-terminal, 120x40 and 200x60), over the 2 % budget, for no reading
# a person can use.
TELEMETRY_HZ = 1.0
# A move's "moving…" line waits this long, and is never written when the move is done by then.
# Written at once, it was laid out and drawn while the move copied, and the App thread's work
# took the GIL the worker needed between its copies: the dashboard's moves ran at about half
# the command line's speed. A person cannot read a line shown for 20 ms anyway.
MOVING_NOTE_AFTER_S = 0.25

Handler = Callable[["ev.Event"], "Awaitable[None] | None"]


class VramancerApp(App[int]):
    """VRAMancer's dashboard: devices, placement, links, console and events of one model."""

    CSS_PATH = Path(__file__).parent.parent / "vramancer.tcss"
    TITLE = "VRAMancer"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (100, "-wide")]
    COMMANDS = App.COMMANDS | {DashboardCommands}
    BINDINGS = [
        Binding("ctrl+q", "quit", "Quit", priority=True),
        Binding("q", "quit", "Quit", show=False),
        Binding("f1", "help", "Help"),
        Binding("question_mark", "help", "Help", show=False),
        Binding("escape", "cancel", "Cancel / leave prompt"),
        Binding("ctrl+l", "new_conversation", "New chat"),
        Binding("ctrl+e", "export_metrics", "Export", show=False),
        # Single keys act off the prompt (in it they type); f1 and ctrl+q work anywhere.
        Binding("slash", "focus_prompt", "Prompt"),
        Binding("p", "focus_placement", "Placement"),
        Binding("z", "zoom", "Zoom"),
        Binding("f2", "zoom", "Zoom", show=False),  # from the prompt too, where z types
    ]
    PANELS = ("#devices", "#placement", "#links", "#events", "#console")

    def __init__(
        self,
        options: LoadOptions | None = None,
        *,
        telemetry: bool = True,
        telemetry_hz: float = TELEMETRY_HZ,
        sampling: dict | None = None,
        prepare: Callable[[], None] | None = None,
        serve_port: int | None = None,
        serve_settings: dict | None = None,
    ) -> None:
        """`options`: what to load at start (None: start empty, load from the palette).
        `telemetry=False` stops the periodic sampler; the App still takes one reading after each
        plan change, so the bars follow moves and a screenshot of them is deterministic.
        `prepare` runs on the start thread before the engine is imported (the CLI's torch
        thread count and library quieting), so none of it delays the first frame.
        `serve_port`: also serve the OpenAI-compatible API on 127.0.0.1 at that port, from this
        dashboard's worker (its events fan out to the App and to the server); `serve_settings`:
        the server's own (InferenceServer's keywords: api_key, limits, cors_origins,
        allowed_hosts) and the batch's size (max_batch), as `vramancer serve` takes them."""
        super().__init__()
        self.options = options or LoadOptions()
        self._load_at_start = options is not None
        self.sampling = {**DEFAULT_SAMPLING, **(sampling or {})}
        self._prepare = prepare
        self._telemetry = (telemetry, telemetry_hz)
        self.worker: EngineWorker | None = None  # made once the engine is imported, after the first frame
        self._serve_port = serve_port
        self._serve_settings = dict(serve_settings or {})
        self.server = None  # the InferenceServer, with --serve
        self.start_error: str | None = None  # why the start-up load could not even begin (CLI: exit 2)
        self._handlers: dict[type, Handler] = {}
        self._moved_since_plan: list[ev.MigrationDone] = []  # reported moves the next plan includes
        self.loaded: ev.Loaded | None = None
        self._loaded_options: LoadOptions | None = None  # what `loaded` was loaded with
        self.loading = False
        self.plan: ev.PlanSnapshot | None = None
        self.links: tuple[ev.LinkSnapshot, ...] = ()
        self.migrations: list[ev.MigrationDone] = []
        self.latest_devices: dict[str, ev.DeviceSnapshot] = {}
        self._tokens: deque[ev.Token] = deque()
        self._tokens_lock = threading.Lock()
        self._tokens_signalled = False
        self._moving_note = None  # the timer that writes a long move's "moving…" line

    def compose(self) -> ComposeResult:
        # Kept as attributes: App.query_one searches the active screen, which is a modal
        # (help, move target, load) at times when engine events still arrive.
        self.header = ModelHeader(id="header")
        self.load_bar = LoadBar(id="loading")
        self.devices_panel = DevicesPanel(id="devices")
        self.placement_panel = PlacementPanel(id="placement")
        self.links_panel = LinksPanel(id="links")
        self.events_log = EventsLog(id="events")
        self.console_panel = ConsolePanel(id="console")
        yield self.header
        yield self.load_bar
        with VerticalScroll(id="main", can_focus=False):  # a layout; its panels are the focus stops
            yield self.devices_panel
            yield self.placement_panel
            yield self.links_panel
            yield self.events_log
        yield self.console_panel
        yield Footer()

    def on_mount(self) -> None:
        self.load_bar.display = False
        if self._load_at_start:
            self.header.show_loading(self.options.model, self.options.devices)
            self.load_bar.start(self.options.model, IMPORT_STAGE)
        else:
            self.header.show_failed()
        self.console_panel.prompt.focus()
        # The first frame first, then the heavy imports. On a daemon thread of its own, not a
        # Textual thread worker: the event loop waits for those at exit, and a quit during the
        # imports must not wait for torch.
        self.call_after_refresh(threading.Thread(target=self._start_engine, name="vramancer-start", daemon=True).start)

    def on_unmount(self) -> None:
        if self.server is not None:
            self.server.stop(0.3)
        if self.worker is not None:
            self.worker.shutdown(SHUTDOWN_TIMEOUT)

    def _start_engine(self) -> None:
        """Import the engine (torch, transformers: seconds) off the App thread, then start it.
        The dialogs come first: their widgets (Markdown and what it brings, OptionList) are not
        needed for the first frame, and importing them before it cost about an eighth of its
        time (0.94 s against 0.82 s at a load average of 8 on 2 cores)."""
        try:
            import vramancer.app.screens  # noqa: F401
            if self._prepare is not None:
                self._prepare()
            from vramancer.config.device_spec import parse_device_spec
            from vramancer.config.errors import VramancerError
            from vramancer.engine.worker import EngineWorker
        except Exception as exc:  # a broken install: say so on screen rather than sit at "importing"
            self._from_thread(self.notify, f"Starting the engine failed: {type(exc).__name__}: {exc}",
                              severity="error", timeout=30)
            return

        telemetry, hz = self._telemetry
        server, emit = None, self._emit
        if self._serve_port is not None:
            from vramancer.server.service import InferenceServer

            settings = {k: v for k, v in self._serve_settings.items() if k != "max_batch"}
            server = InferenceServer(quiet=True, **settings)
            emit = _fan_out(self._emit, server.on_event)
        batch = {"max_batch": self._serve_settings["max_batch"]} if "max_batch" in self._serve_settings else {}
        worker = EngineWorker(emit, telemetry_hz=hz, telemetry=telemetry, **batch)
        refusal = None
        if self._load_at_start:
            try:
                parse_device_spec(self.options.devices)
            except VramancerError as exc:
                refusal = str(exc)
        if server is not None and refusal is None:
            server.submit = worker.submit
            server.tokenizer_source = lambda: getattr(worker.engine, "tokenizer", None)
            try:
                server.start("127.0.0.1", self._serve_port)
                self.server = server
            except VramancerError as exc:
                refusal = str(exc)
        self._from_thread(self._engine_started, worker, refusal)

    def _from_thread(self, callback, *args, **kwargs) -> None:
        """call_from_thread, unless the App has already closed (quit during the imports)."""
        try:
            self.call_from_thread(callback, *args, **kwargs)
        except RuntimeError:
            pass

    def _engine_started(self, worker: EngineWorker, refusal: str | None) -> None:
        if self._exit:  # quit while the engine was being imported: nothing to start
            return
        self.worker = worker.start()
        self._handlers = self.event_handlers()
        if refusal is not None:  # the command line's --devices is malformed: say so, as the CLI does
            self.start_error = refusal
            self.exit(2, return_code=2)
        elif self._load_at_start:
            self.load(self.options)
        if self.server is not None and refusal is None:
            self.notify(f"OpenAI-compatible API on {self.server.url}", title="Serving")

    # --- the engine's threads → the App ------------------------------------------------

    def _emit(self, event: ev.Event) -> None:
        """Called on the worker or telemetry thread: hand the event to the App thread."""
        from vramancer.engine import events as ev

        if isinstance(event, ev.Token):
            with self._tokens_lock:
                self._tokens.append(event)
                if self._tokens_signalled:
                    return  # the App has yet to drain the buffer: it will find this one there too
                self._tokens_signalled = True
            message = TokensReady()
        elif isinstance(event, ev.DeviceSample):
            message = DevicesSampled(event)
        elif isinstance(event, ev.LinkSample):
            message = LinksSampled(event)
        else:
            message = EngineEvent(event)
        try:
            self.post_message(message)
        except RuntimeError:
            pass  # the App's loop is already closed: nobody is left to show it

    @work(thread=True, exclusive=True, group="sample", exit_on_error=False)
    def sample_now(self) -> None:
        """One telemetry reading now, off the App thread, so the bars follow a plan change at once."""
        events = self.worker.telemetry.sample()
        for event in events or ():
            self._emit(event)

    # --- commands out --------------------------------------------------------------------

    def load(self, options: LoadOptions) -> None:
        """Ask the worker to load `options`; the current model (if any) serves until it is done."""
        if self.worker is None:
            self.notify("The engine is still starting; try again in a moment.", severity="warning")
            return
        from vramancer.config.device_spec import parse_device_spec
        from vramancer.config.errors import VramancerError
        from vramancer.engine import events as ev

        try:
            parse_device_spec(options.devices)
        except VramancerError as exc:
            self.notify(str(exc), title="Cannot load", severity="error")
            return
        self.options = options
        self.loading = True
        self.header.show_loading(options.model, options.devices)
        if not self.load_bar.stages:  # the start-up load carries on from its import stage
            self.load_bar.start(options.model, "reading")
        self.console_panel.ready = False
        self.worker.submit(ev.Load(options))

    def squeeze(self, device: str, release: bool = False) -> None:
        """Let "another process" take a simulated device's free memory and half of what the
        model needs there (or give it all back): memory pressure, for --auto-rebalance to answer."""
        sample = self.latest_devices.get(device)
        if sample is None or self.plan is None:
            self.notify(f"No reading of {device} yet.", severity="warning")
            return
        from vramancer.engine import events as ev

        taken = 0 if release else sample.total - self.plan.needs.get(device, 0) // 2
        self.worker.submit(ev.Reserve(device, taken))

    def replan(self, strategy: str) -> None:
        if self.plan is None:
            self.notify("No model is loaded yet.", severity="warning")
            return
        from vramancer.engine import events as ev

        self.worker.submit(ev.Replan(strategy))

    # --- events in -----------------------------------------------------------------------

    @property
    def _showing(self) -> bool:
        """False once the App is closing: an event that arrives then has nowhere to go."""
        return self.devices_panel.is_attached

    def event_handlers(self) -> dict[type, Handler]:
        """The one handler for each kind of engine event the App is sent one by one (tokens and
        telemetry come as messages of their own). An event type missing here is an error."""
        from vramancer.engine import events as ev

        return {
            ev.LoadProgress: self._on_load_progress,
            ev.Loaded: self._on_loaded,
            ev.PlanChanged: self._on_plan_changed,
            ev.MigrationStarted: self._on_migration_started,
            ev.MigrationDone: self._on_migration_done,
            ev.MigrationNotDone: self._on_migration_refused,
            ev.GenerationDone: self._on_generation_done,
            ev.Notice: self._logged_only,
            ev.DeviceFault: self._logged_only,
            ev.Error: self._on_error,
            **self.server_event_handlers(),
        }

    def handler_for(self, event_type: type) -> Handler:
        try:
            return self._handlers[event_type]
        except KeyError:
            raise LookupError(f"the dashboard has no handler for {event_type.__name__} events") from None

    async def on_engine_event(self, message: EngineEvent) -> None:
        """Handled one at a time, in order: a plan is only shown once its device columns exist."""
        from vramancer.engine import events as ev

        if not self._showing:
            return
        event = message.event
        if not isinstance(event, ev.MigrationStarted):  # its line waits: see MOVING_NOTE_AFTER_S
            self.events_log.show(event)
        result = self.handler_for(type(event))(event)
        if result is not None:
            await result

    def _logged_only(self, event: ev.Event) -> None:
        """Events whose whole effect on screen is their line in the events log."""

    def _on_load_progress(self, event: ev.LoadProgress) -> None:
        self.load_bar.show(event)

    async def _on_loaded(self, event: ev.Loaded) -> None:
        self.loaded = event
        self._loaded_options = self.options
        self.loading = False
        self.plan = None
        self.links = ()
        self.migrations = []
        self.load_bar.finish()
        self.header.show_loaded(event)
        await self.devices_panel.set_devices(event.devices)
        await self.placement_panel.set_devices(event.devices)
        await self.links_panel.reset()
        console = self.console_panel
        console.stop_streaming()
        console.ready = True

    async def _on_plan_changed(self, event: ev.PlanChanged) -> None:
        before = self.plan
        if before is not None:
            self._log_plan_moves(before, event.plan, self._moved_since_plan, event.seconds)
        self._moved_since_plan = []
        self.plan = event.plan
        await self.placement_panel.show_plan(event.plan)
        self.header.show_strategy(event.plan.strategy)
        self.header.show_speed(predicted=event.plan.predicted_tokens_per_s)
        self.sample_now()

    def _log_plan_moves(self, before: ev.PlanSnapshot, after: ev.PlanSnapshot,
                        reported: list[ev.MigrationDone], seconds: float | None = None) -> None:
        """Moves a new plan made that no migration event reported (a re-plan moves parts in one
        go): a line each in the events log, and the last of them in the links panel; then, with
        the re-plan's time, all of them together with their GB/s (the engine times the re-plan
        as a whole, not each part)."""
        told = {(m.first, m.last, m.dst) for m in reported}
        moved = 0
        count = 0
        for first, last, src, dst in plan_moves(before, after):
            if any(_covers(m, first, last, dst) for m in told):
                continue
            size = after.part_bytes(first, last)
            moved += size
            count += 1
            self.events_log.note(f"re-plan moved {part_label(first, last)} {src} → {dst} · {format_bytes(size)}", "green")
            self.links_panel.show_replan_move(part_label(first, last), src, dst, size)
        if count and seconds:
            self.events_log.note(f"re-plan: {count} move{'s' if count > 1 else ''}, {format_bytes(moved)} in "
                                 f"{seconds * 1000:.1f} ms · {format_rate(moved / seconds)}", "green")

    def _on_migration_started(self, event: ev.MigrationStarted) -> None:
        self._end_moving_note()
        self._moving_note = self.set_timer(MOVING_NOTE_AFTER_S, lambda: self.events_log.show(event))

    def _end_moving_note(self) -> None:
        """The move ended before its "moving…" line was due: that line is not written."""
        if self._moving_note is not None:
            self._moving_note.stop()
            self._moving_note = None

    def _on_migration_done(self, event: ev.MigrationDone) -> None:
        self._end_moving_note()
        self._moved_since_plan.append(event)
        self.migrations.append(event)
        self.placement_panel.settle(event.first, event.last)
        self.links_panel.show_migration(event)
        self.notify(f"{part_label(event.first, event.last)} {event.src} → {event.dst} · {format_rate(event.gb_per_s * 1e9)}",
                    title="Moved")

    def _on_migration_refused(self, event: ev.MigrationNotDone) -> None:
        self._end_moving_note()
        self.placement_panel.settle(event.first, event.last)
        self.notify(event.reason, title="Move refused", severity="error")

    def _on_generation_done(self, event: ev.GenerationDone) -> None:
        self.on_tokens_ready()  # text still buffered belongs before the end
        self.links_panel.decode.finish(event.request_id, event.new_tokens)
        self.links_panel.decode.show(time.monotonic())
        self._close_decode_seconds()
        if isinstance(event.request_id, str):  # a server request's, not the console's
            self._on_request_done(event)
            return
        self.console_panel.finish(event)
        if event.decode_tokens_per_s:
            self.header.show_speed(measured=event.decode_tokens_per_s)

    def _on_error(self, event: ev.Error) -> None:
        self.notify(event.message, title=f"{event.command} failed", severity="error", timeout=10)
        if event.command == "Load":
            self.loading = False
            self.load_bar.finish()
            if self.loaded is None:
                self.header.show_failed()
            else:  # the model loaded before still runs, as it was; the dialog offers its options again
                self.header.show_still_loaded()
                self.options = self._loaded_options or self.options
            self.console_panel.ready = self.loaded is not None
        elif event.command == "Generate":
            self.console_panel.fail(event.message)
        elif event.command == "Migrate":
            self._end_moving_note()
            self.placement_panel.settle_all()

    def on_devices_sampled(self, message: DevicesSampled) -> None:
        if not self._showing:
            return
        self.latest_devices = {d.name: d for d in message.sample.devices}
        self.devices_panel.show_sample(message.sample.devices, message.sample.tiers)
        self.placement_panel.show_sample(message.sample.devices)
        self.links_panel.decode.show(time.monotonic())

    def on_links_sampled(self, message: LinksSampled) -> None:
        if not self._showing:
            return
        self.links = message.sample.links
        self.links_panel.show_sample(message.sample.links)

    def on_tokens_ready(self, message: TokensReady | None = None) -> None:
        with self._tokens_lock:
            tokens = list(self._tokens)
            self._tokens.clear()
            self._tokens_signalled = False
        if not self._showing:
            return
        console = self.console_panel
        decode = self.links_panel.decode
        answers: dict[int | str, list[ev.Token]] = {}
        for token in tokens:
            answers.setdefault(token.request_id, []).append(token)
            decode.add(token.request_id, token.step, token.at)
        for request_id, told in answers.items():
            text = "".join(t.text for t in told)
            if isinstance(request_id, str):  # a server request: counted in its line, not shown in full
                console.requests.add_tokens(request_id, len(told))
            else:
                console.add_text(request_id, text, step=told[-1].step, at=told[-1].at)
        if tokens:
            decode.show(time.monotonic())

    def _close_decode_seconds(self) -> None:
        """The tok/s graph draws whole seconds: a second after an answer ends, its last second
        is whole, so draw it then rather than wait for the next device reading."""
        self.set_timer(1.05 * DECODE_BIN_S, lambda: self.links_panel.decode.show(time.monotonic()))

    # --- a server's requests (`vramancer --serve`) -------------------------------------------

    def server_event_handlers(self) -> dict[type, Handler]:
        """The continuous batch's events: each request on a line of the console, the batch in
        the header, each outcome in the events log."""
        from vramancer.engine import events as ev

        return {
            ev.RequestQueued: self._on_request_queued,
            # A completion's echoed prompt, scored: for its HTTP client alone, nothing to show here.
            ev.PromptScored: lambda event: None,
            ev.RequestStarted: self._on_request_started,
            ev.RequestRefused: self._on_request_refused,
            ev.BatchStatus: self._on_batch_status,
        }

    def _on_request_queued(self, event: ev.RequestQueued) -> None:
        self.console_panel.serving().queued(event)

    def _on_request_started(self, event: ev.RequestStarted) -> None:
        self.console_panel.requests.started(event.request_id)

    def _on_request_done(self, event: ev.GenerationDone) -> None:
        request = self.console_panel.serving().done(event)
        self.events_log.note(*request_outcome(request, event.total_s))

    def _on_request_refused(self, event: ev.RequestRefused) -> None:
        request = self.console_panel.serving().refused(event)
        self.events_log.note(*request_outcome(request))

    def _on_batch_status(self, event: ev.BatchStatus) -> None:
        self.header.show_batch(event)

    # --- requests from the widgets ---------------------------------------------------------

    @on(ConsolePanel.Ask)
    def _ask(self, message: ConsolePanel.Ask) -> None:
        from vramancer.engine import events as ev

        self.worker.submit(ev.Generate(message.messages, dict(self.sampling), request_id=message.request_id))

    @on(PlacementPanel.MoveRefused)
    def _move_refused(self, message: PlacementPanel.MoveRefused) -> None:
        self.events_log.note(f"refused {part_label(message.first, message.last)} → {message.device}: "
                             f"{message.reason}", "yellow")
        self.notify(message.reason, title="Won't fit", severity="error")

    @on(PlacementPanel.MoveRequested)
    def _move(self, message: PlacementPanel.MoveRequested) -> None:
        from vramancer.engine import events as ev

        # Sent once the screen shows the tile moving: that frame (a layout) drawn while the move
        # copied took the GIL the worker needed between its copies (the App thread ran a median
        # 9.5 ms during a 33 MiB move, 1.1 ms once the frame came first).
        self.call_after_refresh(self.worker.submit, ev.Migrate(message.first, message.last, message.device))

    @on(BlockTile.DetailWanted)
    @on(DevicesPanel.DetailWanted)
    def _open_detail(self, message: BlockTile.DetailWanted | DevicesPanel.DetailWanted) -> None:
        from vramancer.app.screens import DeviceDetailScreen

        if message.device in self.devices_panel.cards and not isinstance(self.screen, DeviceDetailScreen):
            self.push_screen(DeviceDetailScreen(message.device, self.device_detail))

    def device_detail(self, device: str) -> Text:
        """What the detail of `device` shows: each memory part over time (on the device's size),
        the parts the plan put there, and the links that carried data to or from it."""
        card = self.devices_panel.cards[device]
        info = card.info
        text = Text()
        kind = "simulated" if info.simulated else info.label
        text.append(f"{device}", "bold")
        text.append(f"  {kind} · {format_bytes(info.total)}" + (f" · {info.host}" if info.host else "") + "\n\n")
        text.append("memory over time", "bold")
        text.append(f"  (0–{format_bytes(info.total)} · a reading a cell · {card._window_s():.0f} s)\n")
        width = max(self.size.width - 50, 10)
        for label, history in card.part_history.items():
            now = format_bytes(history[-1]) if history else "—"
            text.append(f"  {label:<16}")
            text.append(spark(history, info.total, width), card.component_style(_PART_STYLE[label]))
            text.append(f" {now}\n")
        text.append("\nplaced here\n", "bold")
        plan = self.plan
        if plan is not None:
            parts = ([("embed", "embed")] if plan.embed == device else []) + \
                [(b.first_layer, b.last_layer) for b in plan.blocks if b.device == device] + \
                ([("head", "head")] if plan.head == device else [])
            for first, last in parts:
                text.append(f"  {part_label(first, last):<16}{format_bytes(plan.part_bytes(first, last))}\n")
            if not parts:
                text.append(f"  nothing · {why_empty(plan, device)}\n")
            need = plan.needs.get(device)
            if need is not None:
                text.append(f"  needs {format_bytes(need)} in all (weights, KV cache for {plan.context} tokens, "
                            f"workspace, reserve)\n")
        text.append("\nlinks\n", "bold")
        rows = [r for (src, dst), r in self.links_panel.rows.items() if device in (src, dst)]
        for row in rows:
            last = row.last
            text.append(f"  {row.src} → {row.dst}  now {per_second(row.rate_now)} · peak {per_second(row.peak())} · "
                        f"{format_bytes(last.bytes)} in {last.transfers} transfers\n")
        if not rows:
            text.append("  no data has crossed a link to or from it yet\n")
        return text

    @on(BlockTile.TargetWanted)
    def _choose_target(self, message: BlockTile.TargetWanted) -> None:
        tile = message.tile
        panel = self.placement_panel
        verdicts = panel.targets(tile)
        if not verdicts:
            self.notify("There is no other device to move to.", severity="warning")
            return

        def chosen(device: str | None) -> None:
            if device is not None and tile.is_attached:
                panel.request_move(tile, device)

        from vramancer.app.screens import MoveTargetScreen

        self.push_screen(MoveTargetScreen(part_label(*tile.selection), verdicts), chosen)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """The App's own thread workers (a telemetry reading, an export) report failures here."""
        if event.state == WorkerState.ERROR:
            what = "Exporting metrics" if event.worker.group == "export" else "Reading the devices"
            self.notify(f"{what} failed: {event.worker.error}", severity="error")

    # --- actions ---------------------------------------------------------------------------

    async def action_quit(self) -> None:
        """Quit at once; the worker stops within one decode step (joined on unmount)."""
        self._quit_now()

    def quit_soon(self, reason: str) -> None:
        """Quit from any thread, a signal handler included (where `call_from_thread` would wait
        on, or refuse, the App's own thread)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            raise SystemExit(0)  # the App is not running (yet or any more): nothing to close
        loop.call_soon_threadsafe(self._quit_now)  # safe in a signal handler: takes no lock

    def _quit_now(self) -> None:
        if self.worker is not None:
            from vramancer.engine import events as ev

            self.worker.submit(ev.Shutdown())
        self.exit(0)

    def action_help(self) -> None:
        from vramancer.app.screens import HelpScreen

        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_cancel(self) -> None:
        console = self.console_panel
        if console.generating:
            from vramancer.engine import events as ev

            self.worker.submit(ev.Cancel(console.streaming))
            console.stats.update("cancelling…")
        elif self.focused is console.prompt:
            self.screen.focus_next(BlockTile)

    def action_zoom(self) -> None:
        """The panel holding the focus over the whole screen, or, zoomed, back in its place."""
        screen = self.screen
        if screen is not self.screen_stack[0]:
            return  # a dialog is open
        if screen.maximized is not None:
            screen.minimize()
            return
        focused = self.focused
        panels = [self.query_one(selector) for selector in self.PANELS]
        panel = next((p for p in panels if focused is not None and focused in (p, *p.walk_children())), None)
        if panel is None:
            self.notify("Focus a panel first (tab), then press z.", severity="warning")
            return
        screen.maximized = panel

    def action_focus_prompt(self) -> None:
        self.console_panel.prompt.focus()

    def action_focus_placement(self) -> None:
        """Focus the tile of the first layers (or the first tile there is)."""
        tiles = list(self.placement_panel.query(BlockTile))
        if not tiles:
            self.notify("Nothing is placed yet.", severity="warning")
            return
        first = next((t for t in tiles if t.first == 0), tiles[0])
        first.focus()

    def action_new_conversation(self) -> None:
        abandoned = self.console_panel.new_conversation()
        if abandoned is not None:
            from vramancer.engine import events as ev

            self.worker.submit(ev.Cancel(abandoned))

    def action_load_model(self) -> None:
        def chosen(options: LoadOptions | None) -> None:
            if options is not None:
                self.load(options)

        from vramancer.app.screens import LoadModelScreen

        self.push_screen(LoadModelScreen(self.options), chosen)

    def action_export_metrics(self) -> None:
        self._export(metrics_document(self.loaded, self.plan, self.links, list(self.migrations), {}))

    @work(thread=True, group="export", exit_on_error=False)
    def _export(self, document: dict) -> None:
        """History is copied and the file written off the App thread."""
        document["telemetry"] = self.worker.telemetry.history()
        try:
            path = write_metrics(document)
        except OSError as exc:
            self.call_from_thread(self.notify, f"Could not write metrics: {exc}", severity="error")
            return
        self.call_from_thread(self.notify, f"Metrics written to {path}", title="Exported")
        self.call_from_thread(self.events_log.note, f"metrics exported to {path}", "dim")


def plan_moves(before: ev.PlanSnapshot, after: ev.PlanSnapshot) -> list[tuple[int | str, int | str, str, str]]:
    """(first, last, from, to) for every run of parts that sits on another device in `after`."""
    moves: list[tuple[int | str, int | str, str, str]] = []
    if before.embed != after.embed:
        moves.append(("embed", "embed", before.embed, after.embed))
    pairs = list(zip(before.layer_devices, after.layer_devices))
    start: int | None = None  # first layer of the run of moved layers being gathered
    for layer, pair in enumerate([*pairs, ("", "")]):  # a sentinel closes the last run
        if start is not None and pair != pairs[start]:
            moves.append((start, layer - 1, *pairs[start]))
            start = None
        if start is None and pair[0] != pair[1]:
            start = layer
    if before.head != after.head:
        moves.append(("head", "head", before.head, after.head))
    return moves


def _covers(told: tuple, first: int | str, last: int | str, dst: str) -> bool:
    """Whether a reported migration (first, last, dst) includes the move first..last → dst."""
    t_first, t_last, t_dst = told
    if t_dst != dst:
        return False
    if isinstance(first, str) or isinstance(t_first, str):
        return first == t_first
    return int(t_first) <= int(first) and int(last) <= int(t_last)


def _fan_out(*sinks: Callable[[ev.Event], None]) -> Callable[[ev.Event], None]:
    """One emit for the worker that hands each event to every sink, in order."""

    def emit(event: ev.Event) -> None:
        for sink in sinks:
            sink(event)

    return emit


def run_dashboard(options: LoadOptions, prepare: Callable[[], None] | None = None,
                  serve_port: int | None = None, serve_settings: dict | None = None) -> int:
    """Open the dashboard on `options`; returns the exit status for the CLI. `prepare` runs
    off the App thread before the engine is imported (see VramancerApp). A closed terminal,
    SIGTERM, SIGHUP or an outside SIGINT quit it like ctrl+q, within the lifetime's deadline.
    `serve_port` (--serve): the OpenAI-compatible server runs in this process too, with
    `serve_settings` (see VramancerApp)."""
    app = VramancerApp(options, prepare=prepare, serve_port=serve_port, serve_settings=serve_settings)
    lifetime = Lifetime(app.quit_soon).install()
    lifetime.watch_terminal()
    code = app.run()  # the worker was stopped as the App unmounted
    if app.start_error is not None:
        print(f"vramancer: {app.start_error}", file=sys.stderr)
    exit_now(code if isinstance(code, int) else (app.return_code or 0))
