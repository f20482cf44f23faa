"""One runtime on every machine (issue 28): models of the architecture matrix split across this
process and two `vramancer node` processes on 127.0.0.1 answer with plain transformers' greedy
tokens. The nodes run their layers with the runtime's SplitModel through the model seam, and
read only the layers they hold (and the small modules before the stack) from the file."""

from __future__ import annotations

import os

import pytest
from cluster_nodes import TOKEN, start_nodes
from test_architectures import ALTERNATING, NEW_TOKENS, PROMPT, build, make_byte_tokenizer, plain_greedy

pytestmark = pytest.mark.timeout(300)

# A dense model, one with alternating sliding and full layers (and rotary tables per kind),
# one with experts, one with a learned position table (read by the nodes from the file), and
# one whose layers return tuples, take the cache as `layer_past` and no positions (ALiBi).
# (Every other architecture of the matrix but the recurrent ones passes too; they cost time.)
REMOTE_MATRIX = {"qwen2": {}, "gemma3_text": ALTERNATING, "qwen2_moe": {}, "gpt2": {}, "bloom": {}}


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    saved = os.environ.get("VRM_CLUSTER_TOKEN")
    os.environ["VRM_CLUSTER_TOKEN"] = TOKEN
    nodes = start_nodes(tmp_path_factory.mktemp("nodes"), 2)
    yield nodes
    for node in nodes:
        node.stop()
    if saved is None:
        os.environ.pop("VRM_CLUSTER_TOKEN", None)
    else:
        os.environ["VRM_CLUSTER_TOKEN"] = saved


@pytest.mark.parametrize("model_type", sorted(REMOTE_MATRIX))
def test_a_model_split_over_two_nodes_gives_plain_transformers_tokens(model_type, two_nodes, tmp_path):
    from vramancer.engine import Engine

    tokenizer = make_byte_tokenizer()
    model = build(model_type, REMOTE_MATRIX[model_type], tokenizer, tmp_path)
    expected = plain_greedy(model, tokenizer)
    a, b = (node.device() for node in two_nodes)
    engine = Engine.load(str(tmp_path), f"sim:1GiB,{a},{b}", context=64, dtype="float32")
    try:
        held = {device for device in engine.placement.layer_devices}
        assert {a, b} <= held, engine.placement
        result = engine.generate(PROMPT, raw=True, max_new_tokens=NEW_TOKENS)
        assert result.token_ids == expected and not result.stats.get("node_losses")
        # A second answer (the nodes' caches reset) is the same.
        assert engine.generate(PROMPT, raw=True, max_new_tokens=NEW_TOKENS).token_ids == expected
    finally:
        engine.close()
    for node in two_nodes:
        assert "Traceback" not in node.log()


def test_gemma3_layers_migrate_to_and_from_the_nodes_mid_answer(two_nodes, tmp_path):
    """Sliding and full layers move with their caches: this machine → a node, a node → this
    machine, this machine → the other node, each mid-answer; the tokens do not change."""
    from vramancer.engine import Engine

    tokenizer = make_byte_tokenizer()
    model = build("gemma3_text", ALTERNATING, tokenizer, tmp_path)
    expected = plain_greedy(model, tokenizer)
    a, b = (node.device() for node in two_nodes)
    engine = Engine.load(str(tmp_path), f"sim:1GiB,{a},{b}", context=64, dtype="float32")
    try:
        devices = engine.placement.layer_devices
        local_last = max(i for i, d in enumerate(devices) if d == "sim0")
        on_a = devices.index(a)
        schedule = {3: (local_last, a), 5: (on_a, "sim0"), 7: (local_last, b)}
        moved = []

        def on_step(step):
            if step in schedule:
                layer, device = schedule.pop(step)
                moved.append(engine.migrate(layer, layer, device, step=step))

        result = engine.generate(PROMPT, raw=True, max_new_tokens=NEW_TOKENS, on_step=on_step)
        assert result.token_ids == expected
        assert not result.stats.get("node_losses")  # not recovered from a node that failed: moved
        assert [m.dst for m in moved] == [a, "sim0", b]
        assert all(m.bytes > engine.profile.layer_bytes[int(m.first_layer)] for m in moved)  # KV carried too
    finally:
        engine.close()
