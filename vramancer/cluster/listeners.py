"""A node's listening sockets beyond its own port: open only while a session forms, and then
only to that session's peer.

Forming a session opens two listeners: the rendezvous store's (ours) and gloo's, which its
device opens for the pairs of the process group. A socket filter (Linux's classic BPF, on
the packet's source address) makes each drop every connection attempt that does not come
from the admitted coordinator's address; once the group has formed, both are closed. Gloo
keeps the descriptor of its listener and offers no way to close it: pointing that
descriptor at /dev/null closes the socket underneath while the number stays valid for gloo
to close when the group goes (the store's listener is closed the same way, see
cluster/node.py). Elsewhere than on Linux the filters are not available and the listeners
stay open until the group goes.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
import struct
import sys
import threading
from typing import Callable, TypeVar

T = TypeVar("T")

SO_ATTACH_FILTER = 26  # Linux's socket option number
NET_OFFSET = -0x100000  # SKF_NET_OFF: loads relative to the network (IP) header
# Classic BPF opcodes: load a 32-bit word at an absolute offset, jump if equal, return.
LOAD_WORD, JUMP_IF_EQUAL, RETURN = 0x20, 0x15, 0x06
ACCEPT, DROP = 0xFFFFFFFF, 0
# Whoever opens listeners in this process does it under this lock, so the ones a call opened
# are told apart from another thread's (a coordinator and a node in one process, as in tests).
_OPENING = threading.Lock()


def filters_work() -> bool:
    return sys.platform.startswith("linux")


def listening_descriptors() -> set[int]:
    """The descriptors of this process's listening TCP sockets (empty where they cannot be read)."""
    if not filters_work():
        return set()
    import psutil

    return {c.fd for c in psutil.Process().net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.fd >= 0}


def opened_by(open_them: Callable[[], T]) -> tuple[T, set[int]]:
    """What `open_them()` returns, and the descriptors of the listeners it opened."""
    with _OPENING:
        before = listening_descriptors()
        result = open_them()
        return result, listening_descriptors() - before


def only_from(descriptor: int, address: str) -> None:
    """Drop every packet reaching the socket `descriptor` whose source is not `address` (so a
    listener accepts nobody else: their connection attempts time out)."""
    if not filters_work():
        return
    peer = ipaddress.ip_address(address.split("%")[0])
    if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
        peer = peer.ipv4_mapped  # a dual-stack socket sees such a peer's packets as IPv4
    # The source address: bytes 12-15 of an IPv4 header, 8-23 of an IPv6 one.
    start = 12 if peer.version == 4 else 8
    words = struct.unpack(f"!{len(peer.packed) // 4}I", peer.packed)
    program = []
    for index, word in enumerate(words):
        remaining = len(words) - index - 1
        program += [(LOAD_WORD, 0, 0, (NET_OFFSET + start + 4 * index) & 0xFFFFFFFF),
                    (JUMP_IF_EQUAL, 0, 2 * remaining + 1, word)]  # not equal: on to DROP
    program += [(RETURN, 0, 0, ACCEPT), (RETURN, 0, 0, DROP)]
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *step) for step in program))
    fprog = struct.pack("HL", len(program), ctypes.addressof(code))  # struct sock_fprog
    sock = socket.socket(fileno=os.dup(descriptor))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    finally:
        sock.close()  # our duplicate only: the filter stays on the socket


def hang_up_on(address: str, keep_port: int) -> int:
    """Shut down every connection of this process with `address` but those on `keep_port`
    (the node's own port, where a new coordinator may be saying hello): what a process group
    whose peer went silent is left waiting on. Returns how many were shut."""
    if not filters_work():
        return 0
    import psutil

    shut = 0
    for connection in psutil.Process().net_connections(kind="tcp"):
        if (connection.status == psutil.CONN_ESTABLISHED and connection.raddr and connection.fd >= 0
                and connection.raddr.ip == address and connection.laddr.port != keep_port):
            sock = socket.socket(fileno=os.dup(connection.fd))
            try:
                sock.shutdown(socket.SHUT_RDWR)  # the owner's reads end; it closes its descriptor itself
                shut += 1
            except OSError:
                pass
            finally:
                sock.close()
    return shut


def close_underneath(descriptor: int) -> None:
    """Close the socket behind `descriptor`, leaving the number open (on /dev/null) for its
    owner to close later."""
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(null, descriptor)
    finally:
        os.close(null)
