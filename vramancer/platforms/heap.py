"""The C heap's free pages handed back to the system (glibc's `malloc_trim`).

Loading converts each weight a few tens of MB at a time; every chunk's float rows and
temporaries are freed once converted, but glibc keeps freed blocks of up to 32 MiB in its
heap, where the converted values that stay split them into holes it cannot reuse: a 0.5B
model's q4 load held 0.8 GB of such holes, and a 152k-token embedding table's q8 conversion
2.2 GB. Trimming after each chunk and each tensor keeps resident memory at what stays plus
one chunk in flight."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


def give_back_freed_memory() -> None:
    """Return the heap's free pages to the system; nothing to do where the C library is not glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc: nothing to ask
