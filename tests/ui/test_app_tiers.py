"""The host tier in the dashboard: a column of its own, and a tile dropped on it streams."""

from __future__ import annotations

import pytest
from test_app import Recorder, column, loaded, tile, tiles_on, wait_for

from vramancer.app import VramancerApp
from vramancer.config.options import LoadOptions
from vramancer.engine import events as ev

SIZE = (140, 40)
pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("one_torch_thread")]


async def test_a_tile_dropped_on_the_host_tier_streams_from_it(tiny_model_dir):
    app = VramancerApp(LoadOptions(tiny_model_dir, "sim:3x64MiB", "proportional", 256, "auto", host_tier="1MiB"),
                       telemetry=False)
    recorder = Recorder(app)
    async with app.run_test(size=SIZE, message_hook=recorder) as pilot:
        await loaded(pilot)
        host = column(app, "host")
        assert tiles_on(app, "host") == [] and "drop layers" in str(host.summary.render())
        source = tile(app, 0, "sim1")

        await pilot.mouse_down(source)
        await pilot.hover(host)
        assert host.has_class("-drop-ok"), "the tier's cap holds the block"
        await pilot.mouse_up(host)

        done = await wait_for(pilot, lambda: recorder.of(ev.MigrationDone), "the move onto the tier")
        assert (done[0].first, done[0].last, done[0].dst) == (0, 5, "host")
        await wait_for(pilot, lambda: tiles_on(app, "host") == ["L0–5 · 867 KiB"], "the tile in the host column")
        engine = app.worker.engine
        assert engine.split.streamed == {i: "host" for i in range(6)}
        # The layers still run on sim1: its column keeps their tile, now without their weights.
        assert tiles_on(app, "sim1") == ["L0–5 · 867 KiB"]
        assert engine.device("sim1").ledger.claims["weights"] == 0
        # The ends never stream: a drop of them on the tier is refused before anything is sent.
        assert "only decoder layers stream" in app.placement_panel.verdict("embed", "embed", "host").reason
