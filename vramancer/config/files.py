"""Reading a user's file without hanging on it: a FIFO, a device or a folder is refused by its
type before a byte is read (opening a FIFO for reading waits for a writer, for ever; /dev/zero
never ends), and no file is read past a limit."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from vramancer.config.errors import VramancerError


def read_regular(path: str | os.PathLike, label: str, limit: int) -> bytes:
    """At most `limit` + 1 bytes of the regular file at `path` (the caller refuses the extra
    byte in its own words). `label` names the file in the refusals ("the token file")."""
    path = Path(path).expanduser()
    try:
        # O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer; it changes
        # nothing for a regular file.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise VramancerError(f"{label} {path} cannot be read: {exc.strerror or exc}.") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
        raise VramancerError(f"{label} {path} is {kind}, not a regular file; give a file.")
    with os.fdopen(fd, "rb") as f:
        try:
            return f.read(limit + 1)
        except OSError as exc:
            raise VramancerError(f"{label} {path} cannot be read: {exc.strerror or exc}.") from None
