"""Screenshots of the dashboard, compared with the accepted ones in tests/__snapshots__.

Deterministic by construction: the tiny model on simulated devices (whose memory is exact byte
accounting), the periodic sampler off (the App still takes its one reading after the plan is
shown), device timings frozen, nothing generated, a fixed terminal size. Update with `pytest --snapshot-update`.
"""

from __future__ import annotations

import time

import pytest

from vramancer.app import VramancerApp
from vramancer.engine import profiler
from vramancer.engine.options import LoadOptions
from vramancer.widgets.devices import DeviceCard


@pytest.fixture(autouse=True)
def frozen_timings(monkeypatch):
    """Device timings are measurements and vary run to run; the header prints the prediction
    made from them. Freeze them for the screenshot, as the sampler is frozen."""

    def fixed(config, meta_model, devices, dtype, model_key, reprofile=False):
        device = profiler.DeviceTimings(0.0002, 0.0, 0.0004, 0.00001, 0.001, 0.0001, "host CPU")
        link = profiler.LinkTimings(latency_s=0.00001, bytes_per_s=10e9)
        return profiler.Timings(
            devices={d.name: device for d in devices},
            links={(a.name, b.name): link for a in devices for b in devices if a is not b},
            step_overhead_s=0.002,
        )

    monkeypatch.setattr(profiler, "measure", fixed)


def dashboard(model_dir: str, devices: str = "sim:3x64MiB") -> VramancerApp:
    return VramancerApp(LoadOptions(model_dir, devices, "proportional", 256, "auto"), telemetry=False)


async def settled(pilot) -> None:
    """Wait for the load, the plan's tiles and the first device reading to be on screen."""
    app = pilot.app
    app.console_panel.prompt.cursor_blink = False  # a blinking cursor is on or off by the clock
    deadline = time.monotonic() + 30
    while not (app.plan is not None and app.placement_panel.shown is app.plan
               and all(card.snapshot is not None for card in app.devices_panel.query(DeviceCard))
               and app.devices_panel.query(DeviceCard)):
        assert time.monotonic() < deadline, "the dashboard did not settle within 30 s"
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


@pytest.mark.parametrize("devices, size", [("sim:4x64MiB", (120, 40)), ("sim:8x64MiB", (120, 40)),
                                           ("sim:16x64MiB", (200, 50))])
def test_main_screen_of_a_rig(snap_compare, tiny_model_dir, devices, size):
    """Every device's column, and its card, on screen at once."""
    assert snap_compare(dashboard(tiny_model_dir, devices), terminal_size=size, run_before=settled)
