"""Layers that live on nodes, as the coordinator's model sees them.

In the coordinator's decoder stack, each run of consecutive layers held by one node is
replaced by a stub: the first layer of the run sends the hidden state (and positions) to the
node and returns what comes back; the others pass it through. The original layer modules stay
in host memory (`SplitModel.layer_modules`), so a layer can come home without a reload.

The coordinator's KV cache keeps, for every remote layer, a "shadow" entry: meta tensors of
shape (1, 1, tokens, 1) that hold no memory but keep the cache's lengths right, because
transformers reads the sequence length (and sizes masks) from whichever layer it likes.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch
from torch import nn
from transformers.cache_utils import Cache

from vramancer.cluster.protocol import ClusterError, NodeLost
from vramancer.planning.placement import EMBED, HEAD, Placement
from vramancer.runtime.split_model import move_module

HEADER_BYTES = 64


class RemoteStub(nn.Module):
    """Stands in for layers first..last, which run on `node`."""

    def __init__(self, blocks: "RemoteBlocks", node, first: int, last: int,
                 send_link: tuple[str, str], return_link: tuple[str, str]):
        super().__init__()
        self._blocks = [blocks]  # a list, so nn.Module does not adopt it
        self.node, self.first, self.last = node, first, last
        self.send_link, self.return_link = send_link, return_link

    def forward(self, hidden_states, *args, **kwargs):
        # Decoders hand their layers the cache under their own names (`cache`, `layer_past`):
        # it is found by its type, and the hidden state goes back in the layer's own form.
        cache = next((v for v in (*args, *kwargs.values()) if isinstance(v, Cache)), None)
        use_cache = kwargs.get("use_cache", cache is not None)
        out = self._blocks[0].run_block(self, hidden_states, kwargs.get("position_ids"), cache, use_cache)
        return (out,) if self._blocks[0].layer_returns_tuple else out

    def extra_repr(self) -> str:
        return f"layers {self.first}-{self.last} on {self.node.label}"


class PassThrough(nn.Module):
    """A layer whose work is done elsewhere (by its block's stub, or on another machine): it
    hands the hidden state on, as a tuple where the real layers return one."""

    def __init__(self, returns_tuple: bool = False):
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.returns_tuple else hidden_states


def is_shadow(entry) -> bool:
    keys = getattr(entry, "keys", None)
    return bool(getattr(entry, "is_initialized", False)) and keys is not None and keys.is_meta


def grow_shadow(cache, index: int, tokens: int) -> None:
    ghost = torch.empty(1, 1, tokens, 1, device="meta")
    cache.layers[index].update(ghost, ghost)


def set_shadow(cache, index: int, tokens: int) -> None:
    entry = cache.layers[index]
    entry.reset()
    if tokens:
        grow_shadow(cache, index, tokens)


def fresh_entry(cache, config, index: int):
    """A new, empty cache entry for layer `index`, of the kind the model gives it. A shadow
    cannot simply be reset into a real entry: its kind may have moved some of its own tensors
    to the meta device on first use (sliding layers' window size)."""
    from transformers import DynamicCache

    entry = DynamicCache(config=config).layers[index]
    cache.layers[index] = entry
    return entry


def model_reference(source) -> str:
    """How a node finds the model on its own disk: `default`, a hub id, or an absolute path."""
    if source.name in ("", "default") or source.is_hub_id:
        return source.name or "default"
    if source.gguf_file:
        return str(Path(source.location) / source.gguf_file)
    return source.location


class RemoteBlocks:
    """The remote half of a SplitModel (its ExternalLayers): which node holds what, and how
    tensors get there."""

    def __init__(self, split, model_name: str, dtype: torch.dtype, architecture: dict):
        self.split = split
        self.model_name = model_name
        self.dtype_name = str(dtype).removeprefix("torch.")
        self.architecture = architecture
        self.layer_returns_tuple = split.description.layer_returns_tuple
        self._loaded: set[int] = set()  # id() of nodes that loaded the model for us

    # --- facts -------------------------------------------------------------------------

    def device(self, name: str):
        return self.split.devices[name]

    def is_remote(self, name: str) -> bool:
        return not self.split.is_local(name)

    def node_of(self, name: str):
        return self.device(name).node

    def nodes(self) -> list:
        seen, nodes = set(), []
        for device in self.split.devices.values():
            node = getattr(device, "node", None)
            if node is not None and id(node) not in seen:
                seen.add(id(node))
                nodes.append(node)
        return nodes

    # --- placing -----------------------------------------------------------------------

    def ensure_loaded(self, nodes: list) -> None:
        """Every node in `nodes` loads the model from its own disk, all at once."""
        todo = [n for n in nodes if id(n) not in self._loaded]
        errors: list[BaseException] = []

        def load(node) -> None:
            from vramancer.cluster.client import LOAD_TIMEOUT_S

            try:
                node.request("load", timeout=LOAD_TIMEOUT_S, model=self.model_name, dtype=self.dtype_name,
                             context=self.split.context, architecture=self.architecture,
                             layer_returns_tuple=self.layer_returns_tuple)
                self._loaded.add(id(node))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=load, args=(n,), daemon=True) for n in todo]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def place(self, placement: Placement) -> None:
        """First placement: the nodes load the model and take their layers."""
        by_node: dict[int, tuple[object, dict[int, str]]] = {}
        for index, name in enumerate(placement.layer_devices):
            if self.is_remote(name):
                node = self.node_of(name)
                by_node.setdefault(id(node), (node, {}))[1][index] = self.device(name).remote_name
        self.ensure_loaded([node for node, _ in by_node.values()])
        for node, layers in by_node.values():
            node.request("assign", layers={str(k): v for k, v in layers.items()})

    def install(self, placement: Placement) -> None:
        """Put stubs where layers are remote and the real layers everywhere else."""
        stack, modules = self.split.stack, self.split.layer_modules
        devices = placement.layer_devices
        count = len(devices)
        index = 0
        while index < count:
            name = devices[index]
            if not self.is_remote(name):
                stack[index] = modules[index]
                index += 1
                continue
            node = self.node_of(name)
            last = index
            while last + 1 < count and self.is_remote(devices[last + 1]) and self.node_of(devices[last + 1]) is node:
                last += 1
            before = placement.device_of(index - 1) if index > 0 else placement.embed
            after = placement.device_of(last + 1) if last + 1 < count else placement.head
            stack[index] = RemoteStub(self, node, index, last, (before, name), (devices[last], after))
            for follower in range(index + 1, last + 1):
                stack[follower] = PassThrough(self.layer_returns_tuple)
            index = last + 1

    # --- the data path -----------------------------------------------------------------

    def run_block(self, stub: RemoteStub, hidden: torch.Tensor, position_ids, cache, use_cache: bool) -> torch.Tensor:
        tokens = hidden.shape[1]
        caching = bool(use_cache) and cache is not None
        past = cache.layers[stub.first].get_seq_length() if caching else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + tokens)[None]
        x = hidden.detach().to("cpu").contiguous()
        out, compute_s, round_trip = stub.node.run(x, position_ids.to("cpu"), stub.first, stub.last, past, caching)
        # One-way times are not observable; the round trip less the node's compute is split evenly.
        transit = max(round_trip - compute_s, 0.0) / 2
        nbytes = x.numel() * x.element_size()
        transfer = self.split.transfer
        transfer.record(*stub.send_link, nbytes + HEADER_BYTES, transit)
        transfer.record(*stub.return_link, out.numel() * out.element_size(), transit)
        if caching:
            for index in range(stub.first, stub.last + 1):
                grow_shadow(cache, index, tokens)
        return out

    # --- moving layers -------------------------------------------------------------------

    def move(self, index: int, src: str, dst: str, cache) -> int:
        """Move layer `index` (weights and KV cache) between a local and a remote device, or
        between two remote ones. Returns the bytes placed (weights) and carried (KV cache)."""
        split = self.split
        entry = cache.layers[index] if cache is not None and index < len(getattr(cache, "layers", [])) else None
        tokens = entry.get_seq_length() if entry is not None and getattr(entry, "is_initialized", False) else 0
        src_remote, dst_remote = self.is_remote(src), self.is_remote(dst)
        same_node = src_remote and dst_remote and self.node_of(src) is self.node_of(dst)
        kv = None
        kv_bytes = 0
        began = time.perf_counter()
        if tokens and not same_node:
            if src_remote:
                kv = self.node_of(src).pull_kv(index, index)
            else:
                kv = [(entry.keys.to("cpu"), entry.values.to("cpu"))]
            if kv is not None:
                kv_bytes = sum(t.numel() * t.element_size() for pair in kv for t in pair)
        if dst_remote:
            node = self.node_of(dst)
            self.ensure_loaded([node])
            node.request("assign", layers={str(index): self.device(dst).remote_name})
            if not same_node:
                node.push_kv(index, index, kv, tokens)
            if entry is not None and tokens:
                set_shadow(cache, index, tokens)
            if not src_remote:
                move_module(split.layer_modules[index], torch.device("cpu"))  # the host copy waits for a return
        else:
            target = split.devices[dst].torch_device
            move_module(split.layer_modules[index], target)
            if entry is not None:
                entry = fresh_entry(cache, split.model.config, index)  # it was a shadow here
                if kv is not None:
                    keys, values = kv[0][0].to(target), kv[0][1].to(target)
                    entry.lazy_initialization(keys, values)
                    entry.keys, entry.values = keys, values
                    if hasattr(entry, "cumulative_length"):  # a sliding window keeps fewer than it saw
                        entry.cumulative_length = tokens
        if src_remote and not same_node:
            self.node_of(src).request("release", layers=[index])
        if kv_bytes:
            split.transfer.record(src, dst, kv_bytes, time.perf_counter() - began)
        return split.profile.layer_bytes[index] + kv_bytes

    def adopt(self, placement: Placement, layers: list[int]) -> None:
        """Give `layers`, whose device was lost, their places in `placement` (KV cache is rebuilt
        by the caller). Weights come from the host copies, or from the new node's own disk."""
        split = self.split
        by_node: dict[int, tuple[object, dict[int, str]]] = {}
        for index in layers:
            name = placement.layer_devices[index]
            if self.is_remote(name):
                node = self.node_of(name)
                by_node.setdefault(id(node), (node, {}))[1][index] = self.device(name).remote_name
            else:
                move_module(split.layer_modules[index], split.devices[name].torch_device)
        self.ensure_loaded([node for node, _ in by_node.values()])
        for node, assigned in by_node.values():
            node.request("assign", layers={str(k): v for k, v in assigned.items()})

    def close(self) -> None:
        for node in self.nodes():
            node.close()


__all__ = ["RemoteBlocks", "RemoteStub", "PassThrough", "is_shadow", "ClusterError", "NodeLost", "EMBED", "HEAD"]
