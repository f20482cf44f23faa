"""Decode steps replayed from CUDA graphs: one graph per decoder layer on a CUDA device.

A decode step of a model of this size on a GPU is bound by launches, not by the GPU: each
layer is a few dozen small kernels, each queued from Python (0.6 ms a layer measured on an
H200, for microseconds of work). A CUDA graph records a layer's kernels once and launches
them all again with one call.

Why one graph per layer: a graph belongs to one device, and a split's layers sit on several.
The runtime's hooks still hand the hidden state over between devices and carry the decoder's
positions and masks, and a layer on the CPU runs as it always does. Only the layer's own
computation is replayed.

What a replay needs is the same shapes at the same addresses every step. transformers'
StaticCache gives the cache that: each layer's keys and values are allocated once for the
whole context, written in place at a position the cache keeps in a device tensor (which the
graph advances too). Everything else the layer is handed (the hidden state, positions, mask)
is copied into buffers the graph reads; a tensor the decoder hands every layer of a device is
copied once per step. A layer is replayed only for a one-token step on a plain StaticLayer;
prompts, sliding windows and batches run eagerly.

The engine keeps that cache between answers, emptied in place, so the next answer replays
what the first one recorded. A graph is dropped when what it read may have moved (`drop`, at
every rewire of the split, which lets the cache go too), or when its layer is handed other
things (another cache, other shapes); it is recorded again at the next step. A layer whose recording fails (an operation that waits on the host, say)
or that keeps needing new recordings runs eagerly from then on.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils import _pytree as pytree

# A layer whose graphs this many times in a row were replaced after a single replay (handed
# something new every step) is not worth recording again.
MAX_SHORT_LIVED = 3


class CudaGraphRecorder:
    """Records a callable as a CUDA graph on one device and replays it. One memory pool per
    device, shared by that device's layers: replayed in the order they were recorded, never
    at once, their scratch memory may overlap."""

    def __init__(self):
        self._pools: dict[torch.device, object] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    @staticmethod
    def accepts(device: torch.device) -> bool:
        return device.type == "cuda"

    def record(self, device: torch.device, run):
        """Warm `run` up on the device's recording stream (its real work is undone by `run`),
        then record it on that same stream, whose cuBLAS workspace the warm-up made; returns
        (replay, outputs): calling replay() recomputes outputs in place."""
        with torch.cuda.device(device):
            if device not in self._streams:
                self._streams[device] = torch.cuda.Stream()
                self._pools[device] = torch.cuda.graph_pool_handle()
            side = self._streams[device]
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                run(warm_up=True)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the telemetry thread may ask the driver for memory meanwhile.
            with torch.cuda.graph(graph, pool=self._pools[device], stream=side, capture_error_mode="thread_local"):
                outputs = run(warm_up=False)

        def replay() -> None:
            with torch.cuda.device(device):
                graph.replay()

        return replay, outputs


@dataclass
class _Buffer:
    """A tensor a graph reads, and the tensor last copied into it (held, so that `is` can
    tell a new one from the same)."""

    tensor: torch.Tensor
    source: torch.Tensor | None = None

    def fill(self, value: torch.Tensor) -> None:
        if value is not self.source:
            self.tensor.copy_(value)
            self.source = value


@dataclass
class _Graph:
    spec: object  # the structure of (args, kwargs)
    constants: list  # the leaves that are not tensors, as recorded (the cache object among them)
    buffers: list[_Buffer]  # one per tensor leaf, in order
    cache_tensor: torch.Tensor  # the layer's cache keys when recorded: replaced means moved
    replay: object
    outputs: object
    replays: int = 0


@dataclass
class _LayerState:
    index: int
    inner: object  # the forward the layer had before (the class's, or our CPU kernels')
    graph: _Graph | None = None
    short_lived: int = 0  # graphs in a row replaced after at most one replay
    refused: str = ""  # why this layer runs eagerly for good, if it does


@dataclass
class LayerGraphs:
    """The graphs of a split's decoder layers. `install` wraps a layer's forward; `remove`
    unwraps it; `drop` forgets every recording (the runtime calls it when the split changes)."""

    recorder: object = field(default_factory=CudaGraphRecorder)
    # The StaticCache the recordings write into, kept between answers by the engine (emptied
    # in place) so that an answer replays what an earlier one recorded.
    cache: object = None
    recordings: int = 0  # layers recorded since these graphs were made
    _buffers: dict = field(default_factory=dict)  # (device, slot, shape, dtype) → _Buffer
    _states: dict = field(default_factory=dict)  # id(layer) → _LayerState

    def install(self, layer: nn.Module, index: int) -> None:
        if _is_ours(layer):
            return
        inner = vars(layer).get("forward")
        state = _LayerState(index, inner)
        self._states[id(layer)] = state
        layer.vramancer_graphs = self
        layer.forward = types.MethodType(_forward, layer)

    def remove(self, layer: nn.Module) -> None:
        """Give `layer` back the forward it had, whichever graphs wrapped it."""
        if not _is_ours(layer):
            return
        state = layer.vramancer_graphs._states.pop(id(layer))
        del layer.forward
        del layer.vramancer_graphs
        if state.inner is not None:
            layer.forward = state.inner

    def drop(self) -> None:
        """Forget every recording, buffer and the kept cache (a layer's weights or cache may
        have moved, or another cache takes the memory)."""
        for state in self._states.values():
            state.graph = None
            state.short_lived = 0
        self._buffers.clear()
        self.cache = None

    def installed(self) -> bool:
        """Whether any layer is wrapped (some layer sits on a device the recorder takes)."""
        return bool(self._states)

    def refusals(self) -> dict[int, str]:
        """Layer index → why it runs eagerly for good."""
        return {s.index: s.refused for s in self._states.values() if s.refused}

    def replayed_layers(self) -> list[int]:
        """The layers whose current graph has replayed at least once."""
        return sorted(s.index for s in self._states.values() if s.graph is not None and s.graph.replays)

    # --- one call --------------------------------------------------------------------

    def call(self, layer: nn.Module, args: tuple, kwargs: dict):
        state = self._states[id(layer)]
        eager = state.inner if state.inner is not None else types.MethodType(type(layer).forward, layer)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        entry = self._static_entry(layer, state, leaves)
        if entry is None:
            return eager(*args, **kwargs)
        graph = state.graph
        if graph is None or not _same_call(graph, spec, leaves) or graph.cache_tensor is not entry.keys:
            graph = self._record(state, eager, entry, leaves, spec)
            if graph is None:
                return eager(*args, **kwargs)
        for buffer, leaf in zip(graph.buffers, (leaf for leaf in leaves if isinstance(leaf, torch.Tensor))):
            buffer.fill(leaf)
        graph.replay()
        graph.replays += 1
        # A copy: the graph's outputs are overwritten by its next replay.
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, graph.outputs)

    def _static_entry(self, layer: nn.Module, state: _LayerState, leaves: list):
        """The layer's StaticLayer cache entry if this call can be replayed, else None. The
        hidden state comes first; the cache is wherever the decoder passes it (`cache`,
        `layer_past`, or by position, as GPT-2 does)."""
        from transformers.cache_utils import Cache, StaticLayer

        if state.refused or layer.training or not leaves or torch.is_grad_enabled():
            return None
        hidden = leaves[0]
        if (not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[:2] != (1, 1)
                or not self.recorder.accepts(hidden.device)):
            return None
        cache = next((leaf for leaf in leaves if isinstance(leaf, Cache)), None)
        entries = getattr(cache, "layers", None)
        if entries is None or state.index >= len(entries):
            return None
        entry = entries[state.index]
        if type(entry) is not StaticLayer or not entry.is_initialized or entry.keys.device != hidden.device:
            return None
        return entry

    def _record(self, state: _LayerState, eager, entry, leaves: list, spec) -> _Graph | None:
        if state.graph is not None:
            state.short_lived = state.short_lived + 1 if state.graph.replays <= 1 else 0
        state.graph = None
        if state.short_lived >= MAX_SHORT_LIVED:
            state.refused = f"handed something new at {MAX_SHORT_LIVED + 1} steps in a row"
            return None
        device = leaves[0].device
        buffers, inputs, slot = [], [], 0
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                buffer = self._buffer(device, slot, leaf)
                buffer.fill(leaf)
                buffers.append(buffer)
                inputs.append(buffer.tensor)
                slot += 1
            else:
                inputs.append(leaf)
        args, kwargs = pytree.tree_unflatten(inputs, spec)
        position = entry.cumulative_length.clone()

        def run(warm_up: bool):
            outputs = eager(*args, **kwargs)
            if warm_up:  # the step itself is the replay that follows: undo the warm-up's advance
                entry.cumulative_length.copy_(position)
            return outputs

        try:
            replay, outputs = self.recorder.record(device, run)
        except Exception as exc:  # e.g. an operation that reads a value back to the host
            entry.cumulative_length.copy_(position)
            state.refused = f"could not be recorded ({type(exc).__name__}: {exc})"
            return None
        self.recordings += 1
        state.graph = _Graph(spec, [leaf for leaf in leaves if not isinstance(leaf, torch.Tensor)],
                             buffers, entry.keys, replay, outputs)
        return state.graph

    def _buffer(self, device: torch.device, slot: int, like: torch.Tensor) -> _Buffer:
        """The buffer for tensor input `slot` of this device's layers: shared by every layer
        there that takes a tensor of this shape and dtype in that place."""
        key = (device, slot, tuple(like.shape), like.dtype)
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = _Buffer(torch.empty_like(like, memory_format=torch.contiguous_format))
        return buffer


def _same_call(graph: _Graph, spec, leaves: list) -> bool:
    """Whether a call hands the layer what its graph was recorded with: the same structure,
    the same non-tensor values (the same cache object), tensors of the same shapes."""
    if spec != graph.spec:
        return False
    constants = iter(graph.constants)
    buffers = iter(graph.buffers)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            held = next(buffers).tensor
            if leaf.shape != held.shape or leaf.dtype != held.dtype or leaf.device != held.device:
                return False
        else:
            recorded = next(constants)
            if leaf is not recorded and not (type(leaf) in (int, float, bool, str, type(None)) and leaf == recorded):
                return False
    return True


def _forward(self: nn.Module, *args, **kwargs):
    return self.vramancer_graphs.call(self, args, kwargs)


def _is_ours(layer: nn.Module) -> bool:
    return getattr(vars(layer).get("forward"), "__func__", None) is _forward


def is_graphed(layer: nn.Module) -> bool:
    return _is_ours(layer)
