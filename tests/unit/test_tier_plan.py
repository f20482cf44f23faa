"""Host and disk tiers in the plan: which layers stream, who runs them, what it costs, and the
caps' settings (planning/tiers.py, config/tiers.py), on a profile with known sizes."""

import pytest

from vramancer.config.device_spec import parse_device_spec
from vramancer.config.errors import VramancerError
from vramancer.config.options import LoadOptions
from vramancer.config.tiers import tier_setting, tier_size
from vramancer.config.units import MiB
from vramancer.planning.placement import ModelProfile, PlanError, make_plan
from vramancer.planning.pricing import DeviceTimings, LinkTimings, Pricing, Timings
from vramancer.planning.tiers import DISK, HOST, Tier, _stream_on, assign_tiers, plan_with_tiers, stream_cost
from vramancer.platforms.devices import resolve_devices

# 10 layers of 10 MiB, 20 MiB embeddings tied to the head, 1 KiB of KV per token per layer.
PROFILE = ModelProfile(num_layers=10, layer_bytes=(10 * MiB,) * 10, embed_bytes=20 * MiB, head_bytes=20 * MiB + 4096,
                       tied_bytes=20 * MiB, kv_bytes_per_token=1024, hidden_size=256, intermediate_size=512,
                       vocab_size=1000, dtype_bytes=4)
UNTIED = ModelProfile(num_layers=10, layer_bytes=(10 * MiB,) * 10, embed_bytes=10 * MiB, head_bytes=10 * MiB,
                      tied_bytes=0, kv_bytes_per_token=1024, hidden_size=256, intermediate_size=512,
                      vocab_size=1000, dtype_bytes=4)
CONTEXT = 1024
GB = 1e9


def devices(spec):
    return resolve_devices(parse_device_spec(spec))


def tier(name, size, rates):
    return Tier(name, size, rates)


def test_a_model_that_fits_streams_nothing_even_with_tiers():
    devs = devices("sim:2x100MiB")
    plan = plan_with_tiers(PROFILE, devs, "proportional", CONTEXT, [tier(HOST, 1024 * MiB, {})])
    assert plan.streamed == {}
    assert plan.placement == make_plan(PROFILE, devs, "proportional", CONTEXT).placement


def test_the_fewest_last_layers_stream_host_first_and_the_devices_account_staging():
    devs = devices("sim:2x50MiB")
    with pytest.raises(PlanError):
        make_plan(PROFILE, devs, "proportional", CONTEXT)
    tiers = [tier(HOST, 30 * MiB, {"sim0": 5 * GB, "sim1": 5 * GB}), tier(DISK, 100 * MiB, {"sim0": GB, "sim1": GB})]
    plan = plan_with_tiers(PROFILE, devs, "proportional", CONTEXT, tiers)
    k = len(plan.streamed)
    assert sorted(plan.streamed) == list(range(10 - k, 10))  # the last k layers
    assert list(plan.streamed.values()) == [HOST] * 3 + [DISK] * (k - 3)  # the host tier fills first
    for name, need in plan.needs.items():
        assert need.total <= plan.rooms[name]
    runner = plan.placement.layer_devices[9]
    assert plan.needs[runner].staging == 20 * MiB  # the layer running and the one arriving
    resident = [i for i, d in enumerate(plan.placement.layer_devices) if d == runner and i not in plan.streamed]
    assert plan.needs[runner].weights == 10 * MiB * len(resident) + (20 * MiB + 4096 if plan.placement.head == runner else 0) \
        + (20 * MiB if plan.placement.embed == runner else 0) - (20 * MiB if plan.placement.embed == plan.placement.head == runner else 0)
    # The KV cache of a streamed layer stays on the device that runs it.
    assert plan.needs[runner].kv == sum(1024 * CONTEXT for d in plan.placement.layer_devices if d == runner)
    # sim0 holds the embeddings with their tied head (20), its workspace (10) and one layer
    # (11); sim1 its workspace (10), the staging (20), the KV of k streamed layers and 11 per
    # resident one: with 9 layers left, 30 + k + 11 r <= 50 and r + k = 9 give r = 1.
    assert k == 8


def test_the_least_number_of_layers_streams():
    devs = devices("sim:2x50MiB")
    plan = plan_with_tiers(UNTIED, devs, "sequential", CONTEXT, [tier(HOST, 200 * MiB, {"sim0": GB, "sim1": GB})])
    # Each device: 10 MiB of workspace, each layer 10 MiB and 1 MiB of KV. sim0 takes the
    # embeddings and two layers (42 MiB); sim1 runs the rest streamed with the head: 10 + 20 of
    # staging + 8 of KV + 10 = 48 MiB. One more resident layer fits nowhere.
    assert sorted(plan.streamed) == list(range(2, 10))
    assert plan.placement.layer_devices == ["sim0"] * 2 + ["sim1"] * 8 and plan.placement.head == "sim1"


def test_streamed_layers_run_where_the_tier_reaches_fastest():
    devs = devices("sim:2x50MiB")
    slow_to_sim0 = [tier(HOST, 200 * MiB, {"sim0": 0.1 * GB, "sim1": 10 * GB})]
    plan = plan_with_tiers(PROFILE, devs, "proportional", CONTEXT, slow_to_sim0)
    assert {plan.placement.layer_devices[i] for i in plan.streamed} == {"sim1"}
    slow_to_sim1 = [tier(HOST, 200 * MiB, {"sim0": 10 * GB, "sim1": 0.1 * GB})]
    plan = plan_with_tiers(PROFILE, devs, "proportional", CONTEXT, slow_to_sim1)
    assert {plan.placement.layer_devices[i] for i in plan.streamed} == {"sim0"}


def test_stream_cost_is_bytes_over_the_rate_and_the_step_the_slower_of_compute_and_copies():
    devs = devices("sim:2x50MiB")
    tiers = [tier(HOST, 200 * MiB, {"sim0": GB, "sim1": GB})]
    plan = plan_with_tiers(PROFILE, devs, "proportional", CONTEXT, tiers)
    k = len(plan.streamed)
    cost = stream_cost(PROFILE, plan.placement, plan.streamed, tiers, compute_step_s=0.001)
    assert cost.bytes_per_token == k * 10 * MiB
    assert cost.stream_s == pytest.approx(k * 10 * MiB / GB)
    assert cost.step_s == pytest.approx(max(0.001, cost.stream_s))
    assert cost.tier_bytes[HOST] == k * 10 * MiB
    assert stream_cost(PROFILE, plan.placement, plan.streamed, tiers, compute_step_s=10.0).step_s == 10.0


def test_profiled_plans_stream_too_and_price_the_copies():
    devs = devices("sim:2x50MiB")
    timing = DeviceTimings(0.001, 0.0, 0.0, 0.0001, 0.0002, 0.0, "sim")
    link = LinkTimings(0.0001, GB)
    pricing = Pricing(Timings({"sim0": timing, "sim1": timing}, {("sim0", "sim1"): link, ("sim1", "sim0"): link}, 0.0),
                      PROFILE)
    tiers = [tier(HOST, 200 * MiB, {"sim0": GB, "sim1": GB})]
    plan = plan_with_tiers(PROFILE, devs, "profiled", CONTEXT, tiers, pricing)
    assert plan.streamed and plan.strategy == "profiled"
    assert all(plan.needs[name].total <= plan.rooms[name] for name in plan.needs)


def test_refused_only_when_even_the_tiers_cannot_hold_it():
    devs = devices("sim:2x50MiB")
    with pytest.raises(PlanError) as refusal:
        plan_with_tiers(PROFILE, devs, "proportional", CONTEXT, [tier(HOST, 15 * MiB, {}), tier(DISK, 5 * MiB, {})])
    sentence = str(refusal.value)
    assert sentence.startswith("model needs ") and "host tier 15.0 MiB, disk tier 5.0 MiB" in sentence
    assert "--host-tier" in sentence and sentence.count(".") >= 1 and "\n" not in sentence
    # Without tiers, the devices' own sentence, as before.
    with pytest.raises(PlanError) as plain:
        plan_with_tiers(PROFILE, devs, "proportional", CONTEXT, [])
    assert "smaller --dtype" in str(plain.value)


@pytest.mark.parametrize("text, size", [("", 0), ("0", 0), ("off", 0), ("2GiB", 2 * 1024 * MiB), ("512MiB", 512 * MiB)])
def test_tier_sizes(text, size):
    assert tier_size(text, "--host-tier") == size


def test_a_bad_tier_size_is_one_sentence_naming_where_it_came_from(monkeypatch):
    with pytest.raises(VramancerError) as flag:
        LoadOptions(host_tier="lots").check()
    assert str(flag.value) == "--host-tier 'lots' is not a size; write it like 2GiB, 512MiB or 1.5GB, or 0 for no tier."
    monkeypatch.setenv("VRM_DISK_TIER", "-3GiB")
    with pytest.raises(VramancerError) as env:
        tier_setting("disk", None)
    assert str(env.value).startswith("VRM_DISK_TIER '-3GiB' is not a usable size")
    monkeypatch.setenv("VRM_DISK_TIER", "3GiB")
    assert tier_setting("disk", None) == 3 * 1024 * MiB
    assert tier_setting("disk", "1GiB") == 1024 * MiB  # the flag wins


def test_tier_caps_from_the_config_file(tmp_path, monkeypatch):
    config = tmp_path / "config.toml"
    config.write_text('host_tier = "4GiB"\ndisk_tier = "nope"\n')
    monkeypatch.setenv("VRM_CONFIG", str(config))
    assert tier_setting("host", None) == 4 * 1024 * MiB
    with pytest.raises(VramancerError) as bad:
        tier_setting("disk", None)
    assert str(bad.value).startswith(f"'disk_tier' in {config} 'nope' is not a size")


def test_with_equal_rates_no_device_could_run_fewer_streamed_layers():
    devs = devices("sim:50MiB,60MiB")
    # Both devices take the copies at the same rate, so predictions tie and the fewer bytes
    # streamed decide: no runner could do with fewer layers streamed than the plan's.
    tiers = [tier(HOST, 200 * MiB, {"sim0": GB, "sim1": GB})]
    plan = plan_with_tiers(UNTIED, devs, "sequential", CONTEXT, tiers)
    for runner in devs:
        for k in range(1, len(plan.streamed)):
            streamed = assign_tiers(UNTIED, list(range(10 - k, 10)), tiers)
            assert _stream_on(UNTIED, devs, "sequential", CONTEXT, tiers, None, streamed, runner) is None


def test_a_bad_tier_flag_is_refused_before_anything_loads(capsys):
    from vramancer.cli.main import main

    assert main(["plan", "--devices", "sim:2x1GiB", "--disk-tier", "12XB"]) == 2
    err = capsys.readouterr().err
    assert "--disk-tier '12XB' is not a size" in err and "Traceback" not in err
