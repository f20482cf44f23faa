"""`vramancer node`: serve this machine's devices to one coordinator at a time.

A node listens on --bind:--port (127.0.0.1:7070 by default), advertises itself with zeroconf,
and admits a coordinator only after the challenge-response on the cluster token. Then the two
form a two-rank gloo process group (TCPStore rendezvous on the node's address) and the node
obeys a short list of JSON requests: load a model by name from its own disk or hub cache,
take or give back layers, reset or crop its KV cache, profile its devices, end the session.
It never runs code, unpickles data or opens files named by the coordinator beyond the model.
The coordinator holds the node by a lease that its messages renew; one silent past it is
let go, and what it held freed.

Tensors arrive on the process group: a hidden state (with its positions; masks and rotary
tables are made here, by the model's own decoder) runs through the layers this node holds
and goes back.
"""

from __future__ import annotations

import inspect
import logging
import os
import socket
import threading
import time
from dataclasses import asdict
from datetime import timedelta

import torch

from vramancer.cluster import listeners
from vramancer.cluster import protocol as p
from vramancer.cluster.remote import PassThrough, fresh_entry
from vramancer.config.device_spec import node_label, parse_device_spec
from vramancer.config.errors import VramancerError
from vramancer.config.units import format_bytes
from vramancer.platforms.devices import Device, DeviceFullError, resolve_devices
from vramancer.platforms.lifetime import Lifetime

log = logging.getLogger("vramancer.node")

SAMPLE_INTERVAL_S = 0.5  # telemetry, and the heartbeat a coordinator watches
GLOO_TIMEOUT = timedelta(days=7)  # a node waits for tensors as long as its session lasts
STORE_TIMEOUT = timedelta(seconds=20)
MAX_PENDING = 16  # handshakes in progress at once
HANDSHAKE_GRACE_S = 0.5  # a handshake this young is never pushed out by a newer connection
SESSION_DESCRIPTORS = 32  # what one session needs (control socket, store, gloo pairs, event loops): ~22 measured
ACCEPT_WARNING_S = 60.0  # say that accepting fails at most this often
ACCEPT_POLL_S = 0.25  # how often the accept loop looks at stop() and at handshake deadlines
ACCEPT_BACKOFF_S = (0.01, 1.0)  # after an accept error (out of descriptors…): first and longest pause
HANDOVER_S = 2.0  # how long an ending session may take to let go (under a coordinator's 5 s read timeout)


def node_devices(spec_text: str) -> list[Device]:
    """This machine's devices for a node: `auto` means every accelerator, else the CPU."""
    spec = parse_device_spec(spec_text)
    if spec.remotes or spec.discover:
        raise VramancerError("a node serves its own devices only; remove node:… and discover from its --devices.")
    if spec.auto:
        devices = resolve_devices(spec, simulated_size=None) if _has_accelerator() else resolve_devices(parse_device_spec("cpu"))
        return devices
    return resolve_devices(spec)


def _has_accelerator() -> bool:
    return torch.cuda.is_available() or bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def architecture(config) -> dict:
    """The facts two copies of a model must share to exchange hidden states and KV caches."""
    keys = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "rope_theta")
    return {k: getattr(config, k, None) for k in keys}


class NodeModel:
    """The model as this node holds it, run by the same runtime as a local split.

    The module tree is built from the config with no weights; the layers this node is given
    are read from its own copy of the file (and the small modules before the stack that make
    each layer's positions, masks and rotary tables; never the token table or the head), and
    placed on its devices. A runtime SplitModel (runtime/split_model.py) carries the hidden
    state and the decoder's tensors between those devices; the model's own decoder makes
    those tensors, through the model seam (model/architecture.py), so any architecture the
    local split runs runs here."""

    def __init__(self, name: str, dtype: torch.dtype, context: int, devices: dict[str, Device]):
        from vramancer.model.description import describe_model
        from vramancer.model.loading import PartReader
        from vramancer.model.source import load_config, resolve_model
        from vramancer.planning.placement import Placement
        from vramancer.runtime.split_model import SplitModel
        from vramancer.runtime.transfer import TransferManager

        self.name, self.dtype, self.context = name, dtype, context
        self.devices = devices
        source = resolve_model(name)
        self.config = load_config(source)
        self.reader = PartReader(source, dtype)
        self.model = self.reader.model
        self.description = describe_model(self.model, dtype)  # the one description of this copy
        self.profile = self.description.profile
        arch = self.description.architecture
        # The decoder runs its own modules before the stack (positions, rotary tables); the
        # hidden state that arrives takes the place of what they give the first layer run here.
        self.reader.read([m for m in arch.before if m is not arch.input_embeddings], arch.holders)
        self.host = _host_device(devices)
        everything = [self.host] + [d for d in devices.values() if d is not self.host]
        self.split = SplitModel(self.model, self.description, everything, TransferManager(everything), context)
        host = self.host.name
        self.split.placement = Placement([host] * self.profile.num_layers, host, host)
        self.stand_ins(self.description.layer_returns_tuple)
        # Decoders with position tables or rotary tables take positions; those with none
        # (Bloom's ALiBi, MPT, Mamba) count them from the cache.
        self._takes_positions = "position_ids" in inspect.signature(arch.base.forward).parameters
        self.assigned: dict[int, str] = {}
        self.cache = None

    def stand_ins(self, returns_tuple: bool) -> None:
        """Stand-ins for the layers not run here, returning what the real ones return (the
        coordinator says which: its description found out on a copy on the meta device)."""
        self._skips = [PassThrough(returns_tuple) for _ in range(self.profile.num_layers)]
        self._installed = None

    # --- layers --------------------------------------------------------------------------

    def assign(self, layers: dict[int, str]) -> None:
        """Hold `layers` on the named devices (moving any already held); all or nothing."""
        for index, device in layers.items():
            if not 0 <= index < self.profile.num_layers:
                raise VramancerError(f"layer {index} is not in {self.name}; it has layers 0-{self.profile.num_layers - 1}.")
            if device not in self.devices:
                raise VramancerError(f"{device} is not a device of this node ({', '.join(self.devices)}).")
        before = dict(self.assigned)
        self.assigned.update(layers)
        try:
            self._claim()
        except DeviceFullError:
            self.assigned = before
            self._claim()
            raise
        for index, device in layers.items():
            self._place(index, before.get(index), device)

    def release(self, layers: list[int]) -> None:
        for index in layers:
            device = self.assigned.pop(index, None)
            if device is not None:
                self._place(index, device, None)
                if self.cache is not None:
                    with torch.inference_mode():  # some kinds of cache zero their tensors in place
                        self.cache.layers[index].reset()
        self._claim()

    def release_all(self) -> None:
        self.release(list(self.assigned))
        self.cache = None

    def _place(self, index: int, src: str | None, dst: str | None) -> None:
        """Weights (and KV cache) of one layer onto `dst`: read from the file when it was not
        held; back to the file (or host memory) when `dst` is None."""
        from vramancer.runtime.split_model import move_module

        split, layer = self.split, self.split.layer_modules[index]
        self._installed = None  # the stack changes: hooks are laid again before the next run
        if src is None:
            if self.cache is not None:
                fresh_entry(self.cache, self.model.config, index)  # it was a shadow here
            self.reader.read([layer])
            move_module(layer, self.devices[dst].torch_device)
            split.placement = split.placement.moved([index], dst)
        elif dst is None:
            split.placement = split.placement.moved([index], self.host.name)
            if self.reader.streams:
                self.reader.forget([layer])
            else:
                move_module(layer, self.host.torch_device)
        elif src != dst:
            split.move(index, dst, self.cache)  # weights and every tensor of its cache

    def _claim(self) -> None:
        from vramancer.planning.placement import device_need

        for name, device in self.devices.items():
            parts = [i for i, d in sorted(self.assigned.items()) if d == name]
            need = device_need(self.profile, parts, device.reserve, self.context)
            device.ledger.set_many({"weights": need.weights, "kv": need.kv, "workspace": need.workspace + need.reserve})

    def kv_bytes(self) -> dict[str, int]:
        from vramancer.model.architecture import cache_bytes

        totals: dict[str, int] = {}
        cache = self.cache
        for index, device in list(self.assigned.items()):
            if cache is None:
                break
            totals[device] = totals.get(device, 0) + cache_bytes(cache.layers[index])
        return totals

    # --- compute -------------------------------------------------------------------------

    def _cache_for(self, first: int, last: int, past: int):
        """The KV cache with layers first..last holding exactly `past` tokens, and every layer
        this node does not hold a stand-in of `past` tokens: the decoder sizes its masks from
        whichever layer it likes (as on the coordinator, cluster/remote.py)."""
        from transformers import DynamicCache

        from vramancer.cluster.remote import set_shadow

        if self.cache is None:
            self.cache = DynamicCache(config=self.model.config)
        have = self.cache.layers[first].get_seq_length()
        if past == 0 or have > past:
            for index in range(first, last + 1):
                entry = self.cache.layers[index]
                if past == 0:
                    entry.reset()
                else:
                    entry.crop(past - entry.get_seq_length())
        elif have < past:
            raise VramancerError(f"layer {first} holds {have} cached tokens but the coordinator expects {past}.")
        for index in range(self.profile.num_layers):
            if index not in self.assigned:
                set_shadow(self.cache, index, past)
        return self.cache

    def _install(self, first: int, last: int) -> None:
        """The stack for a run of first..last: those layers, stand-ins everywhere else (a
        layer held here for another run must not see this one), and the runtime's hooks."""
        if self._installed == (first, last):
            return
        stack, modules = self.split.stack, self.split.layer_modules
        for index in range(len(stack)):
            stack[index] = modules[index] if first <= index <= last else self._skips[index]
        self.split.rewire()
        self._installed = (first, last)

    def run(self, hidden: torch.Tensor, positions: torch.Tensor, first: int, last: int, past: int, use_cache: bool) -> torch.Tensor:
        """Layers first..last on `hidden` (the state after layer first-1): the model's own
        decoder runs over the stack, its modules before the stack making positions, masks and
        rotary tables; the hidden state that arrived takes the place of theirs at layer
        `first`, and the pass ends after layer `last`."""
        for index in range(first, last + 1):
            if index not in self.assigned:
                raise VramancerError(f"layer {index} is not held by this node.")
        cache = self._cache_for(first, last, past) if use_cache else None
        self._install(first, last)
        modules = self.split.layer_modules
        entry_device = self.devices[self.assigned[first]].torch_device

        def enter(module, args, kwargs):
            if args:
                return (hidden.to(entry_device), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden.to(entry_device)}

        def leave(module, args, output):
            raise _RunDone(output[0] if isinstance(output, tuple) else output)

        handles = [modules[first].register_forward_pre_hook(enter, with_kwargs=True, prepend=True),
                   modules[last].register_forward_hook(leave)]
        placeholder = torch.zeros_like(hidden)  # what the stack's first module would have got
        try:
            positional = {"position_ids": positions} if self._takes_positions else {}
            self.description.architecture.base(inputs_embeds=placeholder, cache=cache, use_cache=use_cache, **positional)
        except _RunDone as done:
            return done.output.to("cpu")
        finally:
            for handle in handles:
                handle.remove()
        raise VramancerError(f"layers {first}-{last} did not run.")

    def layer_kv(self, first: int, last: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Keys and values of first..last on the host; None when none of them holds a cache."""
        cache = self.cache
        if cache is None or not all(cache.layers[i].is_initialized and cache.layers[i].get_seq_length()
                                    for i in range(first, last + 1)):
            return None
        return [(cache.layers[i].keys.to("cpu"), cache.layers[i].values.to("cpu")) for i in range(first, last + 1)]

    def set_layer_kv(self, first: int, pairs: list[tuple[torch.Tensor, torch.Tensor]] | None, last: int,
                     seen: int = 0) -> None:
        """Layers first..last get these keys and values, having seen `seen` tokens (a sliding
        window keeps fewer than it saw)."""
        from transformers import DynamicCache

        if self.cache is None:
            self.cache = DynamicCache(config=self.model.config)
        for offset, index in enumerate(range(first, last + 1)):
            entry = fresh_entry(self.cache, self.model.config, index)
            if pairs is None:
                continue
            target = self.devices[self.assigned[index]].torch_device if index in self.assigned else torch.device("cpu")
            keys, values = (t.to(target) for t in pairs[offset])
            entry.lazy_initialization(keys, values)
            entry.keys, entry.values = keys, values
            if hasattr(entry, "cumulative_length"):
                entry.cumulative_length = max(seen, keys.shape[2])


class _RunDone(Exception):
    """Raised by the last layer of a run to end the decoder's pass there, with its output."""

    def __init__(self, output: torch.Tensor):
        super().__init__("run done")
        self.output = output


def _host_device(devices: dict[str, Device]) -> Device:
    """Where the modules before the stack run: the node's own CPU device if it serves one,
    else a CPU device of its own (claiming nothing: those modules are small)."""
    for device in devices.values():
        if device.torch_device.type == "cpu" and not device.simulated:
            return device
    return resolve_devices(parse_device_spec("cpu"))[0]


class Session:
    """One admitted coordinator: its control channel, its process group, its threads."""

    def __init__(self, server: "NodeServer", channel: p.LineChannel, peer: str, local_address: str,
                 peer_address: str):
        self.server = server
        self.channel = channel
        self.peer = peer
        self.peer_address = peer_address  # the admitted coordinator's: the only one the session's listeners take
        self.local_address = local_address
        self.lock = threading.Lock()  # one operation on the model at a time
        self.closed = threading.Event()
        self.pg = None
        self._store = None
        self._store_socket: socket.socket | None = None
        self._store_fd: int | None = None  # the store's own descriptor of that socket
        self.ending = threading.Event()  # said goodbye or hung up: a new coordinator may wait for us
        self.lease_expired = False

    # --- process group -------------------------------------------------------------------

    def open_store_socket(self) -> int:
        """A listening socket for the rendezvous, on the address the coordinator reached us by."""
        sock = socket.socket(socket.AF_INET6 if ":" in self.local_address else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.local_address, 0))
            listeners.only_from(sock.fileno(), self.peer_address)  # before it listens: nobody else gets in
            sock.listen(4)
        except BaseException:
            sock.close()
            raise
        self._store_socket = sock
        return sock.getsockname()[1]

    def form_group(self) -> None:
        import torch.distributed as dist
        from torch.distributed import ProcessGroupGloo

        assert self._store_socket is not None
        port = self._store_socket.getsockname()[1]
        # The store takes a descriptor of the listening socket over (and closes it when it
        # goes); we keep the number, so that the listener can be closed once the group formed.
        fd = os.dup(self._store_socket.fileno())
        try:
            self._store = dist.TCPStore(self.local_address, port, 2, True, STORE_TIMEOUT, master_listen_fd=fd)
        except BaseException:
            os.close(fd)
            raise
        self._store_fd = fd
        gloo_listeners: set[int] = set()
        try:
            options = ProcessGroupGloo._Options()
            # Gloo's device listens for the group's pairs: for our peer only, and only until they met.
            device, gloo_listeners = listeners.opened_by(lambda: ProcessGroupGloo.create_device(hostname=self.local_address))
            options._devices = [device]
            for descriptor in gloo_listeners:
                listeners.only_from(descriptor, self.peer_address)
            options._timeout = GLOO_TIMEOUT
            self.pg = ProcessGroupGloo(self._store, p.NODE_RANK, 2, options)
        finally:
            for descriptor in gloo_listeners:
                listeners.close_underneath(descriptor)
            self.close_store_listener()

    def close_store_listener(self) -> None:
        """Close the rendezvous store's listening socket once both ranks have met, so that
        nobody else (nobody without the token) can reach the store; it keeps the connections
        it already has, which is all the process group needs.

        The store's event loop owns a descriptor of that socket and offers no way to close it.
        Pointing that descriptor at /dev/null closes the socket underneath it (the kernel then
        drops it from the loop's watch list) while the number stays valid for the store to
        close when it goes. (Shutting the socket down instead leaves it in the loop, which then
        spins on accept errors.)"""
        fd, self._store_fd = self._store_fd, None
        if fd is not None:
            listeners.close_underneath(fd)
        sock, self._store_socket = self._store_socket, None
        if sock is not None:
            sock.close()

    # --- the three loops -----------------------------------------------------------------

    def serve(self) -> None:
        """Run until the coordinator says bye, disconnects, or the process group breaks."""
        data = threading.Thread(target=self._data_loop, name="vramancer-node-data", daemon=True)
        sampler = threading.Thread(target=self._sample_loop, name="vramancer-node-samples", daemon=True)
        data.start()
        sampler.start()
        try:
            self._control_loop()
        finally:
            self.ending.set()
            self.closed.set()
            self.channel.close()
            if self.lease_expired:
                # Its process group would wait for tensors for ever: hang up on it, and the
                # tensor thread ends (and lets go of the lock) as if the coordinator had died.
                listeners.hang_up_on(self.peer_address, self.server.port)
                data.join(HANDOVER_S)
            # The tensor thread holds the lock while it waits inside an operation; a
            # coordinator out of step (or gone) may never send what it waits for. Wait for it a
            # bounded time, then let go of the layers anyway: it checks `closed` before it
            # touches the model again.
            held = self.lock.acquire(timeout=HANDOVER_S)
            try:
                if not held:
                    log.warning("the tensor channel from %s is stuck; releasing its layers anyway", self.peer)
                if self.server.model is not None:
                    self.server.model.release_all()
            finally:
                if held:
                    self.lock.release()
            self.pg = None
            self._store = None
            self.close_store_listener()
            log.info("session with %s ended", self.peer)

    def _control_loop(self) -> None:
        while not self.closed.is_set():
            try:
                message = self.channel.receive()
            except TimeoutError:
                log.warning("coordinator %s said nothing for %g s, past its lease; letting it go and freeing "
                            "what it held", self.peer, self.server.lease_s)
                self.lease_expired = True
                return
            except (OSError, p.ClusterError) as exc:
                log.warning("control channel from %s failed: %s", self.peer, exc)
                return
            if message is None:
                return
            if message.get("type") == "ping":
                continue
            request_id, op = message.get("id"), message.get("op")
            try:
                reply = self._handle(op, message)
                ok = {"id": request_id, "ok": True, **reply}
            except VramancerError as exc:
                ok = {"id": request_id, "ok": False, "error": str(exc)}
            except Exception as exc:  # a bug: say so, keep serving
                log.exception("%s failed", op)
                ok = {"id": request_id, "ok": False, "error": f"{op} failed on the node: {type(exc).__name__}: {exc}"}
            ok["devices"] = self.server.snapshots()
            leaving = op in ("bye", "shutdown") and ok["ok"]
            if leaving:
                # Ending before the reply goes out: the coordinator may reconnect the moment it
                # reads it, and its handshake must find this session letting go, not busy.
                self.ending.set()
            try:
                self.channel.send(ok)
            except OSError:
                return
            if leaving:
                if op == "shutdown":
                    self.server.stop()
                return

    def _handle(self, op: str, message: dict) -> dict:
        server = self.server
        if op == "load":
            with self.lock:
                return server.load(str(message.get("model", "")), str(message.get("dtype", "float32")),
                                   int(message.get("context", 0)), message.get("architecture") or {},
                                   message.get("layer_returns_tuple") is True)
        if op in ("assign", "release", "reset_cache", "crop_cache"):
            model = server.model
            if model is None:
                raise VramancerError("no model is loaded on this node yet.")
            with self.lock:
                if op == "assign":
                    layers = {int(k): str(v) for k, v in dict(message.get("layers", {})).items()}
                    model.assign(layers)
                    log.info("holding layers %s", _layer_list(model.assigned))
                elif op == "release":
                    model.release([int(i) for i in message.get("layers", [])])
                elif op == "reset_cache":
                    model.cache = None
                else:
                    length = int(message.get("length", 0))
                    if model.cache is not None:
                        with torch.inference_mode():  # the cache's tensors were made in it
                            for index in model.assigned:
                                entry = model.cache.layers[index]
                                entry.crop(min(length - entry.get_seq_length(), 0))
            return {"layers": {str(k): v for k, v in model.assigned.items()}}
        if op == "profile":
            return server.profile(str(message.get("model", "")), str(message.get("dtype", "float32")),
                                  str(message.get("model_key", "")))
        if op == "state":
            model = server.model
            return {"model": model.name if model else None,
                    "layers": {str(k): v for k, v in model.assigned.items()} if model else {}}
        if op in ("bye", "shutdown"):
            return {}
        raise VramancerError(f"'{op}' is not something a node does.")

    def _data_loop(self) -> None:
        pg = self.pg
        head = torch.empty(p.HEADER_LEN, dtype=torch.int64)
        try:
            while not self.closed.is_set():
                pg.recv([head], p.COORDINATOR_RANK, p.TAG).wait()
                op = int(head[0])
                if op == p.OP_BYE or self.closed.is_set():
                    return
                with self.lock:
                    self._data_op(op, head.tolist())
        except Exception as exc:
            if not self.closed.is_set():
                log.warning("tensor channel from %s ended: %s", self.peer, str(exc).splitlines()[0] if str(exc) else exc)
                try:
                    self.channel.send({"type": "fatal", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"})
                except OSError:
                    pass
                self.channel.close()  # the coordinator's reader sees the end at once

    def _data_op(self, op: int, h: list[int]) -> None:
        pg, model = self.pg, self.server.model
        src = p.COORDINATOR_RANK
        if op == p.OP_ECHO:
            buffer = torch.empty(h[1], dtype=torch.float32)
            pg.recv([buffer], src, p.TAG).wait()
            pg.send([buffer], src, p.TAG).wait()
            return
        if model is None:
            raise VramancerError("tensors arrived before any model was loaded")
        if op == p.OP_RUN:
            tokens, first, last, past, use_cache, explicit, start = h[1:8]
            hidden = torch.empty(1, tokens, model.description.architecture.hidden_size, dtype=model.dtype)
            pg.recv([hidden], src, p.TAG).wait()
            if explicit:
                positions = torch.empty(1, tokens, dtype=torch.int64)
                pg.recv([positions], src, p.TAG).wait()
            else:
                positions = torch.arange(start, start + tokens, dtype=torch.int64)[None]
            if self.closed.is_set():  # the session ended while we waited: the layers are not ours
                return
            began = time.perf_counter()
            with torch.inference_mode():
                out = model.run(hidden, positions, first, last, past, bool(use_cache)).contiguous()
            stats = torch.tensor([time.perf_counter() - began, 0.0], dtype=torch.float64)
            pg.send([out], src, p.TAG).wait()
            pg.send([stats], src, p.TAG).wait()
        elif op == p.OP_KV_PULL:
            first, last = h[1], h[2]
            pairs = model.layer_kv(first, last)
            if pairs is None:
                pg.send([p.header(0, 0)], src, p.TAG).wait()
                return
            keys = pairs[0][0]
            pg.send([p.header(0, keys.shape[2], keys.shape[1], keys.shape[3], p.dtype_code(keys.dtype))], src, p.TAG).wait()
            for k, v in pairs:
                pg.send([k.contiguous()], src, p.TAG).wait()
                pg.send([v.contiguous()], src, p.TAG).wait()
        elif op == p.OP_KV_PUSH:
            first, last, tokens, heads, head_dim, code, seen = h[1:8]
            pairs = None
            if tokens:
                pairs = []
                for _ in range(first, last + 1):
                    k = torch.empty(1, heads, tokens, head_dim, dtype=p.DTYPES[code])
                    v = torch.empty_like(k)
                    pg.recv([k], src, p.TAG).wait()
                    pg.recv([v], src, p.TAG).wait()
                    pairs.append((k, v))
            if self.closed.is_set():
                return
            model.set_layer_kv(first, pairs, last, seen)
            pg.send([p.header(0)], src, p.TAG).wait()
        else:
            raise VramancerError(f"unknown tensor operation {op}")

    def _sample_loop(self) -> None:
        while not self.closed.wait(SAMPLE_INTERVAL_S):
            try:
                self.channel.send({"type": "sample", "devices": self.server.snapshots()})
            except OSError:
                return


class Handshakes:
    """Connections that have not proved the token yet: at most `limit` at once, each given one
    deadline for its whole handshake.

    When a connection arrives and all places are taken, the oldest handshake gives way if it
    has had HANDSHAKE_GRACE_S already, else the newcomer is closed at once. So a peer holding
    connections open cannot keep a coordinator out (its connections are the old ones; a
    coordinator's handshake takes milliseconds), and a flood of new connections cannot push
    out a handshake in progress. Shutting a socket down wakes the thread reading it, which
    then closes it."""

    def __init__(self, limit: int = MAX_PENDING, seconds: float = p.HANDSHAKE_TIMEOUT_S):
        self.limit, self.seconds = limit, seconds
        self._deadlines: dict[socket.socket, float] = {}  # in arrival order
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._deadlines)

    def add(self, conn: socket.socket) -> bool:
        """Take `conn` in (True), or say there is no place for it (False: close it)."""
        now = time.monotonic()
        with self._lock:
            if len(self._deadlines) >= self.limit:
                oldest_since = next(iter(self._deadlines.values())) - self.seconds
                if now - oldest_since < HANDSHAKE_GRACE_S:
                    return False
                self._drop_oldest()
            self._deadlines[conn] = now + self.seconds
            return True

    def finish(self, conn: socket.socket) -> None:
        with self._lock:
            self._deadlines.pop(conn, None)

    def remaining(self, conn: socket.socket) -> float:
        with self._lock:
            deadline = self._deadlines.get(conn)
        return max(0.0, deadline - time.monotonic()) if deadline is not None else 0.0

    def expire(self) -> None:
        """Shut down every handshake past its deadline."""
        now = time.monotonic()
        with self._lock:
            late = [conn for conn, deadline in self._deadlines.items() if deadline <= now]
            for conn in late:
                del self._deadlines[conn]
                _shut(conn)

    def drop_oldest(self) -> bool:
        """Shut down the oldest handshake (to free its descriptor); False if there is none."""
        with self._lock:
            return self._drop_oldest()

    def _drop_oldest(self) -> bool:
        if not self._deadlines:
            return False
        conn = next(iter(self._deadlines))
        del self._deadlines[conn]
        _shut(conn)
        return True


def pending_limit() -> int:
    """How many handshakes may wait at once: MAX_PENDING, or fewer when the descriptors this
    process may open would not leave room for a session beside them."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        in_use = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 16
    except (ImportError, OSError):
        return MAX_PENDING
    if soft == resource.RLIM_INFINITY:
        return MAX_PENDING
    return max(1, min(MAX_PENDING, (soft - in_use - SESSION_DESCRIPTORS) // 2))


def _shut(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class NodeServer:
    """Listens for coordinators; serves one at a time; keeps the last model loaded between them."""

    def __init__(self, devices: list[Device], token: bytes, bind: str = "127.0.0.1", port: int = p.DEFAULT_NODE_PORT,
                 advertise: bool = True, lease_s: float = p.DEFAULT_LEASE_S):
        if not token:
            raise VramancerError(f"a node needs the cluster token: set {p.TOKEN_ENV} or pass --token-file.")
        self.devices = {d.name: d for d in devices}
        self.token = token
        self.bind = bind
        self.port = port
        self.advertise = advertise
        self.lease_s = lease_s
        self.model: NodeModel | None = None
        self.session: Session | None = None
        self._profiles: dict[tuple, dict] = {}
        self._listener: socket.socket | None = None
        self._advertiser = None
        self._stopping = threading.Event()
        self._sessions_lock = threading.Lock()
        self._session_ended = threading.Condition(self._sessions_lock)
        self.handshakes = Handshakes(pending_limit())
        self._accept_warned = -ACCEPT_WARNING_S

    # --- lifecycle -----------------------------------------------------------------------

    def listen(self) -> int:
        # What a session needs first (the process group's library, the devices' readings and
        # the libraries behind them) is loaded now, not during the first coordinator's
        # handshake, which it would slow past the coordinator's read timeout.
        import torch.distributed  # noqa: F401

        for device in self.devices.values():
            device.snapshot()

        family = socket.AF_INET6 if ":" in self.bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.bind, self.port))
        except OSError as exc:
            sock.close()
            raise VramancerError(f"cannot listen on {self.bind}:{self.port}: {exc.strerror or exc}.") from None
        sock.listen(128)
        sock.settimeout(ACCEPT_POLL_S)  # so stop() and handshake deadlines are noticed
        self._listener = sock
        self.port = sock.getsockname()[1]
        if self.advertise:
            from vramancer.cluster.discovery import Advertiser, NodeAdvert

            host = self.bind if self.bind not in ("0.0.0.0", "") else socket.gethostname()  # resolved by mDNS
            advert = NodeAdvert(host, self.port, tuple((d.name, format_bytes(d.read().total)) for d in self.devices.values()))
            self._advertiser = Advertiser(advert, self.bind)
            try:
                self._advertiser.start()
                log.info("advertised with zeroconf as %s", p.SERVICE_TYPE)
            except Exception as exc:  # discovery is a convenience: serving goes on without it
                log.warning("could not advertise with zeroconf (%s); coordinators can still name node:%s:%d",
                            exc, host, self.port)
                self._advertiser = None
        return self.port

    def serve_forever(self) -> None:
        """Accept until stop(). Nothing a peer does ends this loop: an accept that fails (out
        of descriptors, a connection reset before it was taken) is followed by a pause that
        grows while the failures last, after shutting the oldest handshake to free a descriptor."""
        listener = self._listener
        assert listener is not None
        pause = 0.0
        while not self._stopping.is_set():
            self.handshakes.expire()
            try:
                conn, address = listener.accept()
            except socket.timeout:
                continue
            except OSError as exc:
                if self._stopping.is_set() or self._listener is None:
                    break
                if time.monotonic() - self._accept_warned >= ACCEPT_WARNING_S:
                    self._accept_warned = time.monotonic()
                    log.warning("accepting a connection on port %d failed (%s); pausing and going on",
                                self.port, exc.strerror or exc)
                self.handshakes.drop_oldest()
                pause = min(max(pause * 2, ACCEPT_BACKOFF_S[0]), ACCEPT_BACKOFF_S[1])
                self._stopping.wait(pause)
                continue
            pause = 0.0
            if not self.handshakes.add(conn):
                conn.close()  # too many strangers at once, all of them just arrived
                continue
            try:
                threading.Thread(target=self._admit, args=(conn, address), name="vramancer-node-handshake",
                                 daemon=True).start()
            except RuntimeError:  # no thread to spare: this peer waits for none
                self.handshakes.finish(conn)
                conn.close()
        self.close()

    def stop(self) -> None:
        self._stopping.set()

    def close(self) -> None:
        if self._advertiser is not None:
            self._advertiser.close()
            self._advertiser = None
            log.info("advertisement withdrawn")
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    # --- admission -----------------------------------------------------------------------

    def _admit(self, conn: socket.socket, address) -> None:
        peer = f"{address[0]}:{address[1]}"
        # Each read waits at most what is left of the handshake's one deadline, and the accept
        # loop shuts the socket once the deadline passes, however slowly bytes trickle in.
        conn.settimeout(max(self.handshakes.remaining(conn), 0.01))
        channel = p.LineChannel(conn)
        try:
            nonce = p.new_nonce()
            channel.send({"type": "hello", "version": p.PROTOCOL_VERSION, "nonce": nonce})
            auth = channel.receive()
            if self.handshakes.remaining(conn) <= 0:
                auth = None  # too late (or pushed out by newer connections)
            if auth is None or auth.get("type") != "auth":
                log.warning("refused %s: it did not answer the challenge", peer)
                channel.close()
                return
            offered, theirs = auth.get("proof"), auth.get("nonce")
            if auth.get("version") != p.PROTOCOL_VERSION:
                self._refuse(channel, peer, f"it speaks protocol {auth.get('version')}, this node speaks {p.PROTOCOL_VERSION}")
                return
            if offered is None:
                self._refuse(channel, peer, "it offered no cluster token")
                return
            if not isinstance(theirs, str) or len(theirs) < 32 or not p.proof_matches(
                    p.coordinator_proof(self.token, nonce, theirs), offered):
                self._refuse(channel, peer, "its cluster token does not match")
                return
            self.handshakes.finish(conn)  # proved the token: no longer a pending stranger
            with self._sessions_lock:
                # A session that has said goodbye is let go of within HANDOVER_S: a coordinator
                # reconnecting right after its close() waits for it instead of being refused.
                self._session_ended.wait_for(lambda: self.session is None or not self.session.ending.is_set(),
                                             timeout=2 * HANDOVER_S)
                busy = self.session is not None
                if not busy:
                    session = Session(self, channel, peer, conn.getsockname()[0], address[0])
                    self.session = session
            if busy:
                self._refuse(channel, peer, "this node is serving another coordinator")
                return
            try:
                store_port = session.open_store_socket()
                channel.send({"type": "welcome", "proof": p.node_proof(self.token, nonce, theirs),
                              "store_port": store_port, "devices": self.describe_devices(),
                              "samples": self.snapshots(),
                              "model": self.model.name if self.model else None, "lease_s": self.lease_s})
                session.form_group()
                # The store no longer listens: say so, and the coordinator's connect() returns
                # only now, not when its own half of the group happens to form first.
                channel.send({"type": "formed"})
                conn.settimeout(self.lease_s)  # every read renews the lease; a silent coordinator is let go
                log.info("admitted coordinator %s; process group formed", peer)
                session.serve()
            finally:
                with self._sessions_lock:
                    self.session = None
                    self._session_ended.notify_all()
        except (OSError, p.ClusterError, RuntimeError) as exc:
            log.warning("session with %s failed: %s", peer, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            channel.close()
        finally:
            self.handshakes.finish(conn)

    def _refuse(self, channel: p.LineChannel, peer: str, reason: str) -> None:
        log.warning("refused coordinator %s: %s; no process group formed, nothing loaded", peer, reason)
        try:
            channel.send({"type": "refused", "reason": reason})
        except OSError:
            pass
        channel.close()

    # --- what the requests do ------------------------------------------------------------

    def describe_devices(self) -> list[dict]:
        return [{"name": d.name, "kind": d.kind, "label": d.label, "simulated": d.simulated, "cap": d.cap}
                for d in self.devices.values()]

    def snapshots(self) -> list[dict]:
        kv = self.model.kv_bytes() if self.model is not None else {}
        return [asdict(d.snapshot(kv.get(d.name, 0))) for d in self.devices.values()]

    def load(self, name: str, dtype_name: str, context: int, expected: dict, layer_returns_tuple: bool = False) -> dict:
        from vramancer.model.loading import DTYPES

        if dtype_name not in DTYPES:
            raise VramancerError(f"'{dtype_name}' is not a dtype a node loads.")
        if context < 1:
            raise VramancerError(f"a context of {context} tokens is not usable.")
        dtype = DTYPES[dtype_name]
        model = self.model
        if model is None or model.name != name or model.dtype != dtype:
            if model is not None:
                model.release_all()
                self.model = None
            started = time.perf_counter()
            model = NodeModel(name, dtype, context, self.devices)
            log.info("loaded %s (%s) in %.1f s", name, dtype_name, time.perf_counter() - started)
        model.release_all()
        model.context = context
        model.stand_ins(layer_returns_tuple)
        mine = architecture(model.config)
        differs = {k: (mine.get(k), v) for k, v in expected.items() if mine.get(k) != v}
        self.model = model
        if differs:
            shown = ", ".join(f"{k} {a} here, {b} there" for k, (a, b) in differs.items())
            raise VramancerError(f"this node's copy of {name} is a different model ({shown}).")
        return {"layers_total": model.profile.num_layers}

    def profile(self, name: str, dtype_name: str, model_key: str) -> dict:
        """Timings of this node's devices (and the links between them) for a model's layers."""
        from vramancer.model.description import describe_model
        from vramancer.model.loading import DTYPES, build_meta_model
        from vramancer.model.source import load_config, resolve_model
        from vramancer.profiling import timing as profiler
        from vramancer.runtime.transfer import TransferManager

        dtype = DTYPES.get(dtype_name, torch.float32)
        key = (name, dtype_name, model_key)
        if key not in self._profiles:
            config = load_config(resolve_model(name))
            description = describe_model(build_meta_model(config, dtype), dtype)
            folder = profiler.profile_folder()
            devices, measured = {}, {}
            for device in self.devices.values():
                cache_key = profiler.profile_key(model_key, device, dtype)
                timings = measured.get(cache_key) or profiler.read_cached(folder / f"{cache_key}.json")
                if timings is None:
                    label = "host CPU" if device.torch_device.type == "cpu" else f"{device.name} ({device.label})"
                    timings = profiler.time_device(description, device.torch_device, dtype, label)
                    profiler.write_cached(folder / f"{cache_key}.json", timings)
                measured[cache_key] = timings
                devices[device.name] = asdict(timings)
            links = {}
            transfer = TransferManager(list(self.devices.values()))
            arch = description.architecture  # what a hand-over carries: the hidden state, rotary tables if any
            for a in self.devices.values():
                for b in self.devices.values():
                    if a.name != b.name:
                        timing = profiler.time_link(transfer, a, b, arch.hidden_size, arch.head_dim, dtype)
                        links[f"{a.name}>{b.name}"] = asdict(timing)
            self._profiles[key] = {"timings": devices, "links": links}
        return self._profiles[key]


def _layer_list(assigned: dict[int, str]) -> str:
    if not assigned:
        return "none"
    by_device: dict[str, list[int]] = {}
    for index, device in sorted(assigned.items()):
        by_device.setdefault(device, []).append(index)
    return ", ".join(f"L{min(v)}–{max(v)} on {k}" if len(v) > 1 else f"L{v[0]} on {k}" for k, v in by_device.items())


def run_node(devices_text: str, bind: str, port: int, token_file: str | None, advertise: bool = True,
             ready=print, lease_s: float = p.DEFAULT_LEASE_S) -> int:
    """The `vramancer node` command: serve until interrupted."""
    token = p.cluster_token(token_file)
    if not token:
        raise VramancerError(f"a node needs the cluster token: set {p.TOKEN_ENV} or pass --token-file.")
    devices = node_devices(devices_text)
    server = NodeServer(devices, token, bind, port, advertise, lease_s)
    actual = server.listen()
    shown = ", ".join(f"{d.name} ({d.label}, {format_bytes(d.read().total)})" for d in devices)
    # `kill`, a hang-up or Ctrl-C end the node the same way: the advertisement is withdrawn.
    lifetime = Lifetime(lambda reason: server.stop()).install()
    ready(f"vramancer node: serving {shown} on {node_label(bind, actual)}")
    try:
        server.serve_forever()
    finally:
        server.close()
        lifetime.uninstall()
    log.info("stopped")
    return 0
