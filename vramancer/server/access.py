"""Who may reach the server, and where it listens: read without torch, so a bad key file or a
busy port is refused before anything heavy is imported."""

from __future__ import annotations

import ipaddress
import socket

from vramancer.config.errors import VramancerError
from vramancer.config.validation import read_secret_file

MAX_KEY_BYTES = 4096  # an API key is a short secret; never read more (/dev/zero, a big file)
BACKLOG = 2048


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or one sentence saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise VramancerError(f"--host {host} is not an address this machine can listen on ({exc.strerror}).") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise VramancerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}.") from None
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_api_key(path: str) -> bytes:
    """The API key in `path` (one line), read before anything loads."""
    return read_secret_file(path, "API key file", "an API key", "the key clients must send", MAX_KEY_BYTES)


