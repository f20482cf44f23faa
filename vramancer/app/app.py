"""The dashboard App: turns engine events into widget updates and user input into commands.

The App thread only renders and handles input. All engine work happens on the EngineWorker's
thread; its events come back through `post_message`, which is safe from any thread.
"""

from __future__ import annotations

import inspect
import threading
from collections import deque
from pathlib import Path

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Footer
from textual.worker import Worker, WorkerState

from vramancer.app.commands import DashboardCommands
from vramancer.app.messages import DevicesSampled, EngineEvent, LinksSampled, TokensReady
from vramancer.app.metrics import metrics_document, write_metrics
from vramancer.app.screens import HelpScreen, LoadModelScreen, MoveTargetScreen
from vramancer.engine import events as ev
from vramancer.engine.devices import parse_device_spec
from vramancer.engine.engine import LoadOptions
from vramancer.engine.errors import VramancerError
from vramancer.engine.migration import part_label
from vramancer.engine.units import format_rate
from vramancer.engine.worker import EngineWorker
from vramancer.lifetime import Lifetime, exit_now
from vramancer.widgets.console import ConsolePanel
from vramancer.widgets.devices import DevicesPanel
from vramancer.widgets.events_log import EventsLog
from vramancer.widgets.header import LoadBar, ModelHeader
from vramancer.widgets.links import LinksPanel
from vramancer.widgets.placement import BlockTile, PlacementPanel

DEFAULT_SAMPLING = {"max_new_tokens": 256, "temperature": 0.0}
SHUTDOWN_TIMEOUT = 5.0


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
    ]

    def __init__(
        self,
        options: LoadOptions | None = None,
        *,
        telemetry: bool = True,
        telemetry_hz: float = 2.0,
        sampling: dict | None = None,
    ) -> None:
        """`options`: what to load at start (None: start empty, load from the palette).
        `telemetry=False` stops the periodic sampler; the App still takes one reading after each
        plan change, so the bars follow moves and a screenshot of them is deterministic."""
        super().__init__()
        self.options = options or LoadOptions()
        self._load_at_start = options is not None
        self.sampling = {**DEFAULT_SAMPLING, **(sampling or {})}
        self.worker = EngineWorker(self._emit, telemetry_hz=telemetry_hz, telemetry=telemetry)
        self.loaded: ev.Loaded | None = None
        self.loading = False
        self.plan: ev.PlanSnapshot | None = None
        self.links: tuple[ev.LinkSnapshot, ...] = ()
        self.migrations: list[ev.MigrationDone] = []
        self.latest_devices: dict[str, ev.DeviceSnapshot] = {}
        self._tokens: deque[ev.Token] = deque()
        self._tokens_lock = threading.Lock()
        self._tokens_signalled = False

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
        with VerticalScroll(id="main"):
            yield self.devices_panel
            yield self.placement_panel
            yield self.links_panel
            yield self.events_log
        yield self.console_panel
        yield Footer()

    def on_mount(self) -> None:
        self.load_bar.display = False
        self.worker.start()
        if self._load_at_start:
            self.load(self.options)
        else:
            self.header.show_failed()
        self.console_panel.prompt.focus()

    def on_unmount(self) -> None:
        self.worker.shutdown(SHUTDOWN_TIMEOUT)

    # --- the engine's threads → the App ------------------------------------------------

    def _emit(self, event: ev.Event) -> None:
        """Called on the worker or telemetry thread: hand the event to the App thread."""
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
        try:
            parse_device_spec(options.devices)
        except VramancerError as exc:
            self.notify(str(exc), title="Cannot load", severity="error")
            return
        self.options = options
        self.loading = True
        self.header.show_loading(options.model, options.devices)
        self.load_bar.start(options.model)
        self.console_panel.ready = False
        self.worker.submit(ev.Load(options))

    def squeeze(self, device: str, release: bool = False) -> None:
        """Let "another process" take a simulated device's free memory and half of what the
        model needs there (or give it all back): memory pressure, for --auto-rebalance to answer."""
        sample = self.latest_devices.get(device)
        if sample is None or self.plan is None:
            self.notify(f"No reading of {device} yet.", severity="warning")
            return
        taken = 0 if release else sample.total - self.plan.needs.get(device, 0) // 2
        self.worker.submit(ev.Reserve(device, taken))

    def replan(self, strategy: str) -> None:
        if self.plan is None:
            self.notify("No model is loaded yet.", severity="warning")
            return
        self.worker.submit(ev.Replan(strategy))

    # --- events in -----------------------------------------------------------------------

    @property
    def _showing(self) -> bool:
        """False once the App is closing: an event that arrives then has nowhere to go."""
        return self.devices_panel.is_attached

    async def on_engine_event(self, message: EngineEvent) -> None:
        """Handled one at a time, in order: a plan is only shown once its device columns exist."""
        if not self._showing:
            return
        event = message.event
        self.events_log.show(event)
        handler = getattr(self, f"_on_{type(event).__name__.lower()}", None)
        if handler is not None:
            result = handler(event)
            if inspect.isawaitable(result):
                await result

    def _on_loadprogress(self, event: ev.LoadProgress) -> None:
        self.load_bar.show(event)

    async def _on_loaded(self, event: ev.Loaded) -> None:
        self.loaded = event
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

    async def _on_planchanged(self, event: ev.PlanChanged) -> None:
        self.plan = event.plan
        await self.placement_panel.show_plan(event.plan)
        self.header.show_strategy(event.plan.strategy)
        self.header.show_speed(predicted=event.plan.predicted_tokens_per_s)
        self.sample_now()

    def _on_migrationdone(self, event: ev.MigrationDone) -> None:
        self.migrations.append(event)
        self.placement_panel.settle(event.first, event.last)
        self.links_panel.show_migration(event)
        self.notify(f"{part_label(event.first, event.last)} {event.src} → {event.dst} · {format_rate(event.gb_per_s * 1e9)}",
                    title="Moved")

    def _on_migrationnotdone(self, event: ev.MigrationNotDone) -> None:
        self.placement_panel.settle(event.first, event.last)
        self.notify(event.reason, title="Move refused", severity="error")

    def _on_generationdone(self, event: ev.GenerationDone) -> None:
        self.on_tokens_ready()  # text still buffered belongs before the end
        self.console_panel.finish(event)
        if event.decode_tokens_per_s:
            self.header.show_speed(measured=event.decode_tokens_per_s)

    def _on_error(self, event: ev.Error) -> None:
        self.notify(event.message, title=f"{event.command} failed", severity="error", timeout=10)
        if event.command == "Load":
            self.loading = False
            self.load_bar.finish()
            header = self.header
            if self.loaded is None:
                header.show_failed()
            else:
                header.show_loaded(self.loaded)
            self.console_panel.ready = self.loaded is not None
        elif event.command == "Generate":
            self.console_panel.fail(event.message)
        elif event.command == "Migrate":
            self.placement_panel.settle_all()

    def on_devices_sampled(self, message: DevicesSampled) -> None:
        if not self._showing:
            return
        self.latest_devices = {d.name: d for d in message.sample.devices}
        self.devices_panel.show_sample(message.sample.devices)
        self.placement_panel.show_sample(message.sample.devices)

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
        pieces: dict[int, list[str]] = {}
        for token in tokens:
            pieces.setdefault(token.request_id, []).append(token.text)
        for request_id, texts in pieces.items():
            console.add_text(request_id, "".join(texts))

    # --- requests from the widgets ---------------------------------------------------------

    @on(ConsolePanel.Ask)
    def _ask(self, message: ConsolePanel.Ask) -> None:
        self.worker.submit(ev.Generate(message.messages, dict(self.sampling), request_id=message.request_id))

    @on(PlacementPanel.MoveRequested)
    def _move(self, message: PlacementPanel.MoveRequested) -> None:
        self.worker.submit(ev.Migrate(message.first, message.last, message.device))

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

        self.push_screen(MoveTargetScreen(part_label(*tile.selection), verdicts), chosen)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """The App's own thread workers (a telemetry reading, an export) report failures here."""
        if event.state == WorkerState.ERROR:
            what = "Exporting metrics" if event.worker.group == "export" else "Reading the devices"
            self.notify(f"{what} failed: {event.worker.error}", severity="error")

    # --- actions ---------------------------------------------------------------------------

    async def action_quit(self) -> None:
        """Quit at once; the worker stops within one decode step (joined on unmount)."""
        self.worker.submit(ev.Shutdown())
        self.exit(0)

    def quit_soon(self, reason: str) -> None:
        """Quit from any thread, a signal handler included (where `call_from_thread` would wait
        on, or refuse, the App's own thread)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            raise SystemExit(0)  # the App is not running (yet or any more): nothing to close
        loop.call_soon_threadsafe(self._quit_now)  # safe in a signal handler: takes no lock

    def _quit_now(self) -> None:
        self.worker.submit(ev.Shutdown())
        self.exit(0)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_cancel(self) -> None:
        console = self.console_panel
        if console.generating:
            self.worker.submit(ev.Cancel(console.streaming))
            console.stats.update("cancelling…")
        elif self.focused is console.prompt:
            self.screen.focus_next(BlockTile)

    def action_new_conversation(self) -> None:
        abandoned = self.console_panel.new_conversation()
        if abandoned is not None:
            self.worker.submit(ev.Cancel(abandoned))

    def action_load_model(self) -> None:
        def chosen(options: LoadOptions | None) -> None:
            if options is not None:
                self.load(options)

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


def run_dashboard(options: LoadOptions) -> int:
    """Open the dashboard on `options`; returns the exit status for the CLI. A closed terminal,
    SIGTERM, SIGHUP or an outside SIGINT quit it like ctrl+q, within the lifetime's deadline."""
    app = VramancerApp(options)
    lifetime = Lifetime(app.quit_soon).install()
    lifetime.watch_terminal()
    code = app.run()
    app.worker.shutdown(SHUTDOWN_TIMEOUT)
    exit_now(code if isinstance(code, int) else (app.return_code or 0))
