"""Issue 33's cluster cases: a node holds its coordinator by a lease renewed by its traffic (a
stopped coordinator is let go and its memory freed, so the next one gets in); a coordinator
survives a node that greets and goes silent, or lies, with one sentence; a non-ASCII proof is
one log line on the node, not a traceback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
from cluster_nodes import TOKEN, start_nodes
from test_architectures import build, make_byte_tokenizer

from vramancer.cluster import protocol as p
from vramancer.cluster.client import NodeConnection

pytestmark = pytest.mark.timeout(120)

LEASE_S = 2

COORDINATOR = """
import sys, time
from vramancer.cluster.client import NodeConnection
node = NodeConnection("127.0.0.1", int(sys.argv[1]), sys.argv[2].encode()).connect()
node.request("load", model=sys.argv[3], dtype="float32", context=64, architecture={})
node.request("assign", layers={"0": "sim0", "1": "sim0"})
print("holding", flush=True)
time.sleep(600)
"""


def test_a_stopped_coordinator_is_let_go_after_its_lease_and_the_next_one_gets_in(tmp_path, monkeypatch):
    build("llama", {}, make_byte_tokenizer(), tmp_path / "model")
    monkeypatch.setenv("VRM_NODE_LEASE", str(LEASE_S))  # the nodes' environment: `vramancer node` reads it
    (node,) = start_nodes(tmp_path, 1)
    coordinator = subprocess.Popen([sys.executable, "-c", COORDINATOR, str(node.port), TOKEN, str(tmp_path / "model")],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert coordinator.stdout.readline().strip() == "holding", coordinator.stderr.read()
        node.wait_for_log("holding layers L0–1 on sim0")
        # Idle but alive, it renews its lease with pings: still held well past one lease.
        time.sleep(2 * LEASE_S)
        assert "past its lease" not in node.log()
        with pytest.raises(p.AdmissionRefused, match="serving another coordinator"):
            NodeConnection("127.0.0.1", node.port, TOKEN.encode()).connect()

        os.kill(coordinator.pid, signal.SIGSTOP)  # as a hung or cut-off coordinator looks: nothing closes
        stopped = time.monotonic()
        node.wait_for_log("past its lease; letting it go and freeing what it held", timeout=LEASE_S + 10)
        node.wait_for_log("ended", timeout=5)
        assert time.monotonic() - stopped < LEASE_S + 8
        assert "stuck" not in node.log()  # its tensor channel was hung up on, not waited for
        # Nothing of the node stays connected to the stopped coordinator.
        theirs = {c.laddr.port for c in psutil.Process(coordinator.pid).net_connections(kind="tcp")}
        assert not [c for c in psutil.Process(node.pid).net_connections(kind="tcp")
                    if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port in theirs]
        second = NodeConnection("127.0.0.1", node.port, TOKEN.encode()).connect()
        try:
            assert second.request("state")["layers"] == {}
            assert second.latest["sim0"]["weights"] == 0  # the stopped coordinator's layers are gone
            # In a session, nothing of the node listens but its own port: the rendezvous store's
            # listener and gloo's are closed once the group has formed.
            listening = [c.laddr.port for c in psutil.Process(node.pid).net_connections(kind="tcp")
                         if c.status == psutil.CONN_LISTEN]
            assert listening == [node.port]
            assert second.echo(64, 2) < 5.0  # and the group still carries tensors
        finally:
            second.close()
        assert "Traceback" not in node.log()
    finally:
        os.kill(coordinator.pid, signal.SIGKILL)
        coordinator.wait(10)
        coordinator.stdout.close()
        coordinator.stderr.close()
        node.stop()


class FakeNode:
    """A listener on 127.0.0.1 that greets like a node, then does what `then` says."""

    def __init__(self, then):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.then = then
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            hello = {"type": "hello", "version": p.PROTOCOL_VERSION, "nonce": p.new_nonce()}
            conn.sendall((json.dumps(hello) + "\n").encode())
            self.then(conn)

    def close(self):
        self.sock.close()
        for conn in self.held:
            conn.close()


def silent(conn):
    pass  # holds the connection open and says nothing more


def lying(conn):
    conn.recv(4096)
    welcome = {"type": "welcome", "proof": "0" * 64, "store_port": 1, "devices": 7, "lease_s": "long"}
    conn.sendall((json.dumps(welcome) + "\n").encode())


@pytest.mark.parametrize("then, words", [(silent, "greeted us and then did not answer"),
                                         (lying, "could not prove it holds the cluster token")])
def test_the_coordinator_survives_a_node_that_greets_then_goes_silent_or_lies(then, words, tmp_path, capsys,
                                                                               monkeypatch):
    from vramancer.cli import main

    build("llama", {}, make_byte_tokenizer(), tmp_path)
    monkeypatch.setenv("VRM_CLUSTER_TOKEN", TOKEN)
    fake = FakeNode(then)
    try:
        started = time.monotonic()
        code = main(["generate", "--model", str(tmp_path), "--devices", f"sim:1GiB,node:127.0.0.1:{fake.port}/sim0",
                     "--prompt", "hello", "--max-new-tokens", "2"])
        took = time.monotonic() - started
    finally:
        fake.close()
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert err.count("\n") == 1 and words in err and f"node:127.0.0.1:{fake.port}" in err, err
    assert took < 15


def test_a_non_ascii_proof_is_refused_with_one_log_line(tmp_path):
    (node,) = start_nodes(tmp_path, 1)
    try:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
                reader = sock.makefile("rb")
                assert json.loads(reader.readline())["type"] == "hello"
                auth = {"type": "auth", "version": p.PROTOCOL_VERSION, "nonce": "é" * 64, "proof": "é" * 64}
                sock.sendall((json.dumps(auth, ensure_ascii=False) + "\n").encode())
                assert json.loads(reader.readline()) == {"type": "refused", "reason": "its cluster token does not match"}
        log = node.wait_for_log("its cluster token does not match")
        time.sleep(0.2)
        log = node.log()
        assert log.count("its cluster token does not match") == 3 and "Traceback" not in log, log
        # And the node still admits a coordinator with the token.
        NodeConnection("127.0.0.1", node.port, TOKEN.encode()).connect().close()
    finally:
        node.stop()


def connects_from(source: str, port: int) -> bool:
    """Whether a connection from `source` (another loopback address) to 127.0.0.1:`port` gets in."""
    with socket.socket() as sock:
        sock.settimeout(1.0)
        sock.bind((source, 0))
        try:
            sock.connect(("127.0.0.1", port))
            return True
        except OSError:  # the filter drops its SYN: the attempt times out
            return False


def test_while_a_session_forms_its_listeners_take_only_the_admitted_peer():
    from vramancer.cluster import listeners
    from vramancer.cluster.node import Session

    if not listeners.filters_work():
        pytest.skip("socket filters are Linux's")
    session = Session(None, None, "127.0.0.1:1", "127.0.0.1", "127.0.0.1")
    port = session.open_store_socket()
    try:
        assert not connects_from("127.0.0.2", port)  # a stranger on another address
        assert connects_from("127.0.0.1", port)  # the coordinator's address
    finally:
        session.close_store_listener()
    # The same filter on a listener someone else opened (gloo's, found by its descriptor).
    (server, opened) = listeners.opened_by(lambda: socket.create_server(("127.0.0.1", 0)))
    with server:
        assert opened == {server.fileno()}
        listeners.only_from(server.fileno(), "127.0.0.2")
        assert connects_from("127.0.0.2", server.getsockname()[1])
        assert not connects_from("127.0.0.1", server.getsockname()[1])
