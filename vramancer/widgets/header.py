"""The header line (model, dtype, strategy, devices, a "simulated" badge) and the load bar."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Label, ProgressBar, Static

from vramancer.engine.events import Loaded, LoadProgress
from vramancer.engine.units import format_bytes


class ModelHeader(Horizontal):
    """What is loaded and where; says plainly when the devices are simulated."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.summary = Static("", id="summary", markup=False)
        self.badge = Static("simulated", id="badge")
        self.badge.display = False
        self.speed = Static("", id="speed", markup=False)
        self.loaded: Loaded | None = None
        self.strategy = ""
        self.predicted: float | None = None
        self.measured: float | None = None

    def compose(self) -> ComposeResult:
        yield Static("VRAMancer", id="app-name")
        yield self.summary
        yield self.speed
        yield self.badge

    def show_speed(self, predicted: float | None = None, measured: float | None = None) -> None:
        """Predicted tokens/s of the current plan beside the last answer's measured decode speed."""
        if predicted is not None:
            self.predicted = predicted
        if measured is not None:
            self.measured = measured
        parts = []
        if self.predicted is not None:
            parts.append(f"predicted {self.predicted:.1f}")
        if self.measured is not None:
            parts.append(f"measured {self.measured:.1f}")
        self.speed.update(f"{' · '.join(parts)} tok/s" if parts else "")

    def show_loading(self, model: str, devices: str) -> None:
        self.summary.update(f"loading {model} on {devices}…")

    def show_failed(self) -> None:
        self.summary.update("no model loaded · ctrl+p → Load model")
        self.badge.display = False

    def show_loaded(self, loaded: Loaded) -> None:
        self.loaded = loaded
        self.predicted = self.measured = None
        self.show_speed()
        self.strategy = loaded.strategy
        self.badge.display = loaded.simulated
        self.badge.update("simulated · no GPU found" if loaded.simulated_fallback else "simulated")
        self._render_summary()

    def show_strategy(self, strategy: str) -> None:
        self.strategy = strategy
        self._render_summary()

    def _render_summary(self) -> None:
        loaded = self.loaded
        if loaded is None:
            return
        devices = ", ".join(f"{d.name} {format_bytes(d.total)}" for d in loaded.devices)
        self.summary.update(f"{loaded.model} · {loaded.dtype} · {self.strategy} · context {loaded.context} · "
                            f"{len(loaded.devices)} devices: {devices}")


class LoadBar(Horizontal):
    """Loading's stage and progress; hidden when nothing is loading."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.stage = Label("", id="load-stage")
        self.bar = ProgressBar(total=1.0, show_eta=False, id="load-progress")

    def compose(self) -> ComposeResult:
        yield self.stage
        yield self.bar

    def start(self, model: str) -> None:
        self.display = True
        self.stage.update(f"loading {model}: starting")
        self.bar.update(progress=0.0)

    def show(self, progress: LoadProgress) -> None:
        self.display = True
        self.stage.update(f"loading: {progress.stage}")
        self.bar.update(progress=progress.fraction)

    def finish(self) -> None:
        self.display = False
