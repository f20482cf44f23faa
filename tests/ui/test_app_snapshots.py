"""Screenshots of the dashboard, compared with the accepted ones in tests/ui/__snapshots__.

Deterministic by construction: the tiny model on simulated devices (whose memory is exact byte
accounting), the periodic sampler off (the App still takes its one reading after the plan is
shown), device timings frozen, nothing generated, a fixed terminal size. Update with `pytest --snapshot-update`.
"""

from __future__ import annotations

import time

import pytest

from vramancer.app import VramancerApp
from vramancer.config.options import LoadOptions
from vramancer.planning import pricing
from vramancer.profiling import timing as profiler
from vramancer.widgets.devices import DeviceCard


@pytest.fixture(autouse=True)
def frozen_timings(monkeypatch):
    """Device timings are measurements and vary run to run; the header prints the prediction
    made from them. Freeze them for the screenshot, as the sampler is frozen."""

    def fixed(description, devices, dtype, model_key, reprofile=False, weights="native", graphs=False):
        device = pricing.DeviceTimings(0.0002, 0.0, 0.0004, 0.00001, 0.001, 0.0001, "host CPU")
        link = pricing.LinkTimings(latency_s=0.00001, bytes_per_s=10e9)
        return pricing.Timings(
            devices={d.name: device for d in devices},
            links={(a.name, b.name): link for a in devices for b in devices if a is not b},
            step_overhead_s=0.002,
        )

    monkeypatch.setattr(profiler, "measure", fixed)


def dashboard(model_dir: str, devices: str = "sim:3x64MiB") -> VramancerApp:
    return VramancerApp(LoadOptions(model_dir, devices, "proportional", 256, "auto"), telemetry=False)


SETTLE_S = 120  # the first load in a process imports the engine: 17 s on a quiet 2-core machine, 30+ busy


def waiting_for(app) -> str | None:
    """What the dashboard has not shown yet, or None once the load, the plan's tiles, a device
    reading and cards fitted to the panel's room are on screen."""
    cards = app.devices_panel.query(DeviceCard)
    if app.plan is None or app.placement_panel.shown is not app.plan:
        return "the plan's tiles"
    if not cards or any(card.snapshot is None for card in cards):
        return "a device reading"
    if any(card.mode != app.devices_panel.mode_for_size() for card in cards):
        return "the device cards fitted to the panel"
    return None


async def settled(pilot) -> None:
    """Wait for the load, the plan's tiles and the first device reading to be on screen."""
    app = pilot.app
    app.console_panel.prompt.cursor_blink = False  # a blinking cursor is on or off by the clock
    deadline = time.monotonic() + SETTLE_S
    while (missing := waiting_for(app)) is not None:
        assert time.monotonic() < deadline, f"the dashboard did not settle within {SETTLE_S} s: still waiting for {missing}"
        await pilot.pause(0.05)
    await pilot.pause()


def test_main_screen_after_load(snap_compare, tiny_model_dir):
    assert snap_compare(dashboard(tiny_model_dir), terminal_size=(120, 40), run_before=settled)


def test_main_screen_small_terminal(snap_compare, tiny_model_dir):
    assert snap_compare(dashboard(tiny_model_dir), terminal_size=(80, 24), run_before=settled)


def test_help_screen(snap_compare, tiny_model_dir):
    async def open_help(pilot) -> None:
        await settled(pilot)
        await pilot.press("f1")

    assert snap_compare(dashboard(tiny_model_dir), terminal_size=(120, 40), run_before=open_help)


@pytest.mark.parametrize("size", [(80, 24), (120, 40), (200, 50)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("devices", ["sim:2x64MiB", "sim:8x64MiB", "sim:16x64MiB"])
def test_main_screen_of_a_rig(snap_compare, tiny_model_dir, devices, size):
    """Every device's column, and its card, on screen at once (at 80x24 the panels stack and
    scroll); why a device holds nothing is said on it."""
    assert snap_compare(dashboard(tiny_model_dir, devices), terminal_size=size, run_before=settled)


def test_main_screen_in_the_light_theme(snap_compare, tiny_model_dir):
    """Every colour meaning (memory parts, fullness, focus, badge) on Textual's light theme."""

    async def light(pilot) -> None:
        pilot.app.theme = "textual-light"
        await settled(pilot)

    assert snap_compare(dashboard(tiny_model_dir), terminal_size=(120, 40), run_before=light)


def test_main_screen_serving_eight_requests(snap_compare, tiny_model_dir):
    """A server's eight requests beside the console, the batch in the header, outcomes logged.
    The events go through the App's emit from another thread, as the engine worker sends them;
    the requests' clock is fixed so their tok/s are the same on every run."""
    import threading

    from vramancer.engine import events as ev

    def emit(app, events) -> None:
        thread = threading.Thread(target=lambda: [app._emit(e) for e in events])
        thread.start()
        thread.join()

    async def serving(pilot) -> None:
        await settled(pilot)
        app = pilot.app
        requests = app.console_panel.requests
        now = [100.0]
        requests.clock = lambda: now[0]
        prompts = ["Summarise this article", "Translate to French: good morning", "Write a haiku about rain",
                   "What is 17 * 23?", "List three prime numbers", "Explain KV caches briefly",
                   "Name a lighthouse in Brittany", "Say hello"]
        emit(app, [ev.RequestQueued(f"req-{n}", f"127.0.0.1:{5100 + n}", p, 10 + n, 64)
                   for n, p in enumerate(prompts, 1)])
        # Tokens carry the engine's clock; a fixed one, long past, so the tok/s graph is the same
        # (empty: its seconds left the window long ago) on every run.
        emit(app, [ev.RequestStarted(f"req-{n}") for n in range(1, 8)]
             + [ev.Token("a", f"req-{n}", at=100.0) for n in range(1, 8)])
        tokens = lambda n: requests.requests[f"req-{n}"].tokens if f"req-{n}" in requests.requests else 0
        while not all(tokens(n) for n in range(1, 8)):
            await pilot.pause(0.02)
        now[0] = 102.0
        emit(app, [ev.Token("b", f"req-{n}", at=102.0) for n in range(1, 8) for _ in range(4 * n)])
        while tokens(7) < 29:
            await pilot.pause(0.02)
        emit(app, [ev.GenerationDone("req-1", "a" * 5, (1,) * 5, 11, 5, 0.04, 21.0, False, "stop", 0.4),
                   ev.GenerationDone("req-2", "a" * 9, (1,) * 9, 12, 9, 0.05, 19.5, True, "cancelled", 0.6),
                   ev.BatchStatus(5, 1, 92.4, 640, 2048)])
        while not app.header.batch.display or "cancelled" not in app.events_log.entries[-1][0]:
            await pilot.pause(0.02)
        await pilot.pause(0.3)  # the list's next redraw

    assert snap_compare(dashboard(tiny_model_dir), terminal_size=(120, 40), run_before=serving)
