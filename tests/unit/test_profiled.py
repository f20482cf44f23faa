"""Profiled placement, predictions, and automatic rebalancing under memory pressure."""

import json

import pytest
from recorder import Recorder
from test_planner import CONTEXT, PROFILE

from vramancer.cli import main
from vramancer.config.device_spec import parse_device_spec
from vramancer.config.options import LoadOptions
from vramancer.config.units import MiB
from vramancer.engine import Engine
from vramancer.engine import events as ev
from vramancer.engine.worker import EngineWorker
from vramancer.planning.placement import make_plan
from vramancer.platforms.devices import resolve_devices

PROMPT = "Tell me about the sea."


class SpeedTable:
    """Pricing with chosen speeds: seconds per layer on each device, a fixed hand-over cost."""

    def __init__(self, layer_s: dict, hand_over_s: float = 0.001):
        self.layer_s, self.hand_over = layer_s, hand_over_s

    def part_s(self, part, device):
        return self.layer_s[device] * (0.1 if part in ("embed", "head") else 1.0)

    def hand_over_s(self, src, dst):
        return 0.0 if src == dst else self.hand_over

    def logits_s(self, head, embed):
        return 0.0 if head == embed else self.hand_over

    def step(self, placement):
        parts = PROFILE.parts()
        devices = [placement.device_of(p) for p in parts]
        return (sum(self.part_s(p, d) for p, d in zip(parts, devices))
                + sum(self.hand_over_s(a, b) for a, b in zip(devices, devices[1:]))
                + self.logits_s(placement.head, placement.embed))


def devices(spec):
    return resolve_devices(parse_device_spec(spec))


def test_profiled_puts_layers_on_the_fast_device_while_they_fit():
    pool = devices("sim:1GiB,1GiB")
    speeds = SpeedTable({"sim0": 0.010, "sim1": 0.001})
    plan = make_plan(PROFILE, pool, "profiled", CONTEXT, speeds)
    assert set(plan.placement.layer_devices) == {"sim1"}
    # The fast device too small for everything: it takes as much as fits, the rest goes slow.
    pool = devices("sim:1GiB,80MiB")
    plan = make_plan(PROFILE, pool, "profiled", CONTEXT, speeds)
    assert plan.needs["sim1"].total <= 80 * MiB
    assert plan.placement.layer_devices.count("sim1") >= 3


def test_on_equal_devices_profiled_means_fewest_boundaries_that_fit():
    speeds = SpeedTable({"sim0": 0.002, "sim1": 0.002, "sim2": 0.002})
    roomy = make_plan(PROFILE, devices("sim:3x1GiB"), "profiled", CONTEXT, speeds)
    assert len(roomy.blocks()) == 1 and roomy.placement.embed == roomy.placement.head
    tight = make_plan(PROFILE, devices("sim:3x100MiB"), "profiled", CONTEXT, speeds)  # two are enough
    assert len({*tight.placement.layer_devices, tight.placement.embed, tight.placement.head}) == 2


@pytest.mark.parametrize("spec", ["sim:3x1GiB", "sim:400MiB,200MiB,100MiB", "sim:100MiB,300MiB"])
def test_profiled_is_never_predicted_slower_than_proportional(spec):
    speeds = SpeedTable({"sim0": 0.003, "sim1": 0.002, "sim2": 0.004}, hand_over_s=0.0005)
    pool = devices(spec)
    profiled = make_plan(PROFILE, pool, "profiled", CONTEXT, speeds)
    proportional = make_plan(PROFILE, pool, "proportional", CONTEXT, speeds)
    assert speeds.step(profiled.placement) <= speeds.step(proportional.placement)


def test_measured_timings_price_any_placement_without_applying_it(tiny_model_dir):
    engine = Engine.load(tiny_model_dir, "sim:3x64MiB", context=256)
    before = engine.placement.copy()
    now = engine.predict()
    moved = engine.predict(engine.placement.moved(range(0, 6), "sim0"))
    assert engine.placement == before
    assert now.tokens_per_s > 0 and moved.tokens_per_s > 0
    assert [(f, l, d) for f, l, d, _ in now.block_ms] == [(0, 5, "sim1")]
    assert all(ms > 0 for *_, ms in now.block_ms)
    # Simulated devices compute on the host: they are timed as the CPU and say so.
    assert {t.timed_as for t in engine.pricing.timings.devices.values()} == {"host CPU"}
    # Fewer hand-overs, same compute: predicted no slower.
    assert moved.transfer_ms <= now.transfer_ms


def test_plan_json_carries_the_prediction(tiny_model_dir, capsys):
    assert main(["plan", "--model", tiny_model_dir, "--devices", "sim:3x64MiB", "--context", "256",
                 "--strategy", "profiled", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["strategy"] == "profiled" and plan["predicted_tokens_per_s"] > 0
    assert plan["blocks"] and all(b["predicted_ms"] > 0 for b in plan["blocks"])


def test_timings_are_cached_and_a_corrupt_cache_is_measured_again(tiny_model_dir, tmp_path, monkeypatch):
    from vramancer.engine.loader import prepare

    monkeypatch.setenv("VRM_CACHE_DIR", str(tmp_path))
    first = prepare(LoadOptions(tiny_model_dir, "sim:2x64MiB", context=256)).pricing.timings
    files = sorted((tmp_path / "profiles").glob("*.json"))
    assert files
    again = prepare(LoadOptions(tiny_model_dir, "sim:2x64MiB", context=256)).pricing.timings
    assert again.devices == first.devices  # read back, not measured anew
    for path in files:
        path.write_text("{not json")
    rebuilt = prepare(LoadOptions(tiny_model_dir, "sim:2x64MiB", context=256)).pricing.timings
    assert rebuilt.devices["sim0"].layer_decode_s > 0
    assert all(json.loads(path.read_text()) for path in files)


def test_auto_rebalance_moves_layers_off_a_squeezed_device_and_keeps_the_answer(tiny_model_dir):
    events = Recorder()
    worker = EngineWorker(events, telemetry=False).start()
    try:
        worker.submit(ev.Load(LoadOptions(tiny_model_dir, "sim:3x64MiB", context=256, auto_rebalance=True)))
        events.wait_for(ev.PlanChanged)
        worker.submit(ev.Migrate(3, 5, "sim2"))  # embed | L0–2 on sim1 | L3–5 + head on sim2
        events.wait_for(ev.MigrationDone)
        worker.submit(ev.Generate(PROMPT, {"max_new_tokens": 24}, request_id=1))
        baseline = events.wait_for(ev.GenerationDone)
        worker.submit(ev.Generate(PROMPT, {"max_new_tokens": 24}, request_id=2))
        events.wait_for(ev.Token, lambda e: e.request_id == 2)
        worker.submit(ev.Reserve("sim1", 63 * MiB))  # another process takes nearly all of sim1
        moved = events.wait_for(ev.MigrationDone)
        answer = events.wait_for(ev.GenerationDone, lambda e: e.request_id == 2)
        assert answer.token_ids == baseline.token_ids
        assert moved.src == "sim1" and "sim1 was short of memory" in moved.reason
        assert moved.step is not None  # applied between two decode steps
        placement = worker.engine.placement
        # Only what was needed left: sim1 is within its room again.
        assert "sim1" not in placement.layer_devices or worker.engine.device("sim1").read().free > 0
        notices = [e.message for e in events.of(ev.Notice)]
        assert any("taken by another process" in m for m in notices)
    finally:
        worker.shutdown()


def test_when_nothing_has_room_it_warns_once(tiny_model_dir):
    engine = Engine.load(tiny_model_dir, "sim:3x64MiB", context=256)
    said = []
    engine.on_rebalance = lambda result, why: said.append((result, why))
    for name in ("sim0", "sim1", "sim2"):
        engine.reserve(name, 63 * MiB)
    before = engine.placement.copy()
    engine.rebalance()
    engine.rebalance()
    assert engine.placement == before
    warnings = [why for result, why in said if result is None]
    assert warnings and len(warnings) == len(set(warnings))  # each said once, not on every check
