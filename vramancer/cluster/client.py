"""The coordinator's side of a node: admission, the process group, requests, tensors, health.

A NodeConnection is alive while the node's telemetry keeps arriving. Its reader thread sees the
node go: the connection closing (a crash or SIGKILL closes it at once) or HEARTBEAT_S without a
word (a node cut off). Every wait on the process group is done on a helper thread while the
caller watches that health, so nothing blocks on a node that is gone.
"""

from __future__ import annotations

import itertools
import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch

from vramancer.cluster import protocol as p
from vramancer.config.device_spec import DeviceSpecError, node_label
from vramancer.platforms.devices import Device, MemoryLedger, kind_class
from vramancer.platforms.readings import DeviceReading, DeviceSnapshot

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
HEARTBEAT_S = 5.0  # a node that says nothing for this long is lost (it samples every 0.5 s)
REQUEST_TIMEOUT_S = 120.0
LOAD_TIMEOUT_S = 900.0  # a node's first read of a large model can take minutes
GLOO_TIMEOUT = timedelta(days=7)  # liveness is judged by heartbeats, not by how long an operation takes
POLL_S = 0.2
GOODBYE_TIMEOUT_S = 5.0  # close() waits this long for each part of the goodbye, then hangs up
PINGS_PER_LEASE = 4  # an idle coordinator renews the node's lease this often within it


class NodeConnection:
    """One admitted node: the control channel, the process group, and the node's latest samples."""

    def __init__(self, host: str, port: int, token: bytes | None):
        self.host, self.port = host, port
        self.label = node_label(host, port)
        self._token = token
        self.devices: list[dict] = []
        self.latest: dict[str, dict] = {}  # device name on the node → its latest snapshot
        self.model: str | None = None  # what the node had loaded when we arrived
        self.lost_reason: str | None = None
        self.on_lost = None  # called once, on the reader thread, with the reason
        self._last_heard = time.monotonic()
        self._channel: p.LineChannel | None = None
        self._pg = None
        self._store = None
        self._replies: dict[int, queue.Queue] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._jobs: queue.Queue = queue.Queue()
        self._closing = False
        self._lease_s = p.DEFAULT_LEASE_S

    # --- admission -------------------------------------------------------------------------

    def connect(self) -> "NodeConnection":
        try:
            sock = socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT_S)
        except OSError as exc:
            raise p.ClusterError(f"cannot reach {self.label}: {exc.strerror or exc}.") from None
        channel = p.LineChannel(sock)
        try:
            self._admission(channel)
        except Exception:
            channel.close()
            raise
        local_address = sock.getsockname()[0]
        try:
            self._form_group(local_address)
            self._await_formed(channel)
        except Exception as exc:
            channel.close()
            raise p.ClusterError(f"{self.label} admitted us but the process group did not form: {_first_line(exc)}.") from None
        sock.settimeout(HEARTBEAT_S)
        self._channel = channel
        self._last_heard = time.monotonic()
        threading.Thread(target=self._read_loop, name=f"vramancer-{self.label}-control", daemon=True).start()
        threading.Thread(target=self._wait_loop, name=f"vramancer-{self.label}-waits", daemon=True).start()
        threading.Thread(target=self._keep_lease, name=f"vramancer-{self.label}-lease", daemon=True).start()
        log.info("admitted by %s", self.label)
        return self

    def _admission(self, channel: p.LineChannel) -> None:
        try:
            hello = channel.receive()
        except (OSError, p.ClusterError) as exc:
            raise p.ClusterError(f"{self.label} did not greet us: {_first_line(exc) or 'it said nothing'}.") from None
        if not hello or hello.get("type") != "hello" or not isinstance(hello.get("nonce"), str):
            raise p.ClusterError(f"{self.label} is not a vramancer node (it did not send a challenge).")
        ours = p.new_nonce()
        proof = p.coordinator_proof(self._token, hello["nonce"], ours) if self._token else None
        try:
            channel.send({"type": "auth", "version": p.PROTOCOL_VERSION, "nonce": ours, "proof": proof})
            answer = channel.receive()
        except (OSError, p.ClusterError) as exc:
            # A node that greets and then says nothing (or garbage) is not used, and nothing waits on it.
            raise p.ClusterError(f"{self.label} greeted us and then did not answer ({_first_line(exc) or 'silence'}); "
                                 "it is not used.") from None
        if answer is None or answer.get("type") == "refused":
            reason = (answer or {}).get("reason", "it closed the connection")
            if self._token is None:
                sentence = (f"{self.label} refused this coordinator: no cluster token was given; "
                            f"set {p.TOKEN_ENV} or pass --token-file.")
            else:
                sentence = f"{self.label} refused this coordinator: {reason}."
            log.warning("%s", sentence)
            raise p.AdmissionRefused(sentence)
        if answer.get("type") != "welcome" or not p.proof_matches(
                p.node_proof(self._token, hello["nonce"], ours), answer.get("proof")):
            log.warning("%s could not prove it holds the cluster token; not using it", self.label)
            raise p.AdmissionRefused(f"{self.label} could not prove it holds the cluster token; it is not used.")
        devices = answer.get("devices")
        self.devices = [d for d in devices if isinstance(d, dict) and isinstance(d.get("name"), str)] \
            if isinstance(devices, list) else []
        self.model = answer.get("model")
        if isinstance(answer.get("samples"), list):
            self._take_samples(answer["samples"])
        store_port, lease = answer.get("store_port"), answer.get("lease_s")
        if not isinstance(store_port, int) or isinstance(store_port, bool) or not 0 < store_port < 65536:
            raise p.ClusterError(f"{self.label} admitted us without a usable rendezvous port ({store_port!r}); it is not used.")
        if isinstance(lease, (int, float)) and not isinstance(lease, bool) and 1.0 <= lease <= 3600.0:
            self._lease_s = float(lease)
        self._store_port = store_port

    def _form_group(self, local_address: str) -> None:
        import torch.distributed as dist
        from torch.distributed import ProcessGroupGloo

        self._store = dist.TCPStore(self.host, self._store_port, 2, False, timedelta(seconds=20))
        from vramancer.cluster import listeners

        options = ProcessGroupGloo._Options()
        device, _ = listeners.opened_by(lambda: ProcessGroupGloo.create_device(hostname=local_address))
        options._devices = [device]
        options._timeout = GLOO_TIMEOUT
        self._pg = ProcessGroupGloo(self._store, p.COORDINATOR_RANK, 2, options)

    def _await_formed(self, channel: p.LineChannel) -> None:
        """Wait for the node's word that its half of the group formed and its rendezvous store
        stopped listening: our half may form first, and the store must be shut by the time
        connect() returns."""
        try:
            message = channel.receive()
        except (OSError, p.ClusterError) as exc:
            raise p.ClusterError(f"it did not confirm the group ({exc})") from None
        if message is None or message.get("type") != "formed":
            raise p.ClusterError("it did not confirm the group")

    # --- health ----------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.lost_reason is None

    def mark_lost(self, reason: str) -> None:
        with self._lock:
            if self.lost_reason is not None:
                return
            self.lost_reason = reason
            waiting = list(self._replies.values())
        if not self._closing:
            log.warning("%s lost: %s", self.label, reason)
        for box in waiting:
            box.put(None)
        if self._channel is not None:
            self._channel.close()
        callback = self.on_lost
        if callback is not None and not self._closing:
            try:
                callback(self, reason)
            except Exception:
                log.exception("reporting the loss of %s failed", self.label)

    def _read_loop(self) -> None:
        channel = self._channel
        while self.alive:
            try:
                message = channel.receive()
            except socket.timeout:
                self.mark_lost(f"no word from it for {HEARTBEAT_S:.0f} s")
                return
            except (OSError, ValueError, p.ClusterError) as exc:
                self.mark_lost(f"its connection failed ({exc})")
                return
            if message is None:
                self.mark_lost("its connection closed")
                return
            self._last_heard = time.monotonic()
            if isinstance(message.get("devices"), list):
                self._take_samples(message["devices"])
            if message.get("type") == "fatal":
                self.mark_lost(f"it failed: {message.get('error', 'unknown error')}")
                return
            if "id" in message:
                with self._lock:
                    box = self._replies.get(message["id"])
                if box is not None:
                    box.put(message)

    def _keep_lease(self) -> None:
        """Renew the node's lease while nothing else is said (a long answer says nothing on
        the control channel): a ping a few times per lease."""
        interval = self._lease_s / PINGS_PER_LEASE
        while self.alive and not self._closing:
            time.sleep(interval)
            if not self.alive or self._closing:
                return
            try:
                self._channel.send({"type": "ping"})
            except OSError as exc:
                self.mark_lost(f"a ping could not be sent ({exc})")
                return

    def _take_samples(self, snapshots: list) -> None:
        for snap in snapshots:
            if isinstance(snap, dict) and isinstance(snap.get("name"), str):
                self.latest[snap["name"]] = snap

    # --- requests --------------------------------------------------------------------------

    def request(self, op: str, timeout: float = REQUEST_TIMEOUT_S, **fields) -> dict:
        """Send one JSON request and wait for its reply; ClusterError with the node's sentence
        if it refused, NodeLost if it went away meanwhile."""
        self._check()
        request_id = next(self._ids)
        box: queue.Queue = queue.Queue()
        with self._lock:
            self._replies[request_id] = box
        try:
            try:
                self._channel.send({"id": request_id, "op": op, **fields})
            except OSError as exc:
                self.mark_lost(f"a request could not be sent ({exc})")
                self._check()
            deadline = time.monotonic() + timeout
            while True:
                try:
                    reply = box.get(timeout=POLL_S)
                    break
                except queue.Empty:
                    if time.monotonic() > deadline:
                        raise p.ClusterError(f"{self.label} did not answer '{op}' within {timeout:.0f} s.") from None
            self._check()
        finally:
            with self._lock:
                self._replies.pop(request_id, None)
        if not reply.get("ok"):
            raise p.ClusterError(f"{self.label}: {reply.get('error', 'the request failed')}")
        return reply

    def _check(self) -> None:
        if self.lost_reason is not None:
            raise p.NodeLost(self.label, self.lost_reason)

    # --- tensors ---------------------------------------------------------------------------

    def _wait_loop(self) -> None:
        while True:
            works, done, box = self._jobs.get()
            try:
                for work in works:
                    work.wait()
            except Exception as exc:  # the peer crashed or the group broke
                box.append(exc)
            done.set()

    def _wait(self, works: list, what: str, timeout: float | None = None) -> None:
        """Wait for gloo operations on the helper thread, watching the node's health meanwhile
        (and giving up after `timeout` seconds when one is given)."""
        done, box = threading.Event(), []
        self._jobs.put((works, done, box))
        deadline = time.monotonic() + timeout if timeout is not None else None
        while not done.wait(POLL_S):
            if not self.alive:
                raise p.NodeLost(self.label, self.lost_reason or "it went away")
            if deadline is not None and time.monotonic() > deadline:
                raise p.ClusterError(f"{self.label} did not finish {what} within {timeout:.0f} s.")
        if box:
            self.mark_lost(f"{what} failed: {_first_line(box[0])}")
            raise p.NodeLost(self.label, self.lost_reason or what)

    def _send(self, tensors: list[torch.Tensor]) -> list:
        self._check()
        try:
            return [self._pg.send([t], p.NODE_RANK, p.TAG) for t in tensors]
        except RuntimeError as exc:  # gloo saw the peer go before our reader thread did
            self._group_failed("sending", exc)

    def _recv(self, tensor: torch.Tensor):
        try:
            return self._pg.recv([tensor], p.NODE_RANK, p.TAG)
        except RuntimeError as exc:
            self._group_failed("receiving", exc)

    def _group_failed(self, what: str, exc: BaseException):
        self.mark_lost(f"{what} failed: {_first_line(exc)}")
        raise p.NodeLost(self.label, self.lost_reason or what) from None

    def run(self, hidden: torch.Tensor, positions: torch.Tensor, first: int, last: int, past: int,
            use_cache: bool) -> tuple[torch.Tensor, float, float]:
        """Layers first..last on the node: (hidden state out, node compute seconds, round trip seconds)."""
        tokens = hidden.shape[1]
        start = int(positions[0, 0]) if positions.numel() else 0
        explicit = not bool(torch.equal(positions[0], torch.arange(start, start + tokens, device=positions.device)))
        out = torch.empty_like(hidden)
        stats = torch.empty(2, dtype=torch.float64)
        began = time.perf_counter()
        sent = [p.header(p.OP_RUN, tokens, first, last, past, int(use_cache), int(explicit), start), hidden]
        if explicit:
            sent.append(positions.to("cpu", torch.int64).contiguous())
        works = self._send(sent)
        works += [self._recv(out), self._recv(stats)]
        self._wait(works, f"running layers {first}-{last}")
        return out, float(stats[0]), time.perf_counter() - began

    def pull_kv(self, first: int, last: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Keys and values of layers first..last from the node (None if it holds none)."""
        head = torch.empty(p.HEADER_LEN, dtype=torch.int64)
        self._wait(self._send([p.header(p.OP_KV_PULL, first, last)]) + [self._recv(head)], "reading the KV cache")
        status, tokens, heads, head_dim, code = head.tolist()[:5]
        if tokens == 0:
            return None
        pairs = []
        works = []
        for _ in range(first, last + 1):
            k = torch.empty(1, heads, tokens, head_dim, dtype=p.DTYPES[code])
            v = torch.empty_like(k)
            works += [self._recv(k), self._recv(v)]
            pairs.append((k, v))
        self._wait(works, "reading the KV cache")
        return pairs

    def push_kv(self, first: int, last: int, pairs: list[tuple[torch.Tensor, torch.Tensor]] | None,
                length: int = 0) -> None:
        """Give layers first..last these keys and values on the node (None: an empty cache);
        `length` is how many tokens they have seen (more than they keep, for a sliding window)."""
        if pairs:
            k = pairs[0][0]
            head = p.header(p.OP_KV_PUSH, first, last, k.shape[2], k.shape[1], k.shape[3], p.dtype_code(k.dtype),
                            max(length, k.shape[2]))
            tensors = [head] + [t.to("cpu").contiguous() for pair in pairs for t in pair]
        else:
            tensors = [p.header(p.OP_KV_PUSH, first, last, 0)]
        ack = torch.empty(p.HEADER_LEN, dtype=torch.int64)
        self._wait(self._send(tensors) + [self._recv(ack)], "writing the KV cache")

    def echo(self, numel: int, rounds: int) -> float:
        """The least round-trip time of `rounds` echoes of `numel` float32 values."""
        payload = torch.randn(numel)
        back = torch.empty_like(payload)
        best = float("inf")
        for _ in range(rounds):
            began = time.perf_counter()
            self._wait(self._send([p.header(p.OP_ECHO, numel), payload]) + [self._recv(back)], "an echo")
            best = min(best, time.perf_counter() - began)
        return best

    # --- the end ---------------------------------------------------------------------------

    def close(self) -> None:
        """Say goodbye (the node releases everything it held for us) and drop the connection."""
        if self._channel is None:
            return
        self._closing = True  # what follows is no loss worth a warning
        if self.alive:
            # A tensor channel out of step (a send the node never receives) must not hang
            # close(): after GOODBYE_TIMEOUT_S we stop waiting on it. The goodbye on the control
            # channel goes out either way, so the node marks the session as ending before we
            # hang up, and a coordinator reconnecting at once is waited for, not refused.
            try:
                works = self._send([p.header(p.OP_BYE)])
                self._wait(works, "saying goodbye", timeout=GOODBYE_TIMEOUT_S)
            except p.ClusterError as exc:
                log.info("%s: goodbye on the tensor channel not taken (%s)", self.label, exc)
            try:
                self.request("bye", timeout=GOODBYE_TIMEOUT_S)
            except p.ClusterError as exc:
                log.info("%s: goodbye not acknowledged (%s)", self.label, exc)
        self.mark_lost("closed by this coordinator")
        self._pg = None
        self._store = None


@dataclass(eq=False)
class RemoteDevice(Device):
    """A device of a node, seen from the coordinator. Layers placed here run on the node.

    Its ledger mirrors what this coordinator asked the node to hold; its readings are the
    node's own telemetry; `room` is what the node reports free plus what we already hold."""

    node: NodeConnection | None = None
    remote_name: str = ""  # the device's name on its node: sim0, cuda:0, cpu
    simulated_on_node: bool = False  # as the node describes it

    local = False

    @property
    def reserve(self) -> int:  # type: ignore[override]
        return kind_class(self.kind).reserve

    @property
    def last_resort(self) -> bool:  # type: ignore[override]
        return kind_class(self.kind).last_resort

    @property
    def simulated(self) -> bool:
        return self.simulated_on_node

    @property
    def host(self) -> str | None:
        return self.node.label if self.node else None

    @property
    def lost(self) -> bool:
        return self.node is None or not self.node.alive

    def mark_lost(self, reason: str) -> None:
        if self.node is not None:
            self.node.mark_lost(reason)

    def close(self) -> None:
        if self.node is not None:
            self.node.close()

    def watch(self, on_lost) -> None:
        if self.node is not None:
            self.node.on_lost = None if on_lost is None else (lambda node, reason: on_lost(node.label, reason))

    def _sample(self) -> dict:
        return self.node.latest.get(self.remote_name, {}) if self.node else {}

    def read(self) -> DeviceReading:
        snap = self._sample()
        total = int(snap.get("total", self.cap or 0))
        free = 0 if self.lost else int(snap.get("free", total))
        return DeviceReading(total=total, free=free, utilization=snap.get("utilization"),
                             temperature=snap.get("temperature"), power=snap.get("power"),
                             pcie_rx=snap.get("pcie_rx"), pcie_tx=snap.get("pcie_tx"))

    def room(self) -> int:
        if self.lost:
            return 0
        claims = self.ledger.claims
        room = self.read().free + claims["weights"] + claims["kv"] + claims["workspace"]
        return min(room, self.cap) if self.cap is not None else room

    def shortfall(self, planned: int, held: int) -> int:
        return planned - held - self.read().free

    def squeeze(self, nbytes: int) -> None:
        raise p.ClusterError(f"{self.name} is on {self.host}; squeeze it on that machine.")

    def reported_kv(self) -> int | None:
        return int(self._sample().get("kv", 0))

    def snapshot(self, kv_bytes: int = 0) -> DeviceSnapshot:
        """The node's own reading of this device, under the coordinator's name (its weights
        and KV cache as the node holds them; `kv_bytes` is not ours to count)."""
        snap = self._sample()
        reading = self.read()
        return DeviceSnapshot(
            name=self.name, kind=self.kind, label=self.label, simulated=self.simulated,
            total=reading.total, free=reading.free, weights=int(snap.get("weights", 0)),
            kv=int(snap.get("kv", 0)), other=int(snap.get("other", 0)),
            utilization=reading.utilization, temperature=reading.temperature, power=reading.power,
            pcie_rx=reading.pcie_rx, pcie_tx=reading.pcie_tx,
        )

    def to_json(self) -> dict:
        data = super().to_json()
        data.update(lost=self.lost)
        return data


def remote_devices(node: NodeConnection, wanted: dict[str, int | None] | None = None) -> list[RemoteDevice]:
    """RemoteDevice objects for the node's devices named in `wanted` (name → cap), or all."""
    offered = {d["name"]: d for d in node.devices}
    names = list(wanted) if wanted is not None else list(offered)
    devices = []
    for name in names:
        info = offered.get(name)
        if info is None:
            raise DeviceSpecError(f"{node.label} has no device {name}; it offers {', '.join(offered) or 'none'}.")
        node_cap = info.get("cap")
        cap = (wanted or {}).get(name)
        cap = min(c for c in (cap, node_cap) if c is not None) if (cap or node_cap) else None
        kind = str(info.get("kind", "cpu"))
        label = f"{info.get('label', kind)} @ {node.host}:{node.port}"
        full = f"{node.label}/{name}"
        ledger = MemoryLedger(capacity=cap, device_name=full)
        devices.append(RemoteDevice(full, kind, label, torch.device("cpu"), ledger, cap=cap, node=node, remote_name=name,
                                    simulated_on_node=bool(info.get("simulated", False))))
    return devices


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
