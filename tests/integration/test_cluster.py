"""Remote nodes on 127.0.0.1: real `vramancer node` processes, the bundled model, gloo tensors.

Split across this process and two nodes, greedy decoding gives token for token what plain
transformers gives unsplit; links show the bytes crossing to each node; migrations go both
ways mid-answer; a wrong token is refused with nothing loaded; a node killed mid-answer is
replaced and the answer is unchanged. The losses run on a small random Llama (`small_model`):
what they test is the recovery, and each starts nodes of its own, which then load in a moment.
"""

from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest
from cluster_nodes import TOKEN, start_nodes
from references import plain_transformers_tokens

pytestmark = [pytest.mark.model, pytest.mark.timeout(180)]

PROMPT = "Write a short poem about the sea."
TOKENS = 32
CONTEXT = 512
SMALL_LAYERS, SMALL_CONTEXT = 6, 128


@pytest.fixture(scope="module", autouse=True)
def cluster_token():
    """The coordinator's side of the secret (the nodes get it in their environment)."""
    saved = os.environ.get("VRM_CLUSTER_TOKEN")
    os.environ["VRM_CLUSTER_TOKEN"] = TOKEN
    yield
    if saved is None:
        os.environ.pop("VRM_CLUSTER_TOKEN", None)
    else:
        os.environ["VRM_CLUSTER_TOKEN"] = saved


@pytest.fixture(scope="module")
def reference_tokens():
    """Plain transformers, unsplit, greedy: the tokens every split must reproduce."""
    tokens = plain_transformers_tokens(PROMPT, TOKENS)
    assert len(tokens) == TOKENS
    return tokens


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, reference_tokens):
    nodes = start_nodes(tmp_path_factory.mktemp("nodes"), 2)
    yield nodes
    for node in nodes:
        node.stop()


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """(folder, plain transformers' greedy tokens): a random 6-layer Llama with a byte tokenizer,
    its layers a few MiB each, so a small local device holds only some of them."""
    import torch
    from test_architectures import PROMPT as BYTES_PROMPT, build, make_byte_tokenizer

    folder = tmp_path_factory.mktemp("small-llama")
    tokenizer = make_byte_tokenizer()
    model = build("llama", {"hidden_size": 128, "intermediate_size": 2048, "num_hidden_layers": SMALL_LAYERS},
                  tokenizer, folder)
    inputs = tokenizer(BYTES_PROMPT, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False, pad_token_id=0)
    return folder, out[0, inputs["input_ids"].shape[1]:].tolist()


def small_generate(engine, **kwargs):
    from test_architectures import PROMPT as BYTES_PROMPT

    return engine.generate(BYTES_PROMPT, raw=True, max_new_tokens=TOKENS, **kwargs)


def spec(nodes, local="sim:1GiB") -> str:
    return ",".join([local] + [node.device() for node in nodes])


def links_by_pair(links):
    return {(link["src"], link["dst"]): link for link in links}


def test_generate_cli_over_two_nodes_matches_plain_transformers(two_nodes, reference_tokens, capsys):
    """The CLI path: `vramancer generate --devices sim:1GiB,node:…/sim0,node:…/sim0 --json`."""
    from vramancer.cli import main

    assert main(["generate", "--model", "default", "--devices", spec(two_nodes), "--context", str(CONTEXT),
                 "--prompt", PROMPT, "--max-new-tokens", str(TOKENS), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["token_ids"] == reference_tokens
    holders = {block["device"] for block in out["placement"]}
    assert holders == {"sim0", two_nodes[0].device(), two_nodes[1].device()}
    assert {block["host"] for block in out["placement"]} == {None, two_nodes[0].label, two_nodes[1].label}
    assert out["embed_device"] == "sim0" and out["head_device"] == "sim0"
    links = links_by_pair(out["links"])
    a, b = two_nodes[0].device(), two_nodes[1].device()
    # Hidden states cross to each node and back once per forward pass (prefill + each decode step).
    for pair in (("sim0", a), (a, b), (b, "sim0")):
        assert links[pair]["transfers"] >= TOKENS and links[pair]["bytes"] > 0, pair
    assert out["faults"] == []
    # The CLI said goodbye: each node released what it held for us.
    for node in two_nodes:
        node.wait_for_log("ended")


@pytest.fixture(scope="module")
def cluster_engine(two_nodes):
    from vramancer.engine import Engine

    engine = Engine.load("default", spec(two_nodes), context=CONTEXT)
    yield engine
    engine.close()


def test_split_over_two_nodes_matches_and_counts_bytes_per_node(cluster_engine, two_nodes, reference_tokens):
    engine = cluster_engine
    a, b = two_nodes[0].device(), two_nodes[1].device()
    blocks = [(blk.layers.first, blk.layers.last, blk.device) for blk in engine.placement.blocks()]
    assert [device for _, _, device in blocks] == ["sim0", a, b]
    assert engine.device(a).host == two_nodes[0].label and not engine.device(a).local
    before = {(l.src, l.dst): l.bytes for l in engine.link_stats()}
    result = engine.generate(PROMPT, max_new_tokens=TOKENS)
    assert result.token_ids == reference_tokens
    after = {(l.src, l.dst): l.bytes for l in engine.link_stats()}
    hidden = engine.profile.hidden_size * 4
    for pair in (("sim0", a), (b, "sim0")):
        # At least one hidden state per token, all of them real bytes from this generation.
        assert after[pair] - before.get(pair, 0) >= TOKENS * hidden, pair
    # The nodes hold exactly the layers the plan gave them, and say so in their telemetry.
    for node, name in zip(two_nodes, (a, b)):
        first, last = next((f, l) for f, l, d in blocks if d == name)
        node.wait_for_log(f"holding layers L{first}–{last} on sim0")
        snap = engine.device(name).snapshot()
        assert snap.weights == sum(engine.profile.layer_bytes[first:last + 1])
        assert snap.total == 2**30 and 0 < snap.free < snap.total


def test_migrations_between_this_machine_and_the_nodes_keep_the_tokens(cluster_engine, two_nodes, reference_tokens):
    engine = cluster_engine
    a, b = two_nodes[0].device(), two_nodes[1].device()
    start = [(blk.layers.first, blk.layers.last, blk.device) for blk in engine.placement.blocks()]
    local_last = start[0][1]
    b_first, b_last = start[2][0], start[2][1]
    schedule = {
        4: (local_last - 1, local_last, a),  # local → node A, with their KV cache
        8: (local_last - 1, local_last + 1, "sim0"),  # node A → local (two came from A's own block)
        12: (b_last - 1, b_last, a),  # node B → node A, through this machine
    }
    done = []

    def on_step(step):
        if step in schedule:
            first, last, device = schedule.pop(step)
            done.append(engine.migrate(first, last, device, step=step))

    try:
        result = engine.generate(PROMPT, max_new_tokens=TOKENS, on_step=on_step)
        assert result.token_ids == reference_tokens
        assert [m.dst for m in done] == [a, "sim0", a]
        for move in done:
            # Weights placed and KV cache carried (at least `step` tokens of it per layer).
            layers = range(int(move.first_layer), int(move.last_layer) + 1)
            assert move.bytes > sum(engine.profile.layer_bytes[i] for i in layers), move.describe()
        assert engine.placement.layer_devices[local_last + 1] == "sim0"
        assert engine.placement.layer_devices[b_last] == a and engine.placement.layer_devices[b_first] == b
        # And the moved placement answers the same from scratch.
        assert engine.generate(PROMPT, max_new_tokens=TOKENS).token_ids == reference_tokens
    finally:
        for first, last, device in start:
            engine.migrate(first, last, device)
    assert [(blk.layers.first, blk.layers.last, blk.device) for blk in engine.placement.blocks()] == start


def test_remote_devices_take_layers_only_and_are_squeezed_on_their_own_machine(cluster_engine, two_nodes):
    from vramancer.config.errors import VramancerError
    from vramancer.runtime.migration import MigrationRefused

    engine = cluster_engine
    before = list(engine.placement.layer_devices)
    with pytest.raises(MigrationRefused, match="the head stays on this machine"):
        engine.migrate("head", "head", two_nodes[0].device())
    with pytest.raises(VramancerError, match=f"is on {two_nodes[0].label}; squeeze it on that machine"):
        engine.reserve(two_nodes[0].device(), 2**20)
    assert engine.placement.layer_devices == before and engine.placement.head == "sim0"


def test_a_wrong_or_missing_token_is_refused_and_nothing_is_loaded(tmp_path, monkeypatch):
    from vramancer.cluster import AdmissionRefused
    from vramancer.cluster.client import NodeConnection
    from vramancer.engine import Engine

    (node,) = start_nodes(tmp_path, 1)
    try:
        monkeypatch.setenv("VRM_CLUSTER_TOKEN", "not the secret")
        with pytest.raises(AdmissionRefused, match=f"{node.label} refused this coordinator: its cluster token does not match"):
            Engine.load("default", f"sim:1GiB,{node.device()}", context=CONTEXT)
        node.wait_for_log("its cluster token does not match; no process group formed, nothing loaded")
        monkeypatch.delenv("VRM_CLUSTER_TOKEN")
        with pytest.raises(AdmissionRefused, match="no cluster token was given"):
            Engine.load("default", f"sim:1GiB,{node.device()}", context=CONTEXT)
        node.wait_for_log("it offered no cluster token")
        # Nothing but the node's own port listens: no rendezvous store, no process group.
        listening = [c for c in psutil.Process(node.pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        assert [c.laddr.port for c in listening] == [node.port]
        assert "admitted coordinator" not in node.log() and "loaded default" not in node.log()
        # With the right token the node admits us, and it has no model.
        connection = NodeConnection("127.0.0.1", node.port, TOKEN.encode()).connect()
        try:
            assert connection.request("state")["model"] is None
        finally:
            connection.close()
        # `kill` ends a node cleanly.
        node.process.send_signal(signal.SIGTERM)
        assert node.process.wait(timeout=10) == 0
        assert node.log().rstrip().endswith("vramancer node: stopped")
    finally:
        node.stop()


def test_a_node_killed_mid_answer_is_replaced_and_the_answer_is_unchanged(tmp_path, small_model):
    from vramancer.engine import Engine

    folder, reference_tokens = small_model
    nodes = start_nodes(tmp_path, 2)
    engine = None
    try:
        engine = Engine.load(str(folder), spec(nodes), context=SMALL_CONTEXT, dtype="float32")
        victim = nodes[0]
        lost_layers = [i for i, d in enumerate(engine.placement.layer_devices) if d == victim.device()]
        assert lost_layers
        faults = []
        engine.on_fault = lambda message, node, layers, recovered: faults.append((time.monotonic(), message, recovered))
        killed = {}

        def on_step(step):
            if step == 8 and not killed:
                os.kill(victim.pid, signal.SIGKILL)
                killed["at"] = time.monotonic()

        result = small_generate(engine, on_step=on_step)
        assert result.token_ids == reference_tokens
        assert result.new_tokens == TOKENS and result.stats["node_losses"]
        noticed = [t for t, _, recovered in faults if not recovered]
        assert noticed and noticed[0] - killed["at"] < 5.0, faults
        recovered = [message for _, message, done in faults if done]
        assert recovered and "rebuilding the KV cache" in recovered[0]
        # The lost layers live on the devices left; the victim holds nothing.
        assert all(engine.placement.layer_devices[i] != victim.device() for i in lost_layers)
        assert engine.device(victim.device()).lost
        # The engine goes on: the next answer is the same, without the dead node.
        assert small_generate(engine).token_ids == reference_tokens
    finally:
        if engine is not None:
            engine.close()
        for node in nodes:
            node.stop()


def test_a_lost_node_whose_layers_fit_nowhere_stops_the_answer_clearly(tmp_path, small_model):
    from vramancer.engine import Engine
    from vramancer.runtime.recovery import NoRoomAfterLoss

    folder, _ = small_model
    (node,) = start_nodes(tmp_path, 1)
    engine = None
    try:
        # This machine has room for the embeddings, the head and a layer (6.4 MiB each) only.
        engine = Engine.load(str(folder), f"sim:12MiB,{node.device()}", context=SMALL_CONTEXT, dtype="float32")
        assert sum(1 for d in engine.placement.layer_devices if d == node.device()) >= SMALL_LAYERS - 2

        def on_step(step):
            if step == 4:
                os.kill(node.pid, signal.SIGKILL)

        last = SMALL_LAYERS - 1
        with pytest.raises(NoRoomAfterLoss, match=rf"{node.label} was lost and its layers L\d+–{last} fit on none of the devices left"):
            small_generate(engine, on_step=on_step)
        # Still usable: asked again, it says the same at once instead of hanging or crashing.
        started = time.monotonic()
        with pytest.raises(NoRoomAfterLoss):
            small_generate(engine)
        assert time.monotonic() - started < 2.0
        assert engine.device("sim0").ledger.total <= 12 * 2**20
    finally:
        if engine is not None:
            engine.close()
        node.stop()


def test_the_dashboard_worker_rides_out_a_node_cut_off_mid_answer(tmp_path, small_model):
    """Through the EngineWorker (what the dashboard drives): a migration to a node mid-answer,
    then that node stops answering without closing anything (SIGSTOP, as a cut cable looks):
    its silence is noticed by heartbeat, its layers come home, the answer is unchanged."""
    import queue

    from test_architectures import PROMPT as BYTES_PROMPT

    from vramancer.cluster.client import HEARTBEAT_S
    from vramancer.engine import LoadOptions
    from vramancer.engine import events as ev
    from vramancer.engine.worker import EngineWorker

    folder, reference_tokens = small_model
    nodes = start_nodes(tmp_path, 2)
    received: queue.Queue = queue.Queue()
    tokens_seen = []
    state = {}

    def emit(event):
        received.put(event)
        if isinstance(event, ev.Token):
            tokens_seen.append(event)
            if len(tokens_seen) == 3:
                worker.submit(ev.Migrate(0, 1, nodes[1].device()))
            if len(tokens_seen) == 8:
                os.kill(nodes[1].pid, signal.SIGSTOP)
                state["stopped"] = time.monotonic()

    worker = EngineWorker(emit, telemetry_hz=4).start()
    try:
        worker.submit(ev.Load(LoadOptions(str(folder), spec(nodes), context=SMALL_CONTEXT, dtype="float32")))
        events = []
        while not any(isinstance(e, (ev.PlanChanged, ev.Error)) for e in events):
            events.append(received.get(timeout=120))
        loaded = next(e for e in events if isinstance(e, ev.Loaded))
        hosts = {d.name: d.host for d in loaded.devices}
        assert hosts == {"sim0": None, nodes[0].device(): nodes[0].label, nodes[1].device(): nodes[1].label}
        worker.submit(ev.Generate(BYTES_PROMPT, {"max_new_tokens": TOKENS}, raw=True, request_id=7))
        while not any(isinstance(e, (ev.GenerationDone, ev.Error)) for e in events):
            events.append(received.get(timeout=120))
        done = next(e for e in events if isinstance(e, (ev.GenerationDone, ev.Error)))
        assert isinstance(done, ev.GenerationDone), done
        assert list(done.token_ids) == reference_tokens
        assert "".join(t.text for t in tokens_seen).strip() == done.text.strip()  # nothing streamed twice
        moved = [e for e in events if isinstance(e, ev.MigrationDone)]
        assert [(m.first, m.last, m.dst) for m in moved] == [(0, 1, nodes[1].device())]
        lost = [e for e in events if isinstance(e, ev.DeviceFault)]
        noticed = [e for e in lost if not e.recovered and e.node == nodes[1].label]
        assert noticed and f"no word from it for {HEARTBEAT_S:.0f} s" in noticed[0].message
        assert any(e.recovered for e in lost)
        last_plan = [e for e in events if isinstance(e, ev.PlanChanged)][-1].plan
        assert nodes[1].device() not in last_plan.layer_devices
        samples = [e for e in events if isinstance(e, ev.DeviceSample)]
        remote_weights = [s.weights for e in samples for s in e.devices if s.name == nodes[0].device()]
        assert remote_weights and max(remote_weights) > 0  # the node's own telemetry, streamed
    finally:
        worker.shutdown(10)
        for node in nodes:
            node.stop()
