"""The `--devices` grammar: what a user typed, as plain data, before any device is probed.

Kept apart from `devices.py` (which needs torch to probe and move tensors) so that a malformed
spec is refused in a tenth of a second, before torch is imported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vramancer.config.errors import VramancerError
from vramancer.config.units import parse_size


class DeviceSpecError(VramancerError):
    """The --devices text cannot be understood or names a device this machine lacks."""


@dataclass(frozen=True)
class DeviceRequest:
    """One entry of a parsed spec, before it is checked against the machine."""

    name: str  # "cuda:0", "mps", "cpu", "sim0"
    cap: int | None = None  # bytes; the capacity of a simulated device

    @property
    def kind(self) -> str:
        """The kind of device this request makes (see `devices.py`, which makes it)."""
        if self.name.startswith("sim"):
            return "sim"
        return self.name.split(":")[0]


@dataclass(frozen=True)
class DeviceSpec:
    requests: tuple[DeviceRequest, ...]
    auto: bool = False  # "auto": every accelerator found, else a simulated pool
    remotes: tuple[DeviceRequest, ...] = ()  # node:HOST:PORT/DEVICE entries, in the order given
    discover: bool = False  # "discover": every device of every node zeroconf finds

    @property
    def simulated(self) -> bool:
        return bool(self.requests) and self.requests[0].name.startswith("sim")

    @property
    def clustered(self) -> bool:
        """True when the spec reaches for devices on other machines."""
        return bool(self.remotes) or self.discover

    def local(self) -> "DeviceSpec":
        """The same spec without its remote devices."""
        return DeviceSpec(self.requests, self.auto)


# --- parsing ---------------------------------------------------------------------------

_REAL = re.compile(r"^(cuda(?::[0-9]+)?|mps|cpu)$", re.ASCII)
_COUNT = re.compile(r"^([0-9]+)x(.*)$", re.IGNORECASE | re.ASCII)


def parse_device_spec(text: str) -> DeviceSpec:
    """Parse `auto`, `cuda:0=10GiB,cpu`, `sim:3x2GiB` or `sim:4GiB,2GiB,1GiB`, optionally with
    remote devices (`node:HOST:PORT/DEVICE[=SIZE]`) and `discover` among the comma-separated
    items: `cuda:0,node:10.0.0.2:7070/cuda:0`, `sim:2x1GiB,node:127.0.0.1:7070/sim0,discover`.
    The local devices are what remains once those items are taken out."""
    from vramancer.config.validation import check_device_count

    if any(char.isspace() for char in text):
        shown = text if len(text) <= 40 else f"{text[:30]}…"
        raise DeviceSpecError(f"the device spec '{shown}' holds spaces; write it without them, e.g. sim:2x1GiB "
                              "or cuda:0=10GiB,cpu.")
    items = [item.strip() for item in text.split(",")]
    check_device_count(len(items))  # before any work that grows with the count
    if any(item.lower().startswith("node:") or item.lower() == "discover" for item in items):
        return _parse_clustered(items, text)
    if text in ("", "auto"):
        return DeviceSpec(requests=(), auto=True)
    if text.startswith("sim:"):
        return DeviceSpec(requests=_parse_sim_pool(text[4:]))
    requests: list[DeviceRequest] = []
    for item in text.split(","):
        name, _, cap_text = item.strip().partition("=")
        name = name.strip().lower()
        if name == "cuda":
            name = "cuda:0"
        if not _REAL.match(name):
            raise DeviceSpecError(
                f"'{item.strip()}' is not a device; use cuda:N, mps, cpu (each optionally =SIZE), "
                "auto, or a simulated pool like sim:3x2GiB."
            )
        cap = parse_size(cap_text) if cap_text else None
        if any(r.name == name for r in requests):
            raise DeviceSpecError(f"{name} is listed twice in '{text}'.")
        requests.append(DeviceRequest(name, cap))
    return DeviceSpec(requests=tuple(requests))


def node_label(host: str, port: int) -> str:
    """How a node is named everywhere: node:HOST:PORT (IPv6 hosts in brackets)."""
    shown = f"[{host}]" if ":" in host else host
    return f"node:{shown}:{port}"


def remote_device_name(host: str, port: int, device: str) -> str:
    return f"{node_label(host, port)}/{device}"


def split_remote_name(name: str) -> tuple[str, int, str]:
    """'node:HOST:PORT/DEV' → (host, port, dev), or DeviceSpecError with the expected form."""
    body = name[len("node:"):] if name.startswith("node:") else None
    location, slash, device = (body or "").partition("/")
    host, colon, port_text = location.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if body is None or not (slash and device and colon and host and port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise DeviceSpecError(f"'{name}' is not a remote device; write it node:HOST:PORT/DEVICE, e.g. node:127.0.0.1:7070/sim0.")
    return host, int(port_text), device


def _parse_clustered(items: list[str], text: str) -> DeviceSpec:
    remotes: list[DeviceRequest] = []
    local: list[str] = []
    discover = False
    for item in items:
        if item.lower() == "discover":
            discover = True
        elif item.lower().startswith("node:"):
            name, _, cap_text = item.partition("=")
            host, port, device = split_remote_name(name.strip())
            full = remote_device_name(host, port, device)
            if any(r.name == full for r in remotes):
                raise DeviceSpecError(f"{full} is listed twice in '{text}'.")
            remotes.append(DeviceRequest(full, parse_size(cap_text) if cap_text else None))
        elif item:
            local.append(item)
    base = parse_device_spec(",".join(local)) if local else DeviceSpec(requests=())
    return DeviceSpec(base.requests, base.auto, tuple(remotes), discover)


def _parse_sim_pool(body: str) -> tuple[DeviceRequest, ...]:
    from vramancer.config.validation import check_device_count

    sizes: list[int] = []
    for item in body.split(","):
        item = item.strip()
        count = 1
        counted = _COUNT.match(item)
        if counted:
            count, item = int(counted.group(1)), counted.group(2)
            if count < 1:
                raise DeviceSpecError(f"a simulated pool needs at least one device, not {count}.")
        check_device_count(len(sizes) + count)  # before a list of that many is built
        if not item:
            raise DeviceSpecError("each simulated device needs a size, as in sim:3x2GiB or sim:4GiB,1GiB.")
        sizes.extend([parse_size(item)] * count)
    return tuple(DeviceRequest(f"sim{i}", size) for i, size in enumerate(sizes))
