"""Weights left in a memory-mapped file, moved into the process's own memory.

transformers maps safetensors files (copy-on-write) and hands out tensors that point into
the mapping: our weights cache and a model folder's float32 or bfloat16 files load in a
fraction of a second that way. But on the CPU a decode step reads every weight once, and a
matmul over weights in a file's mapped pages measured 2-8 % slower than over the same bytes
in the process's own memory (the bundled model's projections, alternating in one process, on
the 2-core machine of this repository's CI), and the first answer paid the page faults.

So when a plan is applied, each such tensor of a part that stays on the CPU (a `cpu` or
simulated device; parts bound for a GPU are read straight from the mapping) is copied into
memory of its own, aligned and offered to the kernel for transparent huge pages where it
spans one (fewer page faults and TLB misses). The mapped pages it came from are released at
once (MADV_DONTNEED), so the peak resident memory stays about one copy of the weights, not
two. Only pages of files are released: they come back from the file unchanged if anything
reads them again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import sys

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass


def copy_mapped(slots: list[tuple[nn.Module, str, torch.Tensor]]) -> int:
    """Give every (owner, name, tensor) slot whose tensor lies in a memory-mapped file a copy
    in the process's own memory, releasing the mapped pages it was read from as it goes. A
    parameter keeps its identity (so tied weights stay tied); a buffer is replaced in its
    owner. Tensors already in ordinary memory are left alone, as is everything where the
    mappings cannot be read (not Linux). Returns the bytes copied."""
    regions = _file_mappings()
    copied = 0
    copies: dict[int, torch.Tensor] = {}  # by id of the original (`slots` keeps it alive)
    for owner, name, tensor in slots:
        own = copies.get(id(tensor))
        if own is None:
            start, nbytes = tensor.data_ptr(), tensor.numel() * tensor.element_size()
            if (tensor.device.type != "cpu" or not nbytes
                    or not any(low <= start and start + nbytes <= high for low, high in regions)):
                continue
            own = copies[id(tensor)] = own_copy(tensor.detach())
            copied += nbytes
            _release(start, nbytes)
        if isinstance(tensor, nn.Parameter):
            tensor.data = own  # every holder of the parameter sees it
        else:
            owner._buffers[name] = own
    return copied


HUGE_PAGE = 2 * 1024 * 1024


def own_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of a CPU tensor in the process's own memory. A plain tensor of a
    huge page or more gets memory of its own, aligned to 2 MiB and offered to the kernel for
    transparent huge pages (Linux's default `madvise` mode grants them only when asked):
    fewer page faults while copying, fewer TLB misses while reading it every decode step."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes < HUGE_PAGE or is_traceable_wrapper_subclass(tensor) or not _huge_pages_offered():
        return tensor.clone(memory_format=torch.contiguous_format)
    own = own_bytes(nbytes).view(tensor.dtype).view(tensor.shape)
    own.copy_(tensor)
    return own


def own_bytes(nbytes: int) -> torch.Tensor:
    """`nbytes` of uninitialised host memory (uint8), aligned to 2 MiB and offered to the
    kernel for transparent huge pages where it can be, else torch's own allocation."""
    if nbytes < HUGE_PAGE or not _huge_pages_offered():
        return torch.empty(nbytes, dtype=torch.uint8)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(region, dtype=torch.uint8)  # holds the region for as long as it lives
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start:start + nbytes]


def _huge_pages_offered() -> bool:
    return hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_ANONYMOUS")


def _file_mappings() -> list[tuple[int, int]]:
    """[start, end) of every mapping of a file in this process (Linux), else nothing. Only
    these are released: dropping a file's pages loses nothing (they come back from the file,
    or from the page cache), while dropping private anonymous memory would zero it."""
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return []
    regions = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/") and not fields[5].startswith("/dev/"):
            low, high = fields[0].split("-")
            regions.append((int(low, 16), int(high, 16)))
    return regions


def _release(address: int, nbytes: int) -> None:
    """Drop the whole pages inside [address, address + nbytes) from this process."""
    libc = _libc()
    page = mmap.PAGESIZE
    start = -(-address // page) * page
    end = (address + nbytes) // page * page
    if libc is not None and end > start:
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


@functools.cache
def _libc():
    """The C library, for `madvise` on an address (Python's mmap offers it only on its own
    mappings); None off Linux."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc
