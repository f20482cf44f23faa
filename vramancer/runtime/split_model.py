"""Applies a Placement to a loaded model: parts on their devices, hooks at the boundaries.

At every boundary (layer i on device A, the next part on B) a forward pre-hook hands the
hidden state, positional tensors and mask to the TransferManager, which moves them A→B and
records the link. Each layer's KV cache entry is created on that layer's device, because the
cache allocates it from the key states the layer itself produced.

Layers on a device that is not `local` (another machine's) are placed, run and moved by an
`ExternalLayers` adapter (engine/factory attaches one; cluster/ implements it): the
stack holds stand-ins for them, and only the adapter knows where they really run.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from vramancer.kernels.cpu import fused_layer
from vramancer.model.architecture import (
    cache_tensors,
    part_tensors,
    replace_cache_tensor,
)
from vramancer.model.description import ModelDescription
from vramancer.planning.placement import (
    EMBED,
    HEAD,
    DeviceNeed,
    ModelProfile,
    Placement,
    device_needs,
)
from vramancer.platforms.devices import Device, DeviceFullError
from vramancer.quantization.weights import stored_bytes
from vramancer.runtime.graphs import LayerGraphs
from vramancer.runtime.host_memory import copy_mapped, own_copy
from vramancer.runtime.streaming import LayerStreamer
from vramancer.runtime.transfer import TransferManager


class ExternalLayers(Protocol):
    """Places, runs and moves the decoder layers that live on devices that are not `local`.

    Like accelerate's hook pair, `install` puts stand-ins into the stack for the current
    placement (and the real layers back elsewhere); `place`, `move` and `adopt` change where
    layers live. Any of them may raise DeviceLost."""

    def place(self, placement: Placement) -> None:
        """First placement: the external devices take their layers."""

    def install(self, placement: Placement) -> None:
        """Stand-ins where layers are external, the real layers everywhere else."""

    def move(self, index: int, src: str, dst: str, cache) -> int:
        """Layer `index`, weights and KV cache, from `src` to `dst` where either is external.
        Returns the bytes placed and carried."""

    def adopt(self, placement: Placement, layers: list[int]) -> None:
        """Give `layers`, whose device was lost, their places in `placement`."""

    def close(self) -> None:
        """Let the external devices release what they hold."""


class SplitModel:
    """A causal LM whose parts live on several devices, with the plumbing between them."""

    def __init__(
        self,
        model: nn.Module,
        description: ModelDescription,
        devices: Sequence[Device],
        transfer: TransferManager,
        context: int,
    ):
        self.model = model
        self.description = description  # bound to `model`
        self.arch = description.architecture
        self.base = self.arch.base  # the module that runs the decoder stack
        self.stack = self.arch.layers
        self.profile: ModelProfile = description.profile
        self.devices = {d.name: d for d in devices}
        self.transfer = transfer
        self.context = context
        self.placement: Placement | None = None
        self._hooks: list = []
        # Per device off the embeddings', this forward pass's copies of the decoder's tensors
        # (positions, masks): every layer of the block reuses them.
        self._carried: dict[str, _Carried] = {}
        # The real decoder layers, whatever stands in the stack for the ones that are external.
        self.layer_modules: list[nn.Module] = list(self.stack)
        self.external: ExternalLayers | None = None  # set when some devices are not local
        self.graphs: LayerGraphs | None = None  # decode steps replayed from CUDA graphs, when on
        # Layers whose weights live in a host or disk tier (layer -> tier), streamed to the
        # device the placement gives them at their turn (runtime/streaming.py).
        self.streamed: dict[int, str] = {}
        self.streamer: LayerStreamer | None = None
        self.tier_caps: dict[str, int] = {}  # bytes each tier may hold (engine/loader.py measures the tiers)

    def use_graphs(self, graphs: "LayerGraphs | None") -> None:
        """Replay the decode steps of local CUDA layers from graphs (runtime/graphs.py),
        or, with None, run every layer eagerly again."""
        if self.graphs is not None:
            for layer in self.layer_modules:
                self.graphs.remove(layer)
        self.graphs = graphs
        if self.placement is not None:
            self.rewire()

    def is_local(self, name: str) -> bool:
        """True if `name`'s layers live in this process (or `name` is no device of ours)."""
        device = self.devices.get(name)
        return device is None or device.local

    # --- parts -------------------------------------------------------------------------

    def tensors_of(self, part: str | int) -> list[tuple[nn.Module, str, torch.Tensor]]:
        """(owner, name, tensor) for every parameter and buffer of one part."""
        holders = self.arch.holders if part == EMBED else []
        return list(part_tensors(self.modules_of(part), holders))

    def modules_of(self, part: str | int) -> list[nn.Module]:
        if part == EMBED:
            return list(self.arch.before)
        if part == HEAD:
            return list(self.arch.after)
        return [self.layer_modules[int(part)]]

    @property
    def tied(self) -> bool:
        return self.arch.tied()

    @property
    def input_device(self) -> torch.device:
        assert self.placement is not None
        return self.devices[self.placement.embed].torch_device

    def apply(self, placement: Placement, streamed: dict[int, str] | None = None) -> None:
        """First placement of a model that was read into host memory. Layers in `streamed`
        (layer -> tier) keep their weights in that tier and stream to their device."""
        self.streamed = dict(streamed or {})
        self.sync_ledgers(placement)
        if self.profile.tied_bytes and placement.embed != placement.head:
            self._untie(copy=True)
        on_the_host = []
        for part in self.profile.parts():
            if part in self.streamed:
                continue  # its weights go to its tier below
            device = self.devices[placement.device_of(part)]
            if device.torch_device.type != "cpu" and device.local:
                for tensor_owner, name, tensor in self.tensors_of(part):
                    _assign(tensor_owner, name, tensor.to(device.torch_device))
            elif device.local:
                on_the_host += self.tensors_of(part)
        # What stays on the CPU is read at every decode step: out of any file transformers
        # mapped it from, into our own memory (runtime/host_memory.py).
        copy_mapped(on_the_host)
        if self.streamed:
            self.streamer = LayerStreamer(self.layer_modules, self.streamed, self._streamed_devices(placement))
        if self.external is not None:
            self.external.place(placement)  # e.g. nodes read their layers from their own disks
        self.placement = placement
        self.rewire()

    def external_between(self, src: str, dst: str) -> bool:
        """True when moving a layer between `src` and `dst` is the external adapter's job."""
        return self.external is not None and not (self.is_local(src) and self.is_local(dst))

    def move(self, part: str | int, dst: str, cache=None) -> int:
        """Move one part, weights and (for a layer) KV cache, to `dst`. The placement follows
        as soon as the weights have moved. Returns the bytes moved."""
        assert self.placement is not None
        src = self.placement.device_of(part)
        if self.external_between(src, dst):
            nbytes = self.external.move(int(part), src, dst, cache)
            self.placement = self.placement.moved([part], dst)
            return nbytes
        # A streamed layer's weights stay in their tier: only its KV cache changes device.
        nbytes = 0 if part in self.streamed else self.move_part(part, dst)
        self.placement = self.placement.moved([part], dst)
        if part not in (EMBED, HEAD):
            nbytes += self.move_cache(cache, int(part), src, dst)
        return nbytes

    def move_part(self, part: str | int, dst: str) -> int:
        """Copy one part's weights to `dst` (a real copy, recorded on the link). Returns bytes."""
        assert self.placement is not None
        src = self.placement.device_of(part)
        if src == dst:
            return 0
        if part in (EMBED, HEAD) and self.tied:
            self._untie(copy=False)  # shared storage until one side moves away
        slots = self.tensors_of(part)
        moved = self.transfer.move([t for _, _, t in slots], src, dst)
        for (owner, name, _), tensor in zip(slots, moved):
            _assign(owner, name, tensor)
        return sum(stored_bytes(t) for _, _, t in slots)

    def move_cache(self, cache, layer: int, src: str, dst: str) -> int:
        """Move every tensor of layer `layer`'s cache entry (keys, values, and whatever else
        its kind keeps), if it has any yet. Returns bytes."""
        slots = _cache_slots(cache, layer) if src != dst else []
        if not slots:
            return 0
        moved = self.transfer.move([tensor for _, _, tensor in slots], src, dst)
        self._put_cache(cache, [layer], slots, moved, dst)
        return sum(t.numel() * t.element_size() for t in moved)

    def move_layers(self, layers: list[int], dst: str, cache=None) -> int:
        """Move resident layers of one device, weights and KV cache, to `dst` in one transfer
        (between simulated devices, one copy: see runtime/transfer.py's `_copy_together`).
        Both devices are this machine's. Returns the bytes moved."""
        assert self.placement is not None
        src = self.placement.device_of(layers[0])
        weights = [slot for layer in layers for slot in self.tensors_of(layer)]
        kv = [slot for layer in layers for slot in _cache_slots(cache, layer)]
        moved = self.transfer.move([tensor for _, _, tensor in weights + kv], src, dst)
        for (owner, name, _), tensor in zip(weights, moved):
            _assign(owner, name, tensor)
        self._put_cache(cache, layers, kv, moved[len(weights):], dst)
        self.placement = self.placement.moved(list(layers), dst)
        return sum(stored_bytes(t) for t in moved)

    def _put_cache(self, cache, layers: list[int], slots: list, moved: list[torch.Tensor], dst: str) -> None:
        for (container, key, _), tensor in zip(slots, moved):
            replace_cache_tensor(container, key, tensor)
        for layer in layers:
            entry = _cache_entry(cache, layer)
            if entry is not None and hasattr(entry, "device"):
                entry.device = self.devices[dst].torch_device

    def settle_tie(self) -> None:
        """Re-tie embeddings and lm_head once both sit on one device again."""
        assert self.placement is not None
        if self.profile.tied_bytes and not self.tied and self.placement.embed == self.placement.head:
            self.arch.output_embeddings.weight = self.arch.input_embeddings.weight

    def _untie(self, copy: bool) -> None:
        if not self.tied:
            return
        weight = self.arch.input_embeddings.weight.detach()
        if copy:  # on the host, the head's matmul reads it at every step: memory like the other weights'
            weight = own_copy(weight) if weight.device.type == "cpu" else weight.clone()
        self.arch.output_embeddings.weight = nn.Parameter(weight, requires_grad=False)

    # --- accounting --------------------------------------------------------------------

    def needs(self, placement: Placement) -> dict[str, DeviceNeed]:
        return device_needs(self.profile, placement, list(self.devices.values()), self.context, self.streamed)

    def sync_ledgers(self, placement: Placement) -> None:
        """Claim on every device what `placement` needs there; all or nothing."""
        needs = self.needs(placement)
        saved = {name: dict(d.ledger.claims) for name, d in self.devices.items()}
        # Shrink first, so a device that only gives memory back never blocks one that grows.
        order = sorted(self.devices.values(), key=lambda d: needs[d.name].total - _model_claims(d))
        try:
            for device in order:
                need = needs[device.name]
                device.ledger.set_many(
                    # staging room for streamed layers is workspace too: buffers no weight owns for long
                    {"weights": need.weights, "kv": need.kv,
                     "workspace": need.workspace + need.reserve + need.staging}
                )
        except DeviceFullError:
            for name, claims in saved.items():
                self.devices[name].ledger.claims.update(claims)
            raise

    # --- boundary hooks ----------------------------------------------------------------

    def rewire(self) -> None:
        """Install the hooks the current placement needs, and no others: a hand-over where a
        block starts, the decoder's positions and masks carried to every layer off the
        embeddings' device, the hidden state into the head and the logits back."""
        assert self.placement is not None
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        placement = self.placement
        if self.external is not None:
            self.external.install(placement)
        self._carried.clear()
        if self.graphs is not None:
            self.graphs.drop()  # what they read may have moved
            for layer in self.layer_modules:
                self.graphs.remove(layer)
        for layer in self.layer_modules:
            fused_layer.refresh(layer)  # its weights may be new tensors after a move
        if self.graphs is not None:
            for i, layer in enumerate(self.layer_modules):
                device = self.devices[placement.layer_devices[i]]
                # a streamed layer's weights are new tensors at every turn: a recording cannot replay it
                if device.local and i not in self.streamed and self.graphs.recorder.accepts(device.torch_device):
                    self.graphs.install(layer, i)
        if self.streamer is not None:
            self.streamer.install(self._streamed_devices(placement))
        previous = placement.embed
        for i, layer in enumerate(self.stack):
            current = placement.layer_devices[i]
            if self.is_local(current) and (current != previous or current != placement.embed):
                entering_from = previous if current != previous else None
                self._hooks.append(layer.register_forward_pre_hook(self._arrive(entering_from, current),
                                                                   with_kwargs=True))
            previous = current
        if placement.head != previous:
            self._hooks.append(self.arch.head_entry.register_forward_pre_hook(self._boundary(previous, placement.head),
                                                                              with_kwargs=True))
        if placement.head != placement.embed:
            # Logits go back to where the input ids live, for the sampler.
            src, dst = placement.head, placement.embed
            self._hooks.append(
                self.arch.output_embeddings.register_forward_hook(
                    lambda module, args, output: self.transfer.move(output, src, dst)
                )
            )

    def stream(self, layers: list[int], tier: str) -> None:
        """Keep `layers` (resident so far) in `tier` from now on: they run where they are,
        their weights copied in at each turn. The ledgers follow; the caller rewires."""
        assert self.placement is not None
        before = dict(self.streamed)
        self.streamed.update({i: tier for i in layers})
        try:
            self.sync_ledgers(self.placement)
        except Exception:
            self.streamed = before
            raise
        if self.streamer is None:
            self.streamer = LayerStreamer(self.layer_modules, {i: tier for i in layers},
                                          self._streamed_devices(self.placement))
        else:
            self.streamer.add({i: tier for i in layers}, self._streamed_devices(self.placement))

    def _streamed_devices(self, placement: Placement) -> dict[int, torch.device]:
        return {i: self.devices[placement.layer_devices[i]].torch_device for i in self.streamed}

    def close_streaming(self) -> None:
        """Stop streaming: the copy thread ends and the tiers' copies are let go with the model."""
        if self.streamer is not None:
            self.streamer.close()

    def _boundary(self, src: str, dst: str):
        """The hook for a boundary into a local device. Out of an external block, its stand-in
        already brought the hidden state back (and recorded it): the rest only needs to be on `dst`."""
        if self.is_local(src):
            return lambda module, args, kwargs: self.transfer.move((args, kwargs), src, dst)
        target = self.devices[dst].torch_device
        return lambda module, args, kwargs: _to_device((args, kwargs), target)

    def _arrive(self, src: str | None, dst: str):
        """The pre-hook of a local layer on `dst` that needs one.

        Where a block starts (`src` given), the hidden state crosses from `src`. On any device
        but the embeddings', the layer also needs the positions and masks the decoder made
        beside the embeddings and hands every layer: each is carried onto `dst` once per
        forward pass, at the block's start with the hidden state (one recorded transfer), or
        where a later layer first gets it (models that give each kind of layer its own mask
        and rotary tensors). The hidden state is the first positional argument; the rest are
        the decoder's."""
        carries = dst != self.placement.embed
        enter = self._boundary(src, dst) if src is not None else None

        def hook(module, args, kwargs):
            if enter is not None and not carries:
                moved_args, _ = enter(module, args, {})
                return moved_args, kwargs  # the decoder's tensors already live here
            if enter is not None:
                moved_args, moved_kwargs = enter(module, args, kwargs)
                self._carried[dst] = _Carried(args, kwargs, moved_args, moved_kwargs)
                return moved_args, moved_kwargs
            carried = self._carried[dst]
            if carried.got_the_same(args, kwargs):  # the usual case: one set for every layer
                return (args[0], *carried.args), dict(carried.kwargs)  # each layer a dict of its own
            return ((args[0], *(self._carry(v, carried, dst) for v in args[1:])),
                    {key: self._carry(value, carried, dst) for key, value in kwargs.items()})

        return hook

    def _carry(self, value, carried: "_Carried", dst: str):
        """`value` as a layer on `dst` must get it: the copy already carried there in this
        forward pass, else a new one if it holds tensors."""
        copy = carried.copy_of(value)
        if copy is not None or not _holds_tensors(value):
            return value if copy is None else copy
        copy = self.transfer.move(value, self.placement.embed, dst)
        carried.add(value, copy)
        return copy


class _Carried:
    """The decoder's tensors (positions, masks) and their copies on one device, for one
    forward pass: what the block's first layer got, and every original → copy since."""

    def __init__(self, args: tuple, kwargs: dict, moved_args: tuple, moved_kwargs: dict):
        self.sent_args, self.sent_kwargs = args[1:], dict(kwargs)  # as the decoder handed them to the first layer
        self.args, self.kwargs = tuple(moved_args[1:]), moved_kwargs
        # By id of the original; each entry holds the original, so no other object takes its id meanwhile.
        self.copies: dict[int, tuple[object, object]] = {}
        for original, copy in zip((*args[1:], *kwargs.values()), (*self.args, *moved_kwargs.values())):
            self.add(original, copy)

    def got_the_same(self, args: tuple, kwargs: dict) -> bool:
        """True when a layer got exactly the objects the first one did, under the same keywords."""
        return (len(args) - 1 == len(self.sent_args) and kwargs.keys() == self.sent_kwargs.keys()
                and all(a is b for a, b in zip(args[1:], self.sent_args))
                and all(a is b for a, b in zip(kwargs.values(), self.sent_kwargs.values())))

    def copy_of(self, value):
        hit = self.copies.get(id(value))
        return hit[1] if hit is not None and hit[0] is value else None

    def add(self, original, copy) -> None:
        self.copies[id(original)] = (original, copy)


def _cache_entry(cache, layer: int):
    entries = getattr(cache, "layers", None)
    return entries[layer] if entries is not None and layer < len(entries) else None


def _cache_slots(cache, layer: int) -> list[tuple[object, object, torch.Tensor]]:
    """(container, key, tensor) of every tensor layer `layer`'s cache entry holds yet."""
    entry = _cache_entry(cache, layer)
    return [] if entry is None else list(cache_tensors(entry))


def _holds_tensors(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_holds_tensors(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_tensors(v) for v in value.values())
    return False


def _to_device(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def move_module(module: nn.Module, device: torch.device) -> None:
    """Move a module's tensors to `device` in place (the same Parameter objects, new storage)."""
    for owner, name, tensor in part_tensors([module]):
        if tensor.device != device:
            _assign(owner, name, tensor.to(device))


def _assign(owner: nn.Module, name: str, tensor: torch.Tensor) -> None:
    current = owner._parameters.get(name)
    if current is not None and is_traceable_wrapper_subclass(current):
        # A quantized weight: `.data =` would keep its inner tensors (the real bytes) where
        # they were, so the parameter itself is replaced. Ties are undone before such moves.
        owner._parameters[name] = nn.Parameter(tensor, requires_grad=False)
    elif current is not None:
        current.data = tensor.data if isinstance(tensor, nn.Parameter) else tensor
    else:
        owner._buffers[name] = tensor


def _model_claims(device: Device) -> int:
    claims = device.ledger.claims
    return claims["weights"] + claims["kv"] + claims["workspace"]
