"""Layers whose weights live in a host or disk tier, streamed to their device at their turn.

The planner (planning/tiers.py) keeps the weights of layers that fit on no device in a tier
and gives each a computing device. Here each such layer's tensors stay in their tier (host
memory, page-locked where CUDA is present, or a memory-mapped safetensors file in the cache
folder); a forward pre-hook puts a copy on the computing device just before the layer runs
and a forward hook drops it after, so the device holds at most the layer running and the one
arriving (the staging room the memory model counts). The KV cache is made by the layer on
its device, like any other layer's.

Prefetch: when a streamed layer starts, the copy of the next streamed layer (wrapping to the
first for the next step) starts on a copy thread, so it overlaps this layer's compute and
whatever runs before the next one. On CUDA the thread issues the copy on a side stream
(from page-locked memory, asynchronous) and the compute stream waits for its event; on the
CPU and simulated devices the copy is a real memcpy on that thread. With nothing to overlap
(a single streamed layer) it still works: the copy is then simply waited for.

Packing: a streamed layer's plain tensors lie one after the other in one flat buffer of its
tier (each on a 64-byte boundary), and the layer's weights are views into it. A turn is then
one large copy of that buffer into a staging buffer of the device, whose views the layer
reads: no Python per tensor, and the disk tier is read as one sequential run of its mapped
file. Quantized weights (tensor subclasses) are copied tensor by tensor beside it.

Module by module: on the CPU and simulated devices, a layer of plain tensors streams one
module at a time instead (_ModuleTurns): each projection's or norm's tensors are copied just
before it runs into one of two small staging buffers that stay in the cache, the next
module's copy made on the copy thread meanwhile, and finished by the compute side when it
is behind. There the copy and the compute share the memory bus, and a whole layer copied
ahead is written out to memory and read back again.

One forward pass streams each layer once whatever the batch holds, so a batch of sequences
pays the copies once per step.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from vramancer.kernels.cpu import fused_layer
from vramancer.planning.tiers import DISK, HOST
from vramancer.quantization.weights import stored_bytes
from vramancer.runtime.host_memory import copy_mapped, own_bytes

Slot = tuple[nn.Module, str, torch.Tensor]
PACK_ALIGN = 64  # bytes: where each tensor of a packed layer starts (a cache line; dtype views need it)
# A packed layer's copy to a CPU or simulated device goes in pieces of this size, which the
# compute side helps with when it would otherwise wait: past the per-piece Python (~10 µs) by
# two orders of magnitude, small enough that both sides finish close together.
COPY_PIECE = 4 * 1024 * 1024
# A module's copy (module by module, below) goes in pieces of this size: well under the size
# past which the C library's memmove writes around the cache, so the staging stays in the
# cache for the module to read, and small enough that a 4 MiB projection splits between the
# copy thread and the compute side.
MODULE_PIECE = 1024 * 1024
# A module with fewer bytes than this, and than an eighth of the largest (a norm's weight), is
# copied at its turn on the compute side, into a buffer of its own, and never prefetched: a
# copy thread's turn (a hand-over and a wake-up) costs more than the copy, and the prefetch
# of the next large module may then start as soon as the large one before it does.
SMALL_UNIT = 64 * 1024
PROBE_BYTES = 64 * 1024 * 1024  # what a tier→device rate is measured with: past any CPU cache, as a layer is


@dataclass
class TierStats:
    """What one tier has streamed: bytes and copy seconds, in all and for the last step."""

    bytes: int = 0  # of the copies done
    copies: int = 0  # started: one per streamed layer per forward pass, whatever the timing
    seconds: float = 0.0  # time the copy thread spent copying

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        return {"bytes": self.bytes, "copies": self.copies, "gb_per_s": round(self.bytes_per_s / 1e9, 3)}


@dataclass
class _Packed:
    """A streamed layer's plain tensors packed in one flat buffer of its tier."""

    flat: torch.Tensor  # uint8: the tier's copy (host memory, or a view into the mapped file)
    views: list[tuple[int, int, int, torch.dtype, tuple]]  # (slot position, byte offset, bytes, dtype, shape)
    loose: list[int]  # slot positions copied one by one (quantized weights' own classes)


def _pack_layout(tensors: list[torch.Tensor]) -> tuple[list[tuple[int, int, int, torch.dtype, tuple]], list[int], int]:
    """Where each tensor that can be packed goes in a flat buffer: (views, loose, bytes)."""
    views, loose, offset = [], [], 0
    for k, tensor in enumerate(tensors):
        if is_traceable_wrapper_subclass(tensor) or not tensor.is_contiguous() or tensor.numel() == 0:
            loose.append(k)
            continue
        nbytes = tensor.numel() * tensor.element_size()
        views.append((k, offset, nbytes, tensor.dtype, tuple(tensor.shape)))
        offset += -(-nbytes // PACK_ALIGN) * PACK_ALIGN
    return views, loose, offset


def _unpack(flat: torch.Tensor, packed: _Packed, loose: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    """The layer's tensors in slot order: views into `flat` laid out as `packed`, and `loose`
    (the tensors of `packed.loose`, in order)."""
    out: list = [None] * count
    for k, offset, nbytes, dtype, shape in packed.views:
        out[k] = flat[offset:offset + nbytes].view(dtype).view(shape)
    for k, tensor in zip(packed.loose, loose):
        out[k] = tensor
    return out


@dataclass
class _Staged:
    """A copy of one layer's tensors on its way to (or on) a device."""

    device: torch.device
    future: Future
    event: object = None  # a CUDA event the compute stream waits for
    pieces: "_Pieces | None" = None  # the flat copy's pieces, which the compute side may help with


class _Pieces:
    """One flat copy cut in pieces that any thread may take, one at a time: the copy thread
    takes them in turn, and the compute side, rather than wait idle for a copy that is behind,
    takes the rest beside it (on the CPU a copy is a core's work, and the compute side's core
    is free while it would wait)."""

    def __init__(self, dst: torch.Tensor, src: torch.Tensor, piece: int = COPY_PIECE):
        if not (dst.device.type == src.device.type == "cpu" and dst.dtype == src.dtype == torch.uint8
                and dst.is_contiguous() and src.is_contiguous() and dst.numel() == src.numel()):
            raise ValueError("a copy in pieces is between two contiguous byte buffers of one size in host memory")
        self.dst, self.src = dst, src
        self.starts = list(range(0, src.numel(), piece))
        self.piece = piece
        self._next = 0
        self._left = len(self.starts)
        self._copied = [False] * len(self.starts)  # by piece: whether a whole copy of it is in place
        self._lock = threading.Lock()
        self.done = threading.Event()
        self.quiet = threading.Event()  # set while no thread is writing `dst` for this copy
        self.quiet.set()
        self._writers = 0
        self.after: _Pieces | None = None  # the copy into the same `dst` before this one
        self.started = self.finished = time.perf_counter()  # of the first piece taken, the last one done
        if not self._left:
            self.done.set()

    def work(self) -> None:
        """Copy pieces until none is left to take."""
        while True:
            with self._lock:
                if self._next >= len(self.starts):
                    return
                k = self._next
                if not k:
                    self.started = time.perf_counter()
                self._next += 1
                self._writers += 1
                self.quiet.clear()
            self._copy(k)

    def finish(self) -> None:
        """Put every piece in place from this thread, now: those no one took, and those another
        thread took and has not finished (copied again: the same bytes to the same place), so
        the caller never waits on a thread the system has not scheduled. Another thread may
        still be writing those same bytes after it returns; `quiet` tells when none is."""
        if self.after is not None:
            self.after.quiet.wait()  # the copy before this one into `dst` is written out
        for k in range(len(self.starts)):
            with self._lock:
                if self._copied[k]:
                    continue
                if k >= self._next:  # not taken: take it, as work() would
                    if not self._next:
                        self.started = time.perf_counter()
                    self._next = k + 1
                self._writers += 1
                self.quiet.clear()
            self._copy(k)

    def _copy(self, k: int) -> None:
        start = self.starts[k]
        size = min(self.piece, self.src.numel() - start)
        # The C library's memmove, not torch's copy_: past a size near the cache's it writes
        # around the cache (non-temporal stores), which copied a whole layer 1.4-2x as fast
        # here; below it (a module's pieces) its stores stay in the cache for the module to
        # read, at less CPU time than copy_'s; and it lets the GIL go as torch does.
        ctypes.memmove(self.dst.data_ptr() + start, self.src.data_ptr() + start, size)
        with self._lock:
            self._writers -= 1
            if not self._writers:
                self.quiet.set()
            if not self._copied[k]:
                self._copied[k] = True
                self._left -= 1
                if not self._left:
                    self.finished = time.perf_counter()
                    self.done.set()


class LayerStreamer:
    """Keeps the weights of `streamed` layers (index -> tier) of `layers` in their tiers and
    copies each to its computing device at its turn, one layer ahead."""

    def __init__(self, layers: list[nn.Module], streamed: dict[int, str], devices: dict[str, torch.device],
                 folder: Path | None = None):
        self.layers = layers
        self.streamed = dict(sorted(streamed.items()))
        self.devices = dict(devices)  # layer -> torch device that computes it
        self.order = list(self.streamed)
        self.stats = {HOST: TierStats(), DISK: TierStats()}
        self.waited_s = 0.0  # time the compute side waited for a copy: what prefetch did not hide
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vramancer-stream")
        self._pending: dict[int, _Staged] = {}
        self._hooks: list = []
        self._streams: dict[torch.device, object] = {}
        self._mappings: list[mmap.mmap] = []
        # The double buffer of the CPU and simulated devices: each layer's device copy goes back
        # here after its turn and the next copy of a layer of the same shapes is made into it,
        # so a turn costs a memcpy, not fresh pages (on CUDA, torch's caching allocator does this).
        self._spare: dict[int, list[torch.Tensor]] = {}  # flat staging buffers by size
        self._in_use: dict[int, torch.Tensor] = {}  # the staging buffer each running layer reads
        self.slots: dict[int, list[Slot]] = {}
        self._packed: dict[int, _Packed] = {}
        self._modules: _ModuleTurns | None = None
        self._folder = folder
        self._keep_in_tiers(self.streamed)

    def add(self, layers: dict[int, str], devices: dict[int, torch.device]) -> None:
        """Keep more layers (index -> tier) in the tiers, from wherever their weights are now;
        `devices` are every streamed layer's computing devices after the change."""
        self.remove()
        self.streamed = dict(sorted({**self.streamed, **layers}.items()))
        self.order = list(self.streamed)
        self.devices = dict(devices)
        self._keep_in_tiers(layers)

    # --- the tiers ----------------------------------------------------------------------

    def _keep_in_tiers(self, layers: dict[int, str]) -> None:
        """Each of `layers`' tensors into its tier: the host tier keeps them in host memory
        of the process's own (page-locked for CUDA), the disk tier in one mapped file; the
        plain ones packed in one flat buffer per layer, the layer's weights views into it."""
        pin = any(d.type == "cuda" for d in self.devices.values()) and torch.cuda.is_available()
        to_disk = {}
        for index, tier in layers.items():
            slots = _slots(self.layers[index])
            for owner, name, tensor in slots:
                if tensor.device.type != "cpu":  # a layer that was resident on a GPU
                    _assign(owner, name, tensor.to("cpu"))
            slots = _slots(self.layers[index])
            views, loose, nbytes = _pack_layout([t for _, _, t in slots])
            flat = _pinned_bytes(nbytes) if pin else own_bytes(nbytes)
            packed = _Packed(flat, views, loose)
            for k, offset, size, _, _ in views:
                flat[offset:offset + size].copy_(slots[k][2].detach().reshape(-1).view(torch.uint8))
            if tier == HOST:
                loose_slots = [slots[k] for k in loose]
                copy_mapped(loose_slots)  # out of a file transformers mapped, into memory of our own
                loose_tensors = [getattr(owner, name) for owner, name, _ in loose_slots]
                if pin:
                    loose_tensors = [_pinned(t) for t in loose_tensors]
                for (owner, name, _), tensor in zip(slots, _unpack(flat, packed, loose_tensors, len(slots))):
                    _assign(owner, name, tensor)
                self._packed[index] = packed
                self.slots[index] = _homes(_slots(self.layers[index]))
            else:
                to_disk[index] = (slots, packed)
        if to_disk:
            mapped = self._write_and_map(to_disk, self._folder)
            for index, (slots, packed) in to_disk.items():
                packed.flat = mapped[(index, "flat")]
                loose_tensors = [mapped[(index, k)] for k in packed.loose]
                for (owner, name, _), tensor in zip(slots, _unpack(packed.flat, packed, loose_tensors, len(slots))):
                    _assign(owner, name, tensor)
                self._packed[index] = packed
                self.slots[index] = _homes(_slots(self.layers[index]))

    def _write_and_map(self, layers: dict[int, tuple[list[Slot], _Packed]],
                       folder: Path | None) -> dict[tuple[int, int | str], torch.Tensor]:
        """Write the layers' packed buffers and loose tensors to one safetensors file
        (model/weights_cache.py's writer) and map it back: the file is unlinked at once, so
        nothing is left behind, and its pages are read from the disk when a layer is copied.
        Returns the mapped tensors by (layer, "flat") and (layer, slot position)."""
        from vramancer.config.paths import cache_root
        from vramancer.model.weights_cache import write_safetensors

        folder = folder or cache_root() / "disk-tier"
        folder.mkdir(parents=True, exist_ok=True)
        flat, rebuild = {}, {}
        for index, (slots, packed) in layers.items():
            flat[f"{index}.flat"] = packed.flat
            for k in packed.loose:
                tensor = slots[k][2].detach()
                if is_traceable_wrapper_subclass(tensor):
                    names, context = tensor.__tensor_flatten__()
                    for inner in names:
                        if getattr(tensor, inner) is not None:
                            flat[f"{index}.{k}.{inner}"] = getattr(tensor, inner)
                    rebuild[(index, k)] = (type(tensor), names, context, tensor.size(), tensor.stride())
                else:
                    flat[f"{index}.{k}"] = tensor
        fd, name = tempfile.mkstemp(prefix="layers-", suffix=".safetensors", dir=folder)
        os.close(fd)
        path = Path(name)
        try:
            write_safetensors(path, flat)
            views = _map_safetensors(path, self._mappings)
        finally:
            path.unlink(missing_ok=True)
        mapped = {}
        for index, (slots, packed) in layers.items():
            mapped[(index, "flat")] = views[f"{index}.flat"]
            for k in packed.loose:
                if (index, k) in rebuild:
                    kind, names, context, size, stride = rebuild[(index, k)]
                    inner = {n: views[f"{index}.{k}.{n}"] for n in names if f"{index}.{k}.{n}" in views}
                    mapped[(index, k)] = kind.__tensor_unflatten__(inner, context, size, stride)
                else:
                    mapped[(index, k)] = views[f"{index}.{k}"]
        return mapped

    def held_bytes(self) -> dict[str, int]:
        """Bytes each tier holds."""
        held = {HOST: 0, DISK: 0}
        for index, tier in list(self.streamed.items()):  # (read by telemetry while layers are added)
            held[tier] += sum(stored_bytes(t) for _, _, t in self.slots.get(index, ()))
        return held

    # --- hooks ----------------------------------------------------------------------------

    def install(self, devices: dict[int, torch.device]) -> None:
        """(Re)install the hooks for the streamed layers' computing devices `devices`; copies
        already on their way to another device are let go."""
        self.remove()
        self.devices = dict(devices)
        by_module = [i for i in self.streamed if self._turns_by_module(i)]
        self.order = [i for i in self.streamed if i not in by_module]  # layers copied whole, one ahead
        units = [u for i in by_module for u in _units(i, self.slots[i], self._packed[i].flat)]
        self._modules = _ModuleTurns(self, units)
        for index in self.order:
            layer = self.layers[index]
            self._hooks.append(layer.register_forward_pre_hook(self._arrive_hook(index), prepend=True))
            self._hooks.append(layer.register_forward_hook(self._leave_hook(index)))
        for index in by_module:
            self._hooks.append(self.layers[index].register_forward_pre_hook(self._count_hook(index), prepend=True))
        self._hooks += self._modules.install()

    def _turns_by_module(self, index: int) -> bool:
        """Whether layer `index` streams module by module (see _ModuleTurns): on the CPU and
        simulated devices, for plain tensors each owned by a module with no tensors below it
        (so one module's staging is never overwritten while it runs)."""
        if self.devices[index].type == "cuda" or self._packed[index].loose or fused_layer.is_fused(self.layers[index]):
            return False
        owners = {id(owner) for owner, _, _ in self.slots[index]}
        return all(not any(id(m) in owners for m in owner.modules() if m is not owner)
                   for owner, _, _ in self.slots[index])

    def _count_hook(self, index: int):
        def hook(module, args):
            with self._lock:
                self.stats[self.streamed[index]].copies += 1  # its modules' copies follow, one by one
        return hook

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for index in list(self._pending):
            self._drop(index)
        if self._modules is not None:
            self._modules.drop()

    def close(self) -> None:
        self.remove()
        self._pool.shutdown(wait=True)

    def _arrive_hook(self, index: int):
        def hook(module, args):
            self.arrive(index)
        return hook

    def _leave_hook(self, index: int):
        def hook(module, args, output):
            self.leave(index)
        return hook

    def arrive(self, index: int) -> None:
        """Layer `index` is about to run: its copy on its device (waited for if still on its
        way), and the next streamed layer's copy started."""
        device = self.devices[index]
        staged = self._pending.pop(index, None)
        if staged is None or staged.device != device:
            if staged is not None:  # a copy to the device the layer ran on before: let it go
                self._pending[index] = staged
                self._drop(index)
            staged = self._start(index)
        start = time.perf_counter()
        if staged.pieces is not None and not staged.future.done():
            staged.pieces.work()  # the copy is behind: copy beside the copy thread rather than wait
        buffer, tensors = staged.future.result()
        if staged.event is not None:
            compute = torch.cuda.current_stream(device)
            compute.wait_event(staged.event)
            for tensor in [buffer, *tensors]:
                _record_stream(tensor, compute)
        self.waited_s += time.perf_counter() - start
        for (owner, name, _), tensor in zip(self.slots[index], tensors):
            _assign(owner, name, tensor)
        self._in_use[index] = buffer
        fused_layer.refresh(self.layers[index])
        following = self._following(index)
        if following != index:
            self.prefetch(following)

    def leave(self, index: int) -> None:
        """Layer `index` has run: its weights point back into the tier, the device copy goes."""
        for owner, name, home in self.slots[index]:
            _assign(owner, name, home)
        fused_layer.refresh(self.layers[index])
        used = self._in_use.pop(index, None)
        if used is not None and self.devices[index].type != "cuda":
            self._give_back(used)  # the layer has run (the CPU computes synchronously): reusable
        if self._following(index) == index:
            self.prefetch(index)  # the only streamed layer: it is next again, at the next step

    def prefetch(self, index: int) -> None:
        if index not in self._pending:
            self._pending[index] = self._start(index)

    def _following(self, index: int) -> int:
        position = self.order.index(index)
        return self.order[(position + 1) % len(self.order)]

    def _drop(self, index: int) -> None:
        staged = self._pending.pop(index)
        try:
            buffer, _ = staged.future.result()
        except Exception:
            return  # a copy no one will use: its failure is of no consequence
        if staged.device.type != "cuda":
            self._give_back(buffer)

    def _give_back(self, buffer: torch.Tensor) -> None:
        with self._lock:
            spare = self._spare.setdefault(buffer.numel(), [])
            if len(spare) < 2:  # the staging room the memory model counts: two layers in flight
                spare.append(buffer)

    def _buffer_for(self, nbytes: int) -> torch.Tensor:
        """A staging buffer of `nbytes` on the CPU: a spare one (its pages already faulted in,
        so a turn costs a memcpy and nothing more), or a fresh one the first times."""
        with self._lock:
            spare = self._spare.get(nbytes)
            if spare:
                return spare.pop()
        with torch.inference_mode(False):  # a normal tensor: the copy thread writes it outside inference mode
            return own_bytes(nbytes)

    def _start(self, index: int) -> _Staged:
        device = self.devices[index]
        packed = self._packed[index]
        homes = [tensor for _, _, tensor in self.slots[index]]
        loose = [homes[k] for k in packed.loose]
        nbytes = packed.flat.numel() + sum(stored_bytes(t) for t in loose)
        tier = self.streamed[index]
        staged = _Staged(device, Future())
        if device.type == "cuda":
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device)
            staged.event = torch.cuda.Event()
        else:  # a real copy, as a transfer to it would be, into a reused staging buffer
            staged.pieces = _Pieces(self._buffer_for(packed.flat.numel()), packed.flat)

        def copy():
            start = time.perf_counter()
            if device.type == "cuda":
                with torch.cuda.stream(stream):
                    buffer = _to_device(packed.flat, device)
                    moved = [_to_device(home, device) for home in loose]
                    staged.event.record(stream)
                stream.synchronize()  # the seconds below are the copy's, not just its issue
            else:
                moved = [home.clone() for home in loose]
                staged.pieces.work()
                staged.pieces.done.wait()  # for the pieces the compute side took
                buffer = staged.pieces.dst
            out = _unpack(buffer, packed, moved, len(homes))
            seconds = time.perf_counter() - start
            with self._lock:
                stats = self.stats[tier]
                stats.bytes += nbytes
                stats.seconds += seconds
            return buffer, out

        with self._lock:
            self.stats[tier].copies += 1
        staged.future = self._pool.submit(copy)
        return staged

    def snapshot(self) -> dict:
        with self._lock:
            return {name: stats.to_json() for name, stats in self.stats.items()}


# --- module by module -------------------------------------------------------------------


@dataclass
class _Unit:
    """One module of a streamed layer: its tensors lie in one run of its layer's packed
    buffer (`source`), and each turn they are read through views into a staging buffer."""

    layer: int
    module: nn.Module
    names: list[str]
    homes: list[torch.Tensor]  # the tier copies, views into the layer's packed buffer
    source: torch.Tensor  # uint8: the run of the packed buffer that holds them all
    layout: list[tuple[int, torch.dtype, tuple]]  # each tensor's (byte offset in the run, dtype, shape)
    staged: list[list[torch.Tensor]] | None = None  # per staging buffer, views laid out as `layout`
    small: bool = False  # copied at its turn, never prefetched (SMALL_UNIT)

    @property
    def nbytes(self) -> int:
        return self.source.numel()


def _units(index: int, slots: list[Slot], flat: torch.Tensor) -> list[_Unit]:
    """Layer `index`'s modules that own tensors, each with its tensors' tier copies (`slots`,
    views into the layer's packed buffer `flat`; a module's tensors lie one after the other
    there, as part_tensors gives them module by module)."""
    by_owner: dict[int, list[tuple[nn.Module, str, torch.Tensor]]] = {}
    for owner, name, home in slots:
        by_owner.setdefault(id(owner), []).append((owner, name, home))
    base, units = flat.data_ptr(), []
    for entries in by_owner.values():
        offsets = [home.data_ptr() - base for _, _, home in entries]
        low = min(offsets)
        high = max(o + h.numel() * h.element_size() for o, (_, _, h) in zip(offsets, entries))
        layout = [(o - low, h.dtype, tuple(h.shape)) for o, (_, _, h) in zip(offsets, entries)]
        units.append(_Unit(index, entries[0][0], [n for _, n, _ in entries], [h for _, _, h in entries],
                           flat[low:high], layout))
    return units


class _ModuleTurns:
    """Streamed layers on the CPU and simulated devices, copied one module at a time.

    On the CPU the copy and the compute share the memory bus: a whole layer copied ahead goes
    out to memory and the compute reads it back from there, three passes over its bytes. Here
    each module's tensors (a projection, a norm) are copied just before it runs into one of
    two staging buffers of the largest module's size, reused all along: they stay in the
    cache, the module reads its weights from there, and the copy costs one pass from the tier.
    The copy of the next module (in the order the first forward pass ran them, wrapping to
    the next streamed layer and to the next step) is started on the copy thread into the other
    buffer while this one runs; it is one run of bytes (the module's part of its layer's packed
    buffer) in pieces of MODULE_PIECE, and when the module's turn comes before its copy is
    done, the compute side puts the pieces left in place itself (_Pieces.finish), those the
    copy thread holds too: on a busy machine that thread may wait for a core for milliseconds,
    and the compute side would wait with it. Small modules (norms: SMALL_UNIT) are copied at
    their turn into a buffer of their own. The views a module reads are made once, so a turn
    does no Python per tensor beyond pointing the module's tensors at them.

    Where the time goes (the offload benchmark's model, 13 of 16 layers streamed, 546 MiB per
    token, 1 torch thread): the compute side spends 10-20 % more CPU time per token than
    with every layer resident (its modules read their weights from the cache, and it copies
    what the copy thread has not), and the copy thread about 30 ms per token (a memcpy at
    ~18 GB/s). So with a core free for the copy thread a step takes about 1.1-1.2x the
    compute alone; with none (a busy machine) the two take turns on one core, 1.3-1.9x."""

    def __init__(self, streamer: "LayerStreamer", units: list[_Unit]):
        self.streamer = streamer
        self.units = units
        largest = max((unit.nbytes for unit in self.units), default=0)
        for unit in self.units:
            unit.small = unit.nbytes < min(SMALL_UNIT, largest // 8)
        large = max((unit.nbytes for unit in self.units if not unit.small), default=0)
        small = max((unit.nbytes for unit in self.units if unit.small), default=0)
        # Two buffers that large modules take in turn, and one for the small ones (SMALL_UNIT).
        self.buffers = [_staging_bytes(large), _staging_bytes(large), _staging_bytes(small)] if self.units else []
        with torch.inference_mode(False):  # normal tensors, as the staging buffers are
            for unit in self.units:
                unit.staged = [[buffer[offset:offset + _nbytes(dtype, shape)].view(dtype).view(shape)
                                for offset, dtype, shape in unit.layout] if buffer.numel() >= unit.nbytes else []
                               for buffer in self.buffers]
        self.order: list[_Unit] = []  # as the first forward pass ran them
        self.following: dict[int, _Unit] | None = None  # id(large unit) -> the next large one, once the order is known
        self.pending: tuple[_Unit, int, _Pieces] | None = None  # a copy on its way: unit, buffer, its pieces
        self.slot = 1  # the buffer the running module reads
        self.last: list[_Pieces | None] = [None] * len(self.buffers)  # the latest copy into each buffer

    def install(self) -> list:
        hooks = []
        for unit in self.units:
            hooks.append(unit.module.register_forward_pre_hook(self._arrive_hook(unit)))
            hooks.append(unit.module.register_forward_hook(self._leave_hook(unit)))
        return hooks

    def drop(self) -> None:
        """Finish a copy on its way (it writes a staging buffer) and forget it."""
        if self.pending is not None:
            self._finish(self.pending[0], self.pending[2])
            self.pending = None

    def _arrive_hook(self, unit: _Unit):
        def hook(module, args):
            self.arrive(unit)
        return hook

    def _leave_hook(self, unit: _Unit):
        def hook(module, args, output):
            for name, home in zip(unit.names, unit.homes):  # back into the tier: the staging is the next module's
                _assign(module, name, home)
        return hook

    def arrive(self, unit: _Unit) -> None:
        start = time.perf_counter()
        if unit.small:  # copied here, now, into its own buffer; a prefetch stays on its way
            self._finish(unit, self._copy(unit, 2))
            self._learn(unit)
            self.streamer.waited_s += time.perf_counter() - start
            for name, view in zip(unit.names, unit.staged[2]):
                _assign(unit.module, name, view)
            return
        if self.pending is not None and self.pending[0] is unit:
            _, slot, pieces = self.pending
        else:  # not the one expected (the first pass, or another path through the layer)
            self.drop()
            slot = 1 - self.slot
            pieces = self._copy(unit, slot)
            self._learn(unit)
        self.pending = None
        self._finish(unit, pieces)
        self.streamer.waited_s += time.perf_counter() - start
        self.slot = slot
        for name, view in zip(unit.names, unit.staged[slot]):
            _assign(unit.module, name, view)
        following = self.following.get(id(unit)) if self.following is not None else None
        if following is not None:
            other = 1 - slot  # the module before this one has run: its buffer is free
            pieces = self._copy(following, other)
            self.streamer._pool.submit(pieces.work)
            self.pending = (following, other, pieces)

    def _learn(self, unit: _Unit) -> None:
        """The order of the first pass, each module once; known when the first comes again."""
        if self.following is not None:
            return
        if self.order and unit is self.order[0]:
            large = [u for u in self.order if not u.small]
            self.following = {id(u): large[(k + 1) % len(large)] for k, u in enumerate(large)}
        elif all(u is not unit for u in self.order):
            self.order.append(unit)

    def _copy(self, unit: _Unit, slot: int) -> _Pieces:
        """The copy of the unit's run of bytes into staging buffer `slot`, not started yet."""
        pieces = _Pieces(self.buffers[slot][:unit.nbytes], unit.source, MODULE_PIECE)
        pieces.after, self.last[slot] = self.last[slot], pieces
        return pieces

    def _finish(self, unit: _Unit, pieces: _Pieces) -> None:
        """Put in place here what of `pieces` the copy thread has not (finished), and count it."""
        pieces.finish()
        pieces.after = None  # (so the copies before it can go)
        streamer = self.streamer
        with streamer._lock:
            stats = streamer.stats[streamer.streamed[unit.layer]]
            stats.bytes += unit.nbytes
            stats.seconds += pieces.finished - pieces.started


def _nbytes(dtype: torch.dtype, shape: tuple) -> int:
    count = 1
    for size in shape:
        count *= size
    return count * torch.empty((), dtype=dtype).element_size()


def _staging_bytes(nbytes: int) -> torch.Tensor:
    with torch.inference_mode(False):  # a normal tensor: the copy thread writes it outside inference mode
        return own_bytes(nbytes)


# --- helpers ---------------------------------------------------------------------------


def _homes(slots: list[Slot]) -> list[Slot]:
    """The slots with each tensor as plain data of its own: the parameter object itself is
    pointed at each turn's device copy, and its tier copy must not follow it there."""
    return [(owner, name, tensor.detach()) for owner, name, tensor in slots]


def _slots(layer: nn.Module) -> list[Slot]:
    from vramancer.model.architecture import part_tensors

    return list(part_tensors([layer]))


def _assign(owner: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Point `owner.name` at `tensor` (a parameter keeps its identity; a quantized weight is
    replaced, as `.data =` would keep its inner tensors where they were)."""
    current = owner._parameters.get(name)
    if current is not None and (is_traceable_wrapper_subclass(current) or is_traceable_wrapper_subclass(tensor)):
        with torch.inference_mode(False):  # a turn runs inside generate's inference mode
            owner._parameters[name] = nn.Parameter(tensor, requires_grad=False)
    elif current is not None:
        current.data = tensor
    else:
        owner._buffers[name] = tensor


def _pinned(tensor: torch.Tensor) -> torch.Tensor:
    """A page-locked copy (an asynchronous copy to a GPU needs one), or the tensor as it is
    where it cannot be pinned (a quantized weight's own class)."""
    try:
        return tensor.detach().pin_memory()
    except (RuntimeError, NotImplementedError, TypeError):
        return tensor


def _pinned_bytes(nbytes: int) -> torch.Tensor:
    """`nbytes` of page-locked host memory (uint8), for asynchronous copies to a GPU."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if is_traceable_wrapper_subclass(tensor):
        return tensor.to(device)
    return tensor.to(device, non_blocking=tensor.is_pinned())


def _record_stream(tensor: torch.Tensor, stream) -> None:
    """Tell the caching allocator `stream` uses `tensor` (made on the side stream), so its
    memory is not handed out again before that stream is done with it."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        for name in names:
            inner = getattr(tensor, name)
            if inner is not None:
                _record_stream(inner, stream)
    elif tensor.device.type == "cuda":
        tensor.record_stream(stream)


SAFETENSORS_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                     "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                     "U8": torch.uint8, "BOOL": torch.bool}


def _map_safetensors(path: Path, keep: list) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a view into a private mapping of it: nothing is
    read until a tensor is. `keep` holds the mapping for as long as the views live."""
    import json

    with path.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
        region = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    keep.append(region)
    start = 8 + length
    views = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_TORCH[entry["dtype"]]
        low, high = entry["data_offsets"]
        count = (high - low) // torch.empty((), dtype=dtype).element_size()
        flat = torch.frombuffer(region, dtype=dtype, count=count, offset=start + low) if count else \
            torch.empty(0, dtype=dtype)
        views[name] = flat.view(entry["shape"])
    return views


# --- measuring a tier's rate -----------------------------------------------------------------


def measure_rate(tier: str, device: torch.device, folder: Path | None = None) -> float:
    """Bytes per second a copy of weights from `tier` onto `device` reaches, the way the
    streamer copies (from page-locked memory to a GPU, a memcpy elsewhere). The disk tier's
    probe file is written, dropped from the page cache and read back through a mapping, so
    the rate is the disk's, not the page cache's, where the system lets the pages go."""
    cuda = device.type == "cuda"
    source = torch.ones(PROBE_BYTES // 4, dtype=torch.float32)
    mappings: list = []
    if tier == DISK:
        from vramancer.config.paths import cache_root
        from vramancer.model.weights_cache import write_safetensors

        folder = folder or cache_root() / "disk-tier"
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="probe-", suffix=".safetensors", dir=folder)
        os.close(fd)
        path = Path(name)
        try:
            write_safetensors(path, {"probe": source})
            with path.open("rb") as f:
                os.fsync(f.fileno())
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            source = _map_safetensors(path, mappings)["probe"]
        finally:
            path.unlink(missing_ok=True)
    elif cuda and torch.cuda.is_available():
        source = source.pin_memory()
    best = float("inf")
    target = None if cuda else torch.empty_like(source)  # the CPU copies into a spare buffer
    # The disk is read once (a second read would come from the page cache); host memory's
    # best of three, past the first copy's page faults.
    for _ in range(1 if tier == DISK else 3):
        start = time.perf_counter()
        if cuda:
            copy = _to_device(source, device)
            torch.cuda.synchronize(device)
            del copy
        else:
            _Pieces(target.view(torch.uint8), source.view(torch.uint8)).work()
        best = min(best, time.perf_counter() - start)
    return PROBE_BYTES / max(best, 1e-9)
