"""Moving tensors between devices, and measuring every link they cross.

Same device: nothing to do. CUDA to CUDA with peer access: a direct copy. CUDA to CUDA
without it, or host to CUDA: staged through a reusable pinned host buffer. Between simulated
devices (host memory under different names): a real copy, so the figures are measured, not
invented. Every move is timed with the devices synchronised and recorded on its link.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from vramancer.engine.devices import Device
from vramancer.engine.quantized import stored_bytes

RATE_WINDOW = 64  # transfers kept per link for the rolling GB/s
PINNED_LIMIT = 16 * 1024 * 1024  # hidden states and masks are far smaller than this


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
        self._lock = threading.Lock()

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
            staged = self._pinned_buffer(tensor)
            if staged is None:
                return tensor.to(dst_t)
            staged.copy_(tensor)
            return self._upload(staged, dst_t)
        if src_t.type == "cuda" and dst_t.type == "cpu" and tensor.numel() * tensor.element_size() <= PINNED_LIMIT:
            # Straight into page-locked memory (torch's caching host allocator reuses it): one
            # DMA at full speed, where a pageable destination runs at a fraction of it (H100:
            # 10.5 GB/s vs 47 GB/s for 8 MiB).
            out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            out.copy_(tensor, non_blocking=True)
            torch.cuda.current_stream(src_t).synchronize()
            return out
        return tensor.to(dst_t)

    @staticmethod
    def _upload(staged: torch.Tensor, dst: torch.device) -> torch.Tensor:
        out = staged.to(dst, non_blocking=True)
        # The staging buffer is reused by the next tensor of this size: wait for the copy.
        torch.cuda.current_stream(dst).synchronize()
        return out

    def _pinned_buffer(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """A pinned host buffer shaped like `tensor`, reused across decode steps; None for
        tensors too large to keep pinned (weights in a migration go the pageable way)."""
        if tensor.numel() * tensor.element_size() > PINNED_LIMIT:
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


def _synchronize(*devices: Device) -> None:
    for device in devices:
        if device.torch_device.type == "cuda":  # a remote CUDA device is host memory here
            torch.cuda.synchronize(device.torch_device)
