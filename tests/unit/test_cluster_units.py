"""Remote nodes without a model: the --devices grammar, the token and its proofs, zeroconf
adverts, admission against a real node served from this process, planning over remote
devices, discovery on the loopback interface, and the CLI's refusals."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time

import psutil
import pytest

from vramancer.cluster import protocol as p
from vramancer.cluster.discovery import NodeAdvert, parse_properties
from vramancer.config.device_spec import parse_device_spec

pytestmark = pytest.mark.timeout(120)

TOKEN = "unit-test-secret"


# --- the grammar ------------------------------------------------------------------------------


def test_remote_devices_mix_with_local_ones_in_one_spec():
    spec = parse_device_spec("sim:2x1GiB,node:127.0.0.1:7070/sim0,node:10.0.0.2:7071/cuda:1=8GiB,discover")
    assert [r.name for r in spec.requests] == ["sim0", "sim1"]
    assert [(r.name, r.cap) for r in spec.remotes] == [("node:127.0.0.1:7070/sim0", None),
                                                       ("node:10.0.0.2:7071/cuda:1", 8 * 2**30)]
    assert spec.discover and spec.clustered and spec.local().remotes == () and not spec.local().discover
    spec = parse_device_spec("cuda:0=10GiB,node:gpu-box:7070/cuda:0")
    assert [(r.name, r.cap) for r in spec.requests] == [("cuda:0", 10 * 2**30)]
    assert parse_device_spec("node:[::1]:7070/sim0").remotes[0].name == "node:[::1]:7070/sim0"
    plain = parse_device_spec("sim:3x1GiB")
    assert plain.remotes == () and not plain.clustered


@pytest.mark.parametrize("text, words", [
    ("cpu,node:127.0.0.1/sim0", "is not a remote device; write it node:HOST:PORT/DEVICE"),
    ("cpu,node:127.0.0.1:70000/sim0", "is not a remote device"),
    ("cpu,node:127.0.0.1:7070/", "is not a remote device"),
    ("cpu,node:h:7070/sim0,node:h:7070/sim0", "is listed twice"),
    ("gpu,node:h:7070/sim0", "'gpu' is not a device"),
    ("cpu,node:h:7070/sim0=lots", "is not a size"),
])
def test_bad_remote_specs_are_one_sentence(text, words):
    from vramancer.config.errors import VramancerError

    with pytest.raises(VramancerError, match=words):
        parse_device_spec(text)


# --- the token --------------------------------------------------------------------------------


def test_proofs_bind_token_role_and_both_nonces():
    a, b = p.new_nonce(), p.new_nonce()
    proof = p.coordinator_proof(b"k", a, b)
    assert p.proof_matches(proof, p.coordinator_proof(b"k", a, b))
    assert not p.proof_matches(proof, p.coordinator_proof(b"other", a, b))
    assert not p.proof_matches(proof, p.coordinator_proof(b"k", b, a))
    assert not p.proof_matches(proof, p.node_proof(b"k", a, b))  # a node cannot replay a coordinator's proof
    assert not p.proof_matches(proof, None) and not p.proof_matches(proof, 42)
    assert a != b and len(a) == 64


def test_the_token_comes_from_the_file_first_then_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(p.TOKEN_ENV, " from-env \n")
    assert p.cluster_token(None) == b"from-env"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert p.cluster_token(str(token_file)) == b"from-file"
    token_file.write_text("  \n")
    with pytest.raises(p.ClusterError, match="is empty"):
        p.cluster_token(str(token_file))
    with pytest.raises(p.ClusterError, match="cannot be read"):
        p.cluster_token(str(tmp_path / "missing"))
    monkeypatch.delenv(p.TOKEN_ENV)
    assert p.cluster_token(None) is None


# --- adverts ----------------------------------------------------------------------------------


def test_an_advert_round_trips_through_its_txt_record():
    advert = NodeAdvert("127.0.0.1", 7071, (("sim0", "1.0 GiB"), ("cuda:0", "24.0 GiB")))
    txt = {k.encode(): v.encode() for k, v in advert.properties().items()}  # as zeroconf hands them over
    back = parse_properties(txt)
    assert back == advert
    assert back.device_names() == ["node:127.0.0.1:7071/sim0", "node:127.0.0.1:7071/cuda:0"]
    assert advert.instance_name() == "vramancer-127-0-0-1-7071._vramancer._tcp.local."


@pytest.mark.parametrize("txt", [{b"host": b"h"}, {b"port": b"7070"}, {b"host": b"h", b"port": b"0"},
                                 {b"host": b"h", b"port": b"seven"}])
def test_an_advert_without_host_and_port_is_refused(txt):
    with pytest.raises(p.ClusterError, match="usable host and port"):
        parse_properties(txt)


def test_an_advert_tolerates_missing_and_odd_device_lists():
    assert parse_properties({"host": "h", "port": "1"}).devices == ()
    assert parse_properties({"host": "h", "port": "1", "devices": " sim0 = 1 GiB ;; cpu"}).devices == (
        ("sim0", "1 GiB"), ("cpu", ""))


# --- a node served from this process ----------------------------------------------------------


@pytest.fixture
def node_server():
    from vramancer.cluster.node import NodeServer, node_devices

    server = NodeServer(node_devices("sim:2x1GiB"), TOKEN.encode(), "127.0.0.1", 0, advertise=False)
    server.listen()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.stop()
    thread.join(5)


def connect(server, token: bytes | None = TOKEN.encode()):
    from vramancer.cluster.client import NodeConnection

    return NodeConnection("127.0.0.1", server.port, token).connect()


def test_admission_forms_a_group_and_everything_listens_on_loopback_only(node_server):
    from vramancer.cluster.client import remote_devices

    node = connect(node_server)
    try:
        state = node.request("state")
        assert state["model"] is None and state["layers"] == {}
        devices = remote_devices(node)
        assert [d.name for d in devices] == [f"node:127.0.0.1:{node_server.port}/sim0", f"node:127.0.0.1:{node_server.port}/sim1"]
        assert all(not d.local and d.simulated and d.host == node.label and d.cap == 2**30 for d in devices)
        assert devices[0].room() == 2**30 and devices[0].read().total == 2**30
        snap = devices[1].snapshot()
        assert (snap.name, snap.total, snap.weights, snap.kv) == (devices[1].name, 2**30, 0, 0)
        assert "@ 127.0.0.1" in devices[0].label
        # The tensor channel works both ways (an echo of a hidden-state-sized tensor).
        assert 0 < node.echo(576, 3) < 5.0
        # Both ends of the session in this process: control port, rendezvous store, gloo pairs.
        listening = [c for c in psutil.Process().net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        assert len(listening) >= 2
        assert {c.laddr.ip for c in listening} == {"127.0.0.1"}, listening
    finally:
        node.close()


def test_a_wrong_token_and_no_token_are_refused_and_logged(node_server, caplog):
    caplog.set_level("WARNING")
    with pytest.raises(p.AdmissionRefused, match="refused this coordinator: its cluster token does not match"):
        connect(node_server, b"wrong")
    with pytest.raises(p.AdmissionRefused, match="no cluster token was given; set VRM_CLUSTER_TOKEN"):
        connect(node_server, None)
    node_lines = [r.getMessage() for r in caplog.records if r.name == "vramancer.node"]
    assert any("its cluster token does not match; no process group formed" in m for m in node_lines)
    assert any("it offered no cluster token" in m for m in node_lines)
    coordinator_lines = [r.getMessage() for r in caplog.records if r.name.startswith("vramancer.cluster")]
    assert sum("refused this coordinator" in m for m in coordinator_lines) == 2
    assert node_server.session is None and node_server.model is None


def test_one_coordinator_at_a_time(node_server):
    first = connect(node_server)
    try:
        with pytest.raises(p.AdmissionRefused, match="serving another coordinator"):
            connect(node_server)
    finally:
        first.close()
    deadline = time.monotonic() + 5
    while node_server.session is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    connect(node_server).close()  # free again once the first said goodbye


def test_garbage_and_oversized_messages_are_refused_before_admission(node_server, caplog):
    caplog.set_level("WARNING")
    for payload in (b"GET / HTTP/1.0\r\n\r\n", b"{" + b"x" * (p.MAX_LINE + 10) + b"\n"):
        with socket.create_connection(("127.0.0.1", node_server.port), timeout=5) as sock:
            assert b'"type":"hello"' in sock.recv(4096)  # the challenge
            try:
                sock.sendall(payload)
                answer = sock.recv(4096)  # the node hangs up without a word
            except (ConnectionResetError, BrokenPipeError):
                answer = b""
            assert answer == b""
    assert node_server.session is None
    failures = [r.getMessage() for r in caplog.records if r.name == "vramancer.node"]
    assert any("was not JSON" in m for m in failures) and any("too long" in m for m in failures), failures


def test_a_node_that_cannot_prove_the_token_is_not_used():
    """A server that greets like a node and welcomes anyone, without knowing the token."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def impostor():
        conn, _ = listener.accept()
        channel = p.LineChannel(conn)
        channel.send({"type": "hello", "version": p.PROTOCOL_VERSION, "nonce": p.new_nonce()})
        channel.receive()
        channel.send({"type": "welcome", "proof": "0" * 64, "store_port": 1, "devices": []})
        time.sleep(0.5)
        channel.close()

    thread = threading.Thread(target=impostor, daemon=True)
    thread.start()
    from vramancer.cluster.client import NodeConnection

    with pytest.raises(p.AdmissionRefused, match="could not prove it holds the cluster token"):
        NodeConnection("127.0.0.1", port, TOKEN.encode()).connect()
    thread.join(5)
    listener.close()


def test_a_dead_node_is_noticed_and_requests_fail_clearly(node_server):
    node = connect(node_server)
    lost = []
    node.on_lost = lambda n, reason: lost.append(reason)
    node_server.session.channel.close()  # the node's end goes away
    deadline = time.monotonic() + 5
    while not lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lost and not node.alive
    with pytest.raises(p.NodeLost, match=f"node {node.label} was lost"):
        node.request("state")
    node.close()


# --- planning over remote devices -------------------------------------------------------------


@pytest.fixture
def tiny_profile(tiny_model_dir):
    import torch

    from vramancer.model.description import profile_model
    from vramancer.model.loading import build_meta_model
    from vramancer.model.source import load_config, resolve_model

    config = load_config(resolve_model(tiny_model_dir))
    return profile_model(build_meta_model(config, torch.float32), torch.float32)


def test_plans_keep_the_ends_local_and_give_nodes_layers_by_room(node_server, tiny_profile):
    from vramancer.cluster.client import remote_devices
    from vramancer.planning.placement import PlanError, make_plan
    from vramancer.platforms.devices import resolve_devices

    node = connect(node_server)
    try:
        remote = remote_devices(node)
        local = resolve_devices(parse_device_spec("sim:1GiB"))
        plan = make_plan(tiny_profile, remote + local, "proportional", 256)  # listed first, still after the local one
        placement = plan.placement
        assert placement.embed == "sim0" and placement.head == "sim0"
        assert [b.device for b in placement.blocks()] == ["sim0", remote[0].name, remote[1].name]
        sizes = [len(b.layers) for b in placement.blocks()]
        assert max(sizes) - min(sizes) <= 1  # three equal rooms, six layers
        sequential = make_plan(tiny_profile, local + remote, "sequential", 256).placement
        assert set(sequential.layer_devices) == {"sim0"} and sequential.head == "sim0"
        with pytest.raises(PlanError, match="remote devices hold decoder layers only"):
            make_plan(tiny_profile, remote, "proportional", 256)
    finally:
        node.close()


# --- discovery on the loopback interface ------------------------------------------------------


def multicast_on_loopback() -> bool:
    """Whether a multicast datagram sent on 127.0.0.1 comes back to a member on 127.0.0.1."""
    group = "224.0.0.251"
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        receiver.bind((group, 0))
        port = receiver.getsockname()[1]
        receiver.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                            socket.inet_aton(group) + socket.inet_aton("127.0.0.1"))
        receiver.settimeout(1.0)
        sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
        sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, struct.pack("b", 1))
        sender.sendto(b"vramancer-probe", (group, port))
        return receiver.recv(64) == b"vramancer-probe"
    except OSError:
        return False
    finally:
        receiver.close()
        sender.close()


def test_nodes_are_discovered_on_loopback(capsys):
    if not multicast_on_loopback():
        pytest.skip("multicast does not loop back on 127.0.0.1 here, so zeroconf cannot be tested")
    from vramancer.cli import main
    from vramancer.cluster.discovery import discover
    from vramancer.cluster.node import NodeServer, node_devices

    server = NodeServer(node_devices("sim:2x512MiB"), TOKEN.encode(), "127.0.0.1", 0, advertise=True)
    server.listen()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        found = [a for a in discover(3.0, "127.0.0.1") if a.port == server.port]
        assert found == [NodeAdvert("127.0.0.1", server.port, (("sim0", "512 MiB"), ("sim1", "512 MiB")))]
        assert main(["devices", "--devices", "cpu", "--discover", "--discover-seconds", "3", "--json"]) == 0
        listing = json.loads(capsys.readouterr().out)
        mine = [n for n in listing["nodes"] if n["port"] == server.port]
        assert mine and [d["name"] for d in mine[0]["devices"]] == [f"node:127.0.0.1:{server.port}/sim0",
                                                                    f"node:127.0.0.1:{server.port}/sim1"]
        # zeroconf's sockets stay on loopback and the mDNS group: nothing on 0.0.0.0.
        udp = [c for c in psutil.Process().net_connections(kind="udp4")]
        assert udp and all(c.laddr.ip in ("127.0.0.1", "224.0.0.251") for c in udp), udp
    finally:
        server.stop()
        thread.join(5)
    assert not [a for a in discover(2.0, "127.0.0.1") if a.port == server.port]  # withdrawn on close


# --- the command line -------------------------------------------------------------------------


def run_main(args, capsys):
    from vramancer.cli import main

    try:
        status = main(args)
    except SystemExit as exit_:
        status = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    return status, lines


@pytest.mark.parametrize("args, env, words", [
    (["node", "--devices", "sim:1GiB"], None, "a node needs the cluster token"),
    (["node", "--port", "70000"], TOKEN, "--port must be between 0 and 65535"),
    (["node", "--lease", "0.5"], TOKEN, "--lease must be between 1 and 3600 seconds, not 0.5"),
    (["node", "--lease", "nan"], TOKEN, "--lease must be a finite number"),
    (["node", "--devices", "cpu,node:127.0.0.1:7070/sim0"], TOKEN, "a node serves its own devices only"),
    (["node", "--token-file", "/no/such/token"], None, "cannot be read"),
    (["plan", "--devices", "node:127.0.0.1:1/sim0"], TOKEN, "remote devices hold decoder layers only"),
    (["plan", "--devices", "cpu,node:127.0.0.1:1/sim0"], TOKEN, "cannot reach node:127.0.0.1:1"),
])
def test_cluster_cli_refusals_are_one_sentence(args, env, words, capsys, monkeypatch):
    if env is None:
        monkeypatch.delenv("VRM_CLUSTER_TOKEN", raising=False)
    else:
        monkeypatch.setenv("VRM_CLUSTER_TOKEN", env)
    status, lines = run_main(args, capsys)
    assert status == 2
    assert len(lines) == 1 and lines[0].startswith("vramancer") and "Traceback" not in lines[0], lines
    assert words in lines[0]


# --- the data path, on the tiny model, with the node in this process --------------------------


def test_tiny_model_split_with_a_node_matches_the_local_split(node_server, tiny_model_dir, monkeypatch):
    from vramancer.engine import Engine

    monkeypatch.setenv("VRM_CLUSTER_TOKEN", TOKEN)
    local = Engine.load(tiny_model_dir, "sim:2x64MiB", context=256)
    expected = local.generate("Tell me about the sea.", max_new_tokens=16).token_ids
    local.close()
    label = f"node:127.0.0.1:{node_server.port}"
    engine = Engine.load(tiny_model_dir, f"sim:1GiB,{label}/sim0,{label}/sim1", context=256)
    try:
        assert [b.device for b in engine.placement.blocks()] == ["sim0", f"{label}/sim0", f"{label}/sim1"]
        assert node_server.model is not None and sorted(node_server.model.assigned) == [
            i for i, d in enumerate(engine.placement.layer_devices) if d != "sim0"]
        assert engine.generate("Tell me about the sea.", max_new_tokens=16).token_ids == expected
        # The node read only the layers it holds from the file: not the token table, the head
        # or this machine's layers.
        held = node_server.model
        assert held.reader.streams
        layers = held.description.architecture.layers
        for index, layer in enumerate(layers):
            assert all(t.is_meta != (index in held.assigned) for t in layer.parameters()), index
        assert held.description.architecture.input_embeddings.weight.is_meta
        assert held.description.architecture.output_embeddings.weight.is_meta
        # Both of the node's devices in one run: one round trip per forward pass for the pair.
        links = {(l.src, l.dst): l for l in engine.link_stats()}
        assert links[("sim0", f"{label}/sim0")].transfers == links[(f"{label}/sim1", "sim0")].transfers
        # Between the node's own devices (same node: the node moves the layer and its cache itself).
        moves = {}

        def on_step(step):
            if step == 5:
                moves["a"] = engine.migrate(5, 5, f"{label}/sim0", step=step)
            if step == 9:
                moves["b"] = engine.migrate(3, 5, "sim0", step=step)

        assert engine.generate("Tell me about the sea.", max_new_tokens=16, on_step=on_step).token_ids == expected
        assert moves["b"].bytes > sum(engine.profile.layer_bytes[3:6])  # weights placed + KV carried home
        assert set(engine.placement.layer_devices[3:6]) == {"sim0"}
    finally:
        engine.close()
    deadline = time.monotonic() + 5
    while node_server.session is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert node_server.session is None and node_server.model.assigned == {}  # released on goodbye
    assert all(t.is_meta for t in node_server.model.model.parameters())  # and its weights let go


def test_a_plan_that_does_not_fit_lets_the_nodes_go(node_server, tiny_model_dir, monkeypatch):
    from vramancer.engine import Engine
    from vramancer.planning.placement import PlanError

    monkeypatch.setenv("VRM_CLUSTER_TOKEN", TOKEN)
    with pytest.raises(PlanError, match="with its embeddings and head on this machine"):
        Engine.load(tiny_model_dir, f"sim:1MiB,node:127.0.0.1:{node_server.port}/sim0", context=256)
    deadline = time.monotonic() + 5
    while node_server.session is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert node_server.session is None and node_server.model is None
