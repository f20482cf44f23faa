"""Timings of remote devices and of the links to them, for predictions and the profiled planner.

A node times its own devices the way the profiler times local ones (one layer at decode and
prefill shapes), and the links between its devices. The link between this machine and a node
is timed here with echoes over the process group: a hidden-state-sized round trip (half of it
per direction) and a 4 MiB one for bandwidth. Two nodes talk through the coordinator, so a
link between them costs both legs.
"""

from __future__ import annotations

from vramancer.planning.pricing import DeviceTimings, LinkTimings, Timings

SMALL_ROUNDS, BIG_ROUNDS = 20, 3
BIG_NUMEL = 1 << 20  # float32 values: 4 MiB


def add_remote_timings(timings: Timings, config, local: list, remote: list, dtype, model_key: str, model_ref: str) -> None:
    """Fill `timings` in place with every remote device and every link that touches one."""
    from vramancer.cluster.client import LOAD_TIMEOUT_S

    dtype_name = str(dtype).removeprefix("torch.")
    to_node: dict[str, LinkTimings] = {}
    by_node: dict[int, list] = {}
    for device in remote:
        by_node.setdefault(id(device.node), []).append(device)
    for devices in by_node.values():
        node = devices[0].node
        reply = node.request("profile", timeout=LOAD_TIMEOUT_S, model=model_ref, dtype=dtype_name, model_key=model_key)
        for device in devices:
            timings.devices[device.name] = DeviceTimings(**reply["timings"][device.remote_name])
        for a in devices:
            for b in devices:
                if a is not b:
                    timings.links[(a.name, b.name)] = LinkTimings(**reply["links"][f"{a.remote_name}>{b.remote_name}"])
        small = node.echo(config.hidden_size, SMALL_ROUNDS)
        big = node.echo(BIG_NUMEL, BIG_ROUNDS)
        link = LinkTimings(latency_s=small / 2, bytes_per_s=2 * BIG_NUMEL * 4 / big)
        for device in devices:
            to_node[device.name] = link
            for other in local:
                timings.links[(other.name, device.name)] = link
                timings.links[(device.name, other.name)] = link
    for a in remote:
        for b in remote:
            if a.node is not b.node:
                la, lb = to_node[a.name], to_node[b.name]
                timings.links[(a.name, b.name)] = LinkTimings(la.latency_s + lb.latency_s,
                                                              1 / (1 / la.bytes_per_s + 1 / lb.bytes_per_s))
