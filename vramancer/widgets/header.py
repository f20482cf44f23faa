"""The header line (model, dtype, strategy, devices, a "simulated" badge) and the load bar."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Static

from vramancer.config.units import format_bytes

if TYPE_CHECKING:
    from vramancer.engine.events import BatchStatus, Loaded, LoadProgress



BATCH_MEANING = ("the server's continuous batch: sequences decoding together now, requests waiting for room, "
                 "and tokens/s of all of them together over the last second or so")
SPEED_MEANING = ("predicted: decode tokens/s the engine expects from this placement, priced from the measured "
                 "timings of each device and link · measured: the decode speed of the last answer")


class ModelHeader(Horizontal):
    """What is loaded and where; says plainly when the devices are simulated."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.summary = Static("", id="summary", markup=False)
        self.badge = Static("simulated", id="badge")
        self.badge.display = False
        self.speed = Static("", id="speed", markup=False)
        self.speed.tooltip = SPEED_MEANING
        self.batch = Static("", id="batch", markup=False)
        self.batch.tooltip = BATCH_MEANING
        self.batch.display = False  # only while a server runs
        self._batch_text = ""
        self.loaded: Loaded | None = None
        self.strategy = ""
        self.predicted: float | None = None
        self.measured: float | None = None

    def compose(self) -> ComposeResult:
        yield Static("VRAMancer", id="app-name")
        yield self.summary
        yield self.batch
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

    def show_batch(self, status: BatchStatus) -> None:
        """The server's batch: running and waiting sequences and their aggregate decode speed."""
        self.batch.display = True
        text = f"{status.running} running · {status.waiting} waiting"
        if status.running or status.waiting:  # a rate of nothing running is a stale one: not shown
            text += f" · {status.tokens_per_s:.1f} tok/s"
        # Twice a second while serving. Its width never shrinks (shorter figures are padded), so
        # new figures repaint one line: a layout of the whole screen at each took ~35 ms, and with
        # eight streams key presses waited on it (key → screen p95 64 ms, 22 ms without).
        width = max(len(text), len(self._batch_text))
        text = text.ljust(width)
        if text != self._batch_text:
            grows = width != len(self._batch_text)
            self._batch_text = text
            self.batch.update(text, layout=grows)

    def show_loading(self, model: str, devices: str) -> None:
        self.summary.update(f"loading {model} on {devices}…")

    def show_still_loaded(self) -> None:
        """Back to what is loaded, as it was, after another load failed: its strategy and its
        speeds, not the ones it was loaded with."""
        self._render_summary()
        self.show_speed()

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
        # What matters first: the model, how it is split and over what; then the details.
        sizes = {d.total for d in loaded.devices}
        if len(sizes) == 1 and len(loaded.devices) > 1:
            devices = f"{len(loaded.devices)} × {format_bytes(sizes.pop())} ({_names(loaded.devices)})"
        else:
            devices = ", ".join(f"{d.name} {format_bytes(d.total)}" for d in loaded.devices)
        self.summary.update(f"{loaded.model} · {self.strategy} on {devices} · {loaded.dtype} · "
                            f"context {loaded.context}" + (" · CUDA graphs" if loaded.cuda_graphs else ""))


def _names(devices) -> str:
    """"sim0–sim3" for a run of numbered names, else the names themselves."""
    names = [d.name for d in devices]
    return f"{names[0]}–{names[-1]}" if len(names) > 2 else ", ".join(names)


class LoadBar(Horizontal):
    """Loading's stages, each with the seconds it took (the current one counting), over a bar
    that keeps moving, so a long stage never looks stuck. Hidden when nothing is loading; its
    timer runs only while it shows."""

    COMPONENT_CLASSES = {"loadbar--lit", "loadbar--unlit"}
    TICK_S = 0.25
    LIT = 8  # cells of the moving part of the bar

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.stage = Static("", id="load-stage", markup=False)
        self.bar = Static("", id="load-progress")
        self.what = ""
        self.stages: list[tuple[str, float]] = []  # (stage, when it began)
        self._ticks = 0
        self._timer = None

    def compose(self) -> ComposeResult:
        yield self.stage
        yield self.bar

    def start(self, what: str, stage: str = "starting") -> None:
        self.display = True
        self.what = what
        self.stages = [(stage, time.monotonic())]
        if self._timer is None:
            self._timer = self.set_interval(self.TICK_S, self._tick)
        self._tick()

    def show(self, progress: LoadProgress) -> None:
        if not self.stages:
            self.start(self.what)
        if progress.stage != self.stages[-1][0]:
            self.stages.append((progress.stage, time.monotonic()))
            self._tick()

    def finish(self) -> None:
        self.display = False
        self.stages = []
        if self._timer is not None:
            self._timer.stop()
            self._timer = None

    def stage_text(self, now: float | None = None) -> str:
        """"loading default: importing torch 2.1 s · reading 0.8 s…": every stage so far."""
        now = time.monotonic() if now is None else now
        parts = [f"{name} {end - began:.1f} s" for (name, began), (_, end) in zip(self.stages, self.stages[1:])]
        if self.stages:
            name, began = self.stages[-1]
            parts.append(f"{name} {now - began:.1f} s…")
        return f"loading {self.what}: " + " · ".join(parts)

    def _tick(self) -> None:
        self._ticks += 1
        self.stage.update(self.stage_text())
        width = max(self.bar.size.width, self.LIT + 1)
        span = width - self.LIT
        step = self._ticks % (2 * span)
        start = step if step < span else 2 * span - step  # back and forth
        lit = self.get_component_rich_style("loadbar--lit")
        unlit = self.get_component_rich_style("loadbar--unlit")
        self.bar.update(Text.assemble(("━" * start, unlit), ("━" * self.LIT, lit), ("━" * (width - start - self.LIT), unlit)))
