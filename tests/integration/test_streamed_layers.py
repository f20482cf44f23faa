"""Layers streamed from the host and disk tiers (runtime/streaming.py): the tokens of plain
transformers, the staging room in the ledgers, migrations while layers stream, a batch that
streams each layer once per step, and `plan` showing the tiers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.integration.test_architectures import NEW_TOKENS, PROMPT, build, make_byte_tokenizer, plain_greedy
from vramancer.config.options import LoadOptions
from vramancer.engine import Engine
from vramancer.planning.tiers import DISK, HOST

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: one torch thread per test

LAYERS = 6
# Each device holds the ends and about one layer: the other four stream, two from each tier.
DEVICES, HOST_TIER, DISK_TIER = "sim:2x600KiB", "300KiB", "1MiB"


@pytest.fixture(scope="module")
def tokenizer():
    return make_byte_tokenizer()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tokenizer, tmp_path_factory) -> tuple[Path, list[int]]:
    folder = tmp_path_factory.mktemp(request.param)
    model = build(request.param, {"num_hidden_layers": LAYERS}, tokenizer, folder)
    return folder, plain_greedy(model, tokenizer)


def load(folder, devices=DEVICES, host=HOST_TIER, disk=DISK_TIER, **kwargs) -> Engine:
    return Engine.load(LoadOptions(str(folder), devices, context=64, host_tier=host, disk_tier=disk, **kwargs))


def test_streamed_layers_give_the_tokens_of_plain_transformers(tiny):
    folder, expected = tiny
    engine = load(folder)
    try:
        streamed = engine.split.streamed
        assert sorted(streamed) == [2, 3, 4, 5] and sorted(streamed.values()) == [DISK, DISK, HOST, HOST]
        runner = engine.placement.layer_devices[5]
        assert {engine.placement.layer_devices[i] for i in streamed} == {runner}
        # The runner holds no streamed weights, but their KV cache and two layers of staging room.
        need = engine.split.needs(engine.placement)[runner]
        layer = engine.profile.layer_bytes[5]
        assert need.staging == 2 * layer
        claims = engine.device(runner).ledger.claims
        assert claims["weights"] == need.weights and claims["workspace"] == need.workspace + need.staging
        # Between turns a streamed layer's weights are in its tier, not on a device.
        held = engine.split.streamer.held_bytes()
        assert held[HOST] == held[DISK] == 2 * layer
        # The prediction counts the copies: the step is at least what they take at the measured rates.
        assert engine.stream_seconds() > 0
        assert engine.predict().step_s == pytest.approx(max(engine.pricing.predict(engine.placement).step_s,
                                                            engine.stream_seconds()))
        # On simulated devices the plain layers stream module by module, through two staging
        # buffers of the largest module's size (not the layer's), in the order the pass ran them;
        # the norms (small modules) through one of their own.
        streamer = engine.split.streamer
        assert streamer.order == [] and {u.layer for u in streamer._modules.units} == set(streamed)
        largest = max(u.nbytes for u in streamer._modules.units)
        norms = [u for u in streamer._modules.units if "norm" in type(u.module).__name__.lower()]
        assert norms and all(u.small for u in norms) and sum(u.small for u in streamer._modules.units) == len(norms)
        assert largest < layer and [b.numel() for b in streamer._modules.buffers] == [largest, largest,
                                                                                        norms[0].nbytes]
        answer = engine.generate(PROMPT, raw=True, max_new_tokens=NEW_TOKENS)
        assert answer.token_ids == expected
        assert len(streamer._modules.order) == len(streamer._modules.units)  # each once, then the wrap
        stats = engine.split.streamer.snapshot()
        # One forward pass per token (the prompt's included), each streamed layer copied once in it;
        # the prefetch of the next answer's first layer may be on its way.
        for tier in (HOST, DISK):
            assert stats[tier]["copies"] in (2 * NEW_TOKENS, 2 * NEW_TOKENS + 1)
            assert stats[tier]["bytes"] >= 2 * NEW_TOKENS * layer
        assert engine.generate(PROMPT, raw=True, max_new_tokens=NEW_TOKENS).token_ids == expected
        # After their turns the layers point into their tiers again, whose copies are untouched.
        for index, slots in engine.split.streamer.slots.items():
            for owner, name, home in slots:
                assert getattr(owner, name).data_ptr() == home.data_ptr()
        assert engine.split.streamer.held_bytes() == held
    finally:
        engine.close()


def test_the_disk_tier_is_a_mapped_file_that_leaves_nothing_behind(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("VRM_CACHE_DIR", str(tmp_path))
    folder, expected = tiny
    engine = load(folder, host="0", disk="2MiB")
    try:
        assert set(engine.split.streamed.values()) == {DISK}
        assert list((tmp_path / "disk-tier").iterdir()) == []  # unlinked once mapped
        maps = Path("/proc/self/maps").read_text()
        assert "disk-tier/layers-" in maps  # ... and still mapped: its pages are read at each turn
        assert engine.generate(PROMPT, raw=True, max_new_tokens=NEW_TOKENS).token_ids == expected
    finally:
        engine.close()


def test_a_layer_dropped_on_a_tier_streams_and_migrates_while_it_streams(tiny):
    folder, expected = tiny
    engine = load(folder, devices="sim:3x1MiB", host="400KiB", disk="0")
    try:
        assert not engine.split.streamed  # it fits the devices: nothing streams
        moves = {}

        def on_step(step: int) -> None:
            if step == 2:  # mid-answer, the last two layers go to the host tier
                moves["to_tier"] = engine.migrate(4, 5, "host", step=step)
            if step == 4:  # a streamed layer changes computing device: its KV cache moves, its weights stay
                moves["streamed"] = engine.migrate(5, 5, "sim1", step=step)
            if step == 6:  # and a resident layer moves as always
                moves["resident"] = engine.migrate(0, 0, "sim2", step=step)

        runner = engine.placement.layer_devices[5]
        assert runner != "sim1"
        weights_before = engine.device(runner).ledger.claims["weights"]
        answer = engine.generate(PROMPT, raw=True, max_new_tokens=NEW_TOKENS, on_step=on_step)
        assert answer.token_ids == expected
        layer = engine.profile.layer_bytes[5]
        assert engine.split.streamed == {4: HOST, 5: HOST} and moves["to_tier"].dst == HOST
        assert engine.device(runner).ledger.claims["weights"] < weights_before
        assert engine.placement.layer_devices[5] == "sim1"
        assert engine.split.streamer.devices[5] == engine.device("sim1").torch_device
        assert 0 < moves["streamed"].bytes < layer  # only the KV cache crossed
        assert moves["resident"].bytes >= layer
        assert engine.split.streamer.snapshot()[HOST]["copies"] > 0
        assert engine.generate(PROMPT, raw=True, max_new_tokens=NEW_TOKENS).token_ids == expected
        # Past the tier's cap, and the ends, are refused in one sentence, nothing changed.
        from vramancer.runtime.migration import MigrationRefused

        with pytest.raises(MigrationRefused, match="does not fit in the host tier"):
            engine.migrate(1, 3, "host")
        with pytest.raises(MigrationRefused, match="only decoder layers stream"):
            engine.migrate("head", "head", "host")
        assert engine.split.streamed == {4: HOST, 5: HOST}
    finally:
        engine.close()


def test_a_batch_streams_each_layer_once_per_step(tiny, tokenizer):
    from tests.integration.test_batching import Events, run_to_end, submit

    folder, _ = tiny
    engine = load(folder, devices="sim:2x700KiB")  # room for four sequences' KV cache
    try:
        assert len(engine.split.streamed) == 4
        prompts = ["The sea", "Once", "Red, a", "One, two"]  # four answers in the 64-token budget
        solo = {p: engine.generate(p, raw=True, max_new_tokens=6).token_ids for p in prompts}
        events = Events()
        batch = engine.batch(events.append)
        if batch.single_reason:
            pytest.skip(batch.single_reason)
        for i, prompt in enumerate(prompts):
            batch.submit(submit(str(i), prompt, tokens=6, raw=True))
        batch.step()  # one prefill for the four, and their first decode step
        assert len(batch.running) == 4
        streamer = engine.split.streamer
        before = sum(s["copies"] for s in streamer.snapshot().values())
        batch.step()
        after = sum(s["copies"] for s in streamer.snapshot().values())
        assert after - before == len(engine.split.streamed)  # four sequences, one copy of each layer
        run_to_end(batch)
        for i, prompt in enumerate(prompts):
            assert list(events.done(str(i)).token_ids) == solo[prompt]
    finally:
        engine.close()


def test_plan_shows_the_tiers_the_bytes_streamed_and_the_speed(tiny, capsys):
    from vramancer.cli.main import main

    folder, _ = tiny
    flags = ["--model", str(folder), "--devices", DEVICES, "--context", "64", "--host-tier", HOST_TIER,
             "--disk-tier", DISK_TIER]
    assert main(["plan", *flags, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    layer = report["placement"][0]["bytes"] // (report["placement"][0]["last_layer"] - report["placement"][0]["first_layer"] + 1)
    assert report["streamed_layers"] == {"2": HOST, "3": HOST, "4": DISK, "5": DISK}
    assert report["bytes_streamed_per_token"] == 4 * layer
    assert {t["tier"] for t in report["tiers"]} == {HOST, DISK}
    assert report["tiers"][0]["holds"] == 2 * layer
    assert 0 < report["predicted_tokens_per_s"] <= report["predicted_compute_tokens_per_s"]
    assert main(["plan", *flags]) == 0
    text = capsys.readouterr().out
    assert "host tier" in text and "disk tier" in text and "streamed" in text and "per token" in text


def test_too_big_even_for_the_tiers_is_one_sentence(tiny, capsys):
    from vramancer.cli.main import main

    folder, _ = tiny
    code = main(["plan", "--model", str(folder), "--devices", DEVICES, "--context", "64", "--host-tier", "100KiB"])
    err = capsys.readouterr().err
    assert code == 2 and "host tier 100 KiB" in err and "--disk-tier" in err and "Traceback" not in err


def test_quantized_weights_stream_from_both_tiers(tiny):
    """q8 weights (a tensor class of their own) are flattened into the disk tier's file and
    rebuilt from its mapping; the answer is the one the resident q8 model gives."""
    from vramancer.planning.precision import kernels_turned_off

    if kernels_turned_off():
        pytest.skip("the tier sizes below are our kernels' q8 layout; torchao's (kernels off) packs other bytes")
    folder, _ = tiny
    resident = Engine.load(LoadOptions(str(folder), "sim:2x1GiB", context=64, weights="q8"))
    try:
        expected = resident.generate(PROMPT, raw=True, max_new_tokens=NEW_TOKENS).token_ids
    finally:
        resident.close()
    for host, disk in (("300KiB", "0"), ("0", "1MiB")):
        engine = load(folder, devices="sim:2x320KiB", host=host, disk=disk, weights="q8")
        try:
            assert len(engine.split.streamed) == 4
            # Quantized weights (their own class) stream as whole layers, one layer ahead.
            assert engine.split.streamer.order == sorted(engine.split.streamed)
            assert engine.generate(PROMPT, raw=True, max_new_tokens=NEW_TOKENS).token_ids == expected
        finally:
            engine.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_layers_stream_from_page_locked_memory_on_a_side_stream(tiny):
    """The GPU path: a cap that leaves the GPU room for about one layer past its reserve, the
    rest streamed from the host tier (page-locked) with copies on a side stream."""
    folder, expected = tiny
    engine = load(folder, devices="cuda:0=769MiB", host="4MiB", disk="0", dtype="float32", cuda_graphs="off")
    try:
        assert engine.split.streamed
        homes = [home for slots in engine.split.streamer.slots.values() for _, _, home in slots]
        assert all(home.device.type == "cpu" and home.is_pinned() for home in homes)
        assert engine.generate(PROMPT, raw=True, max_new_tokens=NEW_TOKENS).token_ids == expected
        for slots in engine.split.streamer.slots.values():  # between turns, the weights are back in the tier
            assert all(getattr(owner, name).device.type == "cpu" for owner, name, _ in slots)
    finally:
        engine.close()


def test_replanning_keeps_the_tiers_layers_or_says_why_not(tiny):
    from vramancer.config.errors import VramancerError

    folder, expected = tiny
    engine = load(folder)
    try:
        streamed = dict(engine.split.streamed)
        plan = engine.replan("sequential")
        # The same layers stream from the same tiers; the devices' share is the new strategy's.
        assert plan.strategy == engine.plan.strategy == "sequential"
        assert plan.streamed == engine.split.streamed == streamed
        assert engine.generate(PROMPT, raw=True, max_new_tokens=NEW_TOKENS).token_ids == expected
    finally:
        engine.close()
    engine = load(folder, devices="sim:3x1MiB", host="400KiB", disk="0")
    try:
        engine.migrate(4, 5, "host")  # the model fits the devices: a new plan would stream nothing
        before = list(engine.placement.layer_devices)
        with pytest.raises(VramancerError, match="the sequential plan would bring L4–5 back from the tiers onto a "
                                                 "device.*load the model again with --strategy sequential"):
            engine.replan("sequential")
        assert engine.split.streamed == {4: HOST, 5: HOST} and engine.placement.layer_devices == before
        assert engine.generate(PROMPT, raw=True, max_new_tokens=NEW_TOKENS).token_ids == expected
    finally:
        engine.close()
