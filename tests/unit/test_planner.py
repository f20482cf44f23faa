"""The planner's memory model and strategies, on a model profile with known sizes."""

import dataclasses

import pytest
import torch

from vramancer.config.device_spec import parse_device_spec
from vramancer.config.units import MiB
from vramancer.planning.placement import (
    EMBED,
    HEAD,
    ModelProfile,
    PlanError,
    device_need,
    make_plan,
)
from vramancer.platforms.devices import CudaDevice, MemoryLedger, resolve_devices

# 10 layers of 10 MiB, 20 MiB embeddings tied to the head, 1 KiB of KV per token per layer.
PROFILE = ModelProfile(
    num_layers=10,
    layer_bytes=(10 * MiB,) * 10,
    embed_bytes=20 * MiB,
    head_bytes=20 * MiB + 4096,
    tied_bytes=20 * MiB,
    kv_bytes_per_token=1024,
    hidden_size=256,
    intermediate_size=512,
    vocab_size=1000,
    dtype_bytes=4,
)
CONTEXT = 1024


def devices(spec):
    return resolve_devices(parse_device_spec(spec))


def layer_counts(plan):
    counts = {}
    for device in plan.placement.layer_devices:
        counts[device] = counts.get(device, 0) + 1
    return counts


def test_memory_model_counts_weights_kv_workspace_and_ties_once():
    (sim,) = devices("sim:1GiB")
    need = device_need(PROFILE, PROFILE.parts(), sim.reserve, CONTEXT)
    assert need.weights == 20 * MiB + 100 * MiB + 4096  # the tied head adds only its norm
    assert need.kv == 10 * 1024 * CONTEXT
    assert need.workspace > 0 and need.reserve == 0
    # A CUDA device keeps room for its context and allocator slack (built, not probed: no GPU needed).
    gpu = CudaDevice("cuda:0", "cuda", "a GPU", torch.device("cuda", 0), MemoryLedger(device_name="cuda:0"), index=0)
    assert device_need(PROFILE, PROFILE.parts(), gpu.reserve, CONTEXT).reserve > 0
    # Apart, the head carries its own copy of the tied weights.
    assert device_need(PROFILE, [HEAD], sim.reserve, CONTEXT).weights == 20 * MiB + 4096


def test_proportional_follows_free_memory():
    plan = make_plan(PROFILE, devices("sim:400MiB,200MiB"), "proportional", CONTEXT)
    counts = layer_counts(plan)
    assert counts["sim0"] > counts["sim1"] > 0
    # The head's weight is the embeddings' (tied): it joins them, and the weight is held once.
    assert plan.placement.embed == "sim0" and plan.placement.head == "sim0"
    assert sum(need.weights for need in plan.needs.values()) == PROFILE.weight_bytes()
    # Contiguous: one block per device.
    assert [b.device for b in plan.blocks()] == ["sim0", "sim1"]
    for name, need in plan.needs.items():
        assert need.total <= plan.rooms[name]


def test_an_untied_head_stays_after_the_last_layer():
    untied = dataclasses.replace(PROFILE, tied_bytes=0)
    plan = make_plan(untied, devices("sim:400MiB,200MiB"), "proportional", CONTEXT)
    assert plan.placement.embed == "sim0" and plan.placement.head == "sim1"


def test_equal_devices_get_equal_memory_not_equal_layer_counts():
    plan = make_plan(PROFILE, devices("sim:3x200MiB"), "proportional", CONTEXT)
    totals = [plan.needs[f"sim{i}"].total for i in range(3)]
    assert max(totals) - min(totals) <= 25 * MiB  # within about one layer plus the head's copy
    assert all(count > 0 for count in layer_counts(plan).values())


def test_sequential_fills_devices_in_order():
    plan = make_plan(PROFILE, devices("sim:100MiB,400MiB"), "sequential", CONTEXT)
    counts = layer_counts(plan)
    need0 = plan.needs["sim0"].total
    assert need0 <= 100 * MiB and need0 + 10 * MiB + 1024 * CONTEXT > 100 * MiB  # no room for one more
    assert counts["sim0"] + counts["sim1"] == 10


def test_a_plan_that_cannot_fit_names_need_and_room():
    with pytest.raises(PlanError) as err:
        make_plan(PROFILE, devices("sim:2x10MiB"), "proportional", CONTEXT)
    message = str(err.value)
    assert message.startswith("model needs ")
    assert "sim0 10.0 MiB" in message and "sim1 10.0 MiB" in message


def test_cpu_takes_only_the_overflow():
    # An accelerator with room for everything: the CPU, however large, gets nothing.
    roomy = devices("sim:1GiB") + devices("cpu=8GiB")
    plan = make_plan(PROFILE, roomy, "proportional", CONTEXT)
    assert set(plan.placement.layer_devices) == {"sim0"} and plan.placement.head == "sim0"
    # Too small an accelerator: it is filled first and the CPU takes the rest.
    tight = devices("sim:80MiB") + devices("cpu=8GiB")
    plan = make_plan(PROFILE, tight, "proportional", CONTEXT)
    counts = layer_counts(plan)
    assert plan.placement.layer_devices[0] == "sim0" and counts["sim0"] >= 1
    assert counts["cpu"] == 10 - counts["sim0"]
    assert plan.placement.head == "sim0"  # tied: beside the embeddings, which costs no more weights there


def test_unknown_strategy_is_refused():
    with pytest.raises(PlanError, match="not a strategy"):
        make_plan(PROFILE, devices("sim:1GiB"), "random", CONTEXT)


def test_parts_are_embed_layers_head():
    assert PROFILE.parts() == [EMBED, *range(10), HEAD]


def test_a_move_says_what_it_frees_and_takes_and_when_a_tied_head_gets_its_own_copy():
    from vramancer.engine.events import PlanSnapshot
    from vramancer.planning.placement import Placement

    placement = Placement(["sim0"] * 5 + ["sim1"] * 5, "sim0", "sim0")
    reserves = {"sim0": 0, "sim1": 0}
    snapshot = PlanSnapshot((), "sim0", "sim0", "proportional", CONTEXT, {}, reserves, PROFILE,
                            tuple(placement.layer_devices))
    # Two layers: 10 MiB of weights and 1 MiB of KV cache (1 KiB a token, 1024 tokens) each.
    assert snapshot.move_effect(0, 1, "sim1") == "frees 22.0 MiB on sim0 · takes 22.0 MiB on sim1"
    # Moving the tied embeddings away frees next to nothing on sim0 (the head keeps their weight
    # there) and takes the table on sim1: said, not left for the user to find out.
    effect = snapshot.move_effect(EMBED, EMBED, "sim1")
    assert "takes 20.0 MiB on sim1" in effect and "own copy of the tied embeddings (20.0 MiB)" in effect
    assert "frees 20.0 MiB" not in effect
    apart = PlanSnapshot((), "sim1", "sim0", "proportional", CONTEXT, {}, reserves, PROFILE,
                         tuple(placement.layer_devices))
    assert "is given back" in apart.move_effect(HEAD, HEAD, "sim1")
    assert snapshot.move_effect(0, 0, "sim0") == "changes no device's memory"


# SmolLM2-135M's shape in float32: 30 layers of 13.5 MiB, a tied 108 MiB table bigger than
# several layers together.
SMOLLM = dataclasses.replace(PROFILE, num_layers=30, layer_bytes=(int(13.5 * MiB),) * 30, embed_bytes=108 * MiB,
                             head_bytes=108 * MiB + 2304, tied_bytes=108 * MiB, kv_bytes_per_token=1536,
                             hidden_size=576, intermediate_size=1536, vocab_size=49152)


@pytest.mark.parametrize("spec", ["sim:16x256MiB", "sim:8x512MiB"])
def test_a_rig_of_small_devices_leaves_none_empty_when_the_layers_go_round(spec):
    pool = devices(spec)
    plan = make_plan(SMOLLM, pool, "proportional", 2048)
    counts = layer_counts(plan)
    held = set(counts) | {plan.placement.embed, plan.placement.head}
    assert held == {d.name for d in pool}, f"empty: {sorted({d.name for d in pool} - held)}"
    assert plan.empty == {}
    assert all(plan.needs[d.name].total <= plan.rooms[d.name] for d in pool)
    # Layers stay in pipeline order: one contiguous block per device.
    assert len(plan.blocks()) == len(counts)


def test_an_empty_device_gets_the_reason_it_holds_nothing():
    few = make_plan(SMOLLM, devices("sim:40x256MiB"), "proportional", 2048)
    assert few.empty["sim39"] == "30 layers, 40 devices" and set(few.empty) == {f"sim{i}" for i in range(31, 40)}
    sequential = make_plan(SMOLLM, devices("sim:8x512MiB"), "sequential", 2048)
    assert sequential.empty["sim7"] == "sequential filled the devices before it"
    # A device too small for any one layer with its KV cache and workspace.
    small = make_plan(PROFILE, devices("sim:1GiB,16MiB"), "proportional", CONTEXT)
    assert set(small.empty) == {"sim1"} and small.empty["sim1"].startswith("16.0 MiB free < a layer's")
