"""The tiers in the dashboard: a column of their own where a tile dropped streams, a row of
their own on the devices panel."""

from __future__ import annotations

import pytest
from test_app import Recorder, ask, column, loaded, tile, tiles_on, wait_for

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


async def test_the_devices_panel_shows_each_tier_as_a_row_with_its_rate_over_time(tiny_model_dir):
    app = VramancerApp(LoadOptions(tiny_model_dir, "sim:3x64MiB", "proportional", 256, "auto", host_tier="1MiB"),
                       telemetry=False)
    recorder = Recorder(app)
    async with app.run_test(size=SIZE, message_hook=recorder) as pilot:
        await loaded(pilot)
        panel = app.devices_panel
        app.sample_now()
        row = await wait_for(pilot, lambda: panel.tiers.get("host"), "the host tier's row")
        assert "disk" not in panel.tiers  # a tier not asked for has no row
        assert panel.shown()[-1] is not row and list(panel.children)[-1] is row  # after the devices, no cursor stop
        # Three devices and a tier in a panel this size: one line each, the tier's name, how
        # full it is and its rate now; the full row (a taller panel) says the rest.
        assert row.mode == "one" and row.render().plain.split() == ["host", "tier", "░" * 6, "0%", "0.00", "GB/s"]
        row.set_mode("full", row.name_width)
        assert "holds no layer" in row.render().plain

        app.worker.submit(ev.Migrate(0, 5, "host"))
        await wait_for(pilot, lambda: recorder.of(ev.MigrationDone), "the layers to stream from the host tier")
        app.sample_now()
        # (a reading the App took while the layers moved may come first)
        await wait_for(pilot, lambda: "holds 867 KiB" in row.render().plain, "the row naming its layers")
        text = row.render().plain
        assert "streams L0–5 to sim1" in text and "holds 867 KiB · 867 KiB per token" in text and "1.0 MiB" in text
        before = row.snapshot.streamed

        await ask(pilot, "Hello there")
        done = (await wait_for(pilot, lambda: recorder.of(ev.GenerationDone), "the answer"))[0]
        app.sample_now()
        await wait_for(pilot, lambda: row.snapshot.streamed > before, "a reading after the answer")
        # Every forward pass streamed the six layers once: the prompt's and each new token's.
        engine = app.worker.engine
        per_token = sum(engine.profile.layer_bytes[i] for i in range(6))
        assert row.snapshot.streamed - before >= done.new_tokens * per_token
        # The streaming shows in the rate's history (a later reading, after the answer, may read 0).
        assert max(row.rate_history) > 0
        text = row.render().plain
        assert "copies at" in text
        assert "rate " in text and " · now " in text  # the trend, its scale and the rate now
