"""Remote nodes: devices of other machines, reached over torch.distributed.

`vramancer node` (node.py) serves a machine's devices; a coordinator names them
`node:HOST:PORT/DEVICE` in --devices, or finds them with zeroconf (discovery.py). Admission is
a challenge-response on the cluster token (protocol.py); then tensors go over a two-rank gloo
process group (client.py), layers held by a node run there (remote.py), and a node that goes
away mid-answer is replaced by the devices left (runtime/recovery.py, through DeviceLost).
"""

from __future__ import annotations

import logging

from vramancer.cluster.protocol import (
    AdmissionRefused,
    ClusterError,
    NodeLost,
    cluster_token,
)
from vramancer.config import settings
from vramancer.config.device_spec import DeviceSpecError, split_remote_name

log = logging.getLogger(__name__)

DISCOVER_BIND_ENV = "VRM_DISCOVER_BIND"
DISCOVER_SECONDS_ENV = "VRM_DISCOVER_SECONDS"


def discover_settings() -> tuple[str, float]:
    """(address, seconds) for `discover` in a device spec: VRM_DISCOVER_BIND (127.0.0.1) and
    VRM_DISCOVER_SECONDS (3)."""
    from vramancer.cluster.discovery import DEFAULT_DISCOVER_SECONDS

    from vramancer.config.validation import check_discover_seconds, env_float

    bind = settings.value("discover_bind") or "127.0.0.1"
    seconds = env_float("DISCOVER_SECONDS", DEFAULT_DISCOVER_SECONDS)  # ASCII digits, finite
    check_discover_seconds(seconds, settings.where("discover_seconds"))  # and a deadline: at most 600 s
    return bind, seconds


def connect_devices(spec, token_file: str | None = None) -> list:
    """Admit this coordinator to every node the spec names (or discovery finds) and return their
    devices, in the order named. One connection per node; all closed again if any fails."""
    from vramancer.cluster.client import NodeConnection, remote_devices

    token = cluster_token(token_file)
    wanted: dict[tuple[str, int], dict[str, int | None] | None] = {}
    for request in spec.remotes:
        host, port, device = split_remote_name(request.name)
        chosen = wanted.setdefault((host, port), {})
        if chosen is not None:
            chosen[device] = request.cap
    if spec.discover:
        from vramancer.cluster.discovery import discover

        bind, seconds = discover_settings()
        found = discover(seconds, bind)
        if not found:
            raise DeviceSpecError(f"no vramancer node answered on {bind} within {seconds:g} s; start one with "
                                  "`vramancer node`, or name nodes as node:HOST:PORT/DEVICE.")
        for advert in found:
            if (advert.host, advert.port) not in wanted:
                wanted[(advert.host, advert.port)] = None  # all its devices
    connections, devices = [], []
    try:
        for (host, port), names in wanted.items():
            node = NodeConnection(host, port, token).connect()
            connections.append(node)
            devices += remote_devices(node, names)
    except BaseException:
        for node in connections:
            node.close()
        raise
    return devices


__all__ = ["AdmissionRefused", "ClusterError", "NodeLost", "connect_devices", "discover_settings"]
