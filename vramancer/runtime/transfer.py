"""Moving tensors between devices, and measuring every link they cross.

Same device: nothing to do. CUDA to CUDA with peer access: a direct copy. CUDA to CUDA
without it, or host to CUDA: staged through a reusable pinned host buffer. Between simulated
devices (host memory under different names): a real copy, so the figures are measured, not
invented; a part's tensors are copied together, in one call (see `_copy_together`). Every move
is timed with the devices synchronised and recorded on its link.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from vramancer.platforms.devices import Device
from vramancer.quantization.weights import stored_bytes

RATE_WINDOW = 64  # transfers kept per link for the rolling GB/s
PINNED_LIMIT = 16 * 1024 * 1024  # hidden states and masks are far smaller than this
# Tensors above this go between host and GPU in chunks through two pinned buffers, the host's
# memcpy of one chunk overlapping the DMA of the other: one staged copy ran at 0.28 of the
# pinned bound on an H200 (8 MiB, 13.4 GB/s), the memcpy and the DMA taking turns.
CHUNKED_ABOVE = 1024 * 1024
CHUNK = 2 * 1024 * 1024


@dataclass
class LinkStats:
    src: str
    dst: str
    transfers: int = 0
    bytes: int = 0
    seconds: float = 0.0
    recent: deque = field(default_factory=lambda: deque(maxlen=RATE_WINDOW))  # (bytes, seconds)

    def record(self, nbytes: int, seconds: float) -> None:
        self.transfers += 1
        self.bytes += nbytes
        self.seconds += seconds
        self.recent.append((nbytes, seconds))

    @property
    def rolling_bytes_per_s(self) -> float:
        """Bytes per second over the last RATE_WINDOW transfers."""
        nbytes = sum(b for b, _ in self.recent)
        seconds = sum(s for _, s in self.recent)
        return nbytes / seconds if seconds > 0 else 0.0

    def to_json(self) -> dict:
        return {
            "src": self.src,
            "dst": self.dst,
            "transfers": self.transfers,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 6),
            "gb_per_s": round(self.rolling_bytes_per_s / 1e9, 3),
        }


class TransferManager:
    """Moves tensors (or tuples/lists/dicts of them) from one device to another."""

    def __init__(self, devices: list[Device]):
        self.devices = {d.name: d for d in devices}
        self.links: dict[tuple[str, str], LinkStats] = {}
        self._pinned: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self._chunk_buffers: list[torch.Tensor] = []  # two pinned CHUNK-byte buffers, made on first use
        self._lock = threading.Lock()
        self._staging = threading.Lock()  # one chunked copy at a time owns the two buffers

    def add_device(self, device: Device) -> None:
        self.devices[device.name] = device

    def move(self, value, src: str, dst: str, *, record: bool = True):
        """Return `value` with every tensor in it on `dst`; records one transfer on src→dst."""
        if src == dst:
            return value
        source, target = self.devices[src], self.devices[dst]
        _synchronize(source, target)
        start = time.perf_counter()
        moved, nbytes = self._move_tree(value, source, target)
        _synchronize(source, target)
        seconds = time.perf_counter() - start
        if record and nbytes:
            self.record(src, dst, nbytes, seconds)
        return moved

    def record(self, src: str, dst: str, nbytes: int, seconds: float) -> None:
        with self._lock:
            link = self.links.get((src, dst))
            if link is None:
                link = self.links[(src, dst)] = LinkStats(src, dst)
            link.record(nbytes, seconds)

    def link_stats(self) -> list[LinkStats]:
        with self._lock:
            return list(self.links.values())

    def _move_tree(self, value, source: Device, target: Device) -> tuple[object, int]:
        if _plain_tensors(value) and source.torch_device == target.torch_device:
            return type(value)(_copy_together(value)), sum(_nbytes(t) for t in value)
        if isinstance(value, torch.Tensor):
            return self.copy_tensor(value, source, target), stored_bytes(value)
        if isinstance(value, (tuple, list)):
            items = [self._move_tree(v, source, target) for v in value]
            return type(value)(v for v, _ in items), sum(n for _, n in items)
        if isinstance(value, dict):
            items = {k: self._move_tree(v, source, target) for k, v in value.items()}
            return {k: v for k, (v, _) in items.items()}, sum(n for _, n in items.values())
        return value, 0

    def copy_tensor(self, tensor: torch.Tensor, source: Device, target: Device) -> torch.Tensor:
        """One tensor onto `target`'s memory, by the cheapest real path."""
        src_t, dst_t = source.torch_device, target.torch_device
        if src_t == dst_t:
            # Two names for the same memory (simulated devices, or a device and its cap):
            # still a real copy, so that what is measured is what would move.
            return tensor.clone()
        if is_traceable_wrapper_subclass(tensor):
            # A quantized weight (several inner tensors): its own `.to` moves each of them; a
            # plain staging buffer cannot take one with `copy_`.
            return tensor.to(dst_t)
        if src_t.type == "cuda" and dst_t.type == "cuda":
            if torch.cuda.can_device_access_peer(src_t.index, dst_t.index):
                return tensor.to(dst_t, non_blocking=True)
            staged = self._pinned_buffer(tensor)
            if staged is None:
                return tensor.to("cpu").to(dst_t)
            staged.copy_(tensor, non_blocking=True)
            torch.cuda.current_stream(src_t).synchronize()
            return self._upload(staged, dst_t)
        if src_t.type == "cpu" and dst_t.type == "cuda":
            if _nbytes(tensor) > CHUNKED_ABOVE:
                return self._upload_in_chunks(tensor, dst_t)
            staged = self._pinned_buffer(tensor)  # a hand-over's few KiB: one pinned buffer, reused
            staged.copy_(tensor)
            return self._upload(staged, dst_t)
        if src_t.type == "cuda" and dst_t.type == "cpu" and _nbytes(tensor) > PINNED_LIMIT:
            return self._download_in_chunks(tensor, src_t)  # weights in a migration: into pageable memory
        if src_t.type == "cuda" and dst_t.type == "cpu":
            # Straight into page-locked memory (torch's caching host allocator reuses it): one
            # DMA at full speed, where a pageable destination runs at a fraction of it (H100:
            # 10.5 GB/s vs 47 GB/s for 8 MiB).
            out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            out.copy_(tensor, non_blocking=True)
            torch.cuda.current_stream(src_t).synchronize()
            return out
        return tensor.to(dst_t)

    def _chunk_pair(self) -> list[torch.Tensor]:
        if not self._chunk_buffers:
            with torch.inference_mode(False):  # reused by later migrations (see _pinned_buffer)
                self._chunk_buffers = [torch.empty(CHUNK, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        return self._chunk_buffers

    def _upload_in_chunks(self, tensor: torch.Tensor, dst: torch.device) -> torch.Tensor:
        """Host → GPU: the host copies chunk i into one pinned buffer while the GPU pulls
        chunk i - 1 from the other."""
        out = torch.empty(tensor.shape, dtype=tensor.dtype, device=dst)
        source, target = _bytes_of(tensor.contiguous()), _bytes_of(out)
        stream = torch.cuda.current_stream(dst)
        with self._staging:
            buffers, done = self._chunk_pair(), [None, None]
            for i, start in enumerate(range(0, source.numel(), CHUNK)):
                size = min(CHUNK, source.numel() - start)
                buffer = buffers[i % 2]
                if done[i % 2] is not None:
                    done[i % 2].synchronize()  # the DMA out of this buffer (chunk i - 2) is over
                buffer[:size].copy_(source[start:start + size])
                target[start:start + size].copy_(buffer[:size], non_blocking=True)
                done[i % 2] = torch.cuda.Event()
                done[i % 2].record(stream)
            stream.synchronize()
        return out

    def _download_in_chunks(self, tensor: torch.Tensor, src: torch.device) -> torch.Tensor:
        """GPU → host: the GPU pushes chunk i into one pinned buffer while the host copies
        chunk i - 1 out of the other."""
        out = torch.empty(tensor.shape, dtype=tensor.dtype)
        source, target = _bytes_of(tensor.contiguous()), _bytes_of(out)
        stream = torch.cuda.current_stream(src)
        with self._staging:
            buffers = self._chunk_pair()
            pending = None  # (buffer, its DMA's event, start, size) of the chunk before
            for i, start in enumerate(range(0, source.numel(), CHUNK)):
                size = min(CHUNK, source.numel() - start)
                buffer = buffers[i % 2]
                buffer[:size].copy_(source[start:start + size], non_blocking=True)
                arrived = torch.cuda.Event()
                arrived.record(stream)
                if pending is not None:
                    _drain(pending, target)
                pending = (buffer, arrived, start, size)
            if pending is not None:
                _drain(pending, target)
        return out

    @staticmethod
    def _upload(staged: torch.Tensor, dst: torch.device) -> torch.Tensor:
        out = staged.to(dst, non_blocking=True)
        # The staging buffer is reused by the next tensor of this size: wait for the copy.
        torch.cuda.current_stream(dst).synchronize()
        return out

    def _pinned_buffer(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """A pinned host buffer shaped like `tensor`, reused across decode steps; None for
        tensors too large to keep pinned (weights in a migration go the pageable way)."""
        if _nbytes(tensor) > PINNED_LIMIT:
            return None
        key = (tensor.numel(), tensor.dtype)
        buffer = self._pinned.get(key)
        if buffer is None:
            # A normal tensor even when made during generate (inference mode): an inference
            # tensor could not be written to by a migration between generations, and a decode
            # step's hidden state has the very size and dtype of a norm weight.
            with torch.inference_mode(False):
                buffer = torch.empty(tensor.numel(), dtype=tensor.dtype, pin_memory=True)
            self._pinned[key] = buffer
        return buffer.view(tensor.shape)


def _plain_tensors(value) -> bool:
    """A list or tuple of two or more plain tensors (a part's weights, a layer's KV cache)."""
    return (isinstance(value, (list, tuple)) and len(value) > 1
            and all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in value))


def _copy_together(tensors) -> list[torch.Tensor]:
    """Copies of `tensors` (same memory: two names for the host's) in one call.

    Each call lets go of the GIL while it copies, and taking it back waits for whichever thread
    took it meanwhile (the dashboard drawing on its thread): copied one by one, a block of
    layers moved several times slower from the dashboard than from the command line. Each
    copy keeps its own allocation: one buffer for a whole block is fresh memory from the
    system at every move, and its page faults cost more than the copy (108 MiB: about 70 ms
    against 15 ms here)."""
    copies = [torch.empty_like(t) for t in tensors]
    torch._foreach_copy_(copies, [t.detach() for t in tensors])
    return copies


def _synchronize(*devices: Device) -> None:
    for device in devices:
        if device.torch_device.type == "cuda":  # a remote CUDA device is host memory here
            torch.cuda.synchronize(device.torch_device)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's memory as a flat uint8 view."""
    return tensor.detach().reshape(-1).view(torch.uint8)


def _drain(pending, target: torch.Tensor) -> None:
    buffer, arrived, start, size = pending
    arrived.synchronize()
    target[start:start + size].copy_(buffer[:size])
