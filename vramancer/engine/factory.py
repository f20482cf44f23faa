"""The one place outside cluster/ that knows devices of other machines exist.

Like vLLM's executor factory, this module alone imports cluster/ (lazily, so a run on
this machine's devices never loads it): it opens the devices a spec names, attaches the
adapter that places, runs and moves layers on another machine's devices, times them, and
serves or finds nodes for the command line. Everything else asks a `Device` what it needs
to know, and handles one loss signal, `DeviceLost`.
"""

from __future__ import annotations

from vramancer.config.device_spec import DeviceSpec
from vramancer.platforms.devices import Device, close_devices, resolve_devices
from vramancer.runtime.split_model import SplitModel


def open_devices(spec: DeviceSpec, simulated_size: int | None = None, token_file: str | None = None) -> list[Device]:
    """Every device `spec` names: this machine's first, then those of the nodes it names (or
    that discovery finds), admitted with the cluster token from `token_file` or
    VRM_CLUSTER_TOKEN. The caller lets them go with `close_devices`."""
    devices = resolve_devices(spec, simulated_size)
    if spec.clustered:
        from vramancer.cluster import connect_devices

        try:
            devices += connect_devices(spec, token_file)
        except BaseException:
            close_devices(devices)
            raise
    return devices


def attach_external_layers(split: SplitModel, source, dtype, config) -> None:
    """Give `split` the adapter for its devices that are not local (nodes load the model
    `source` names from their own disks). Nothing to do when every device is local."""
    if all(device.local for device in split.devices.values()):
        return
    from vramancer.cluster.node import architecture
    from vramancer.cluster.remote import RemoteBlocks, model_reference

    split.external = RemoteBlocks(split, model_reference(source), dtype, architecture(config))


def add_external_timings(timings, config, local: list[Device], external: list[Device], dtype, model_key: str,
                         source) -> None:
    """Fill `timings` with the devices of other machines and every link that touches one."""
    if not external:
        return
    from vramancer.cluster.remote import model_reference
    from vramancer.cluster.timing import add_remote_timings

    add_remote_timings(timings, config, local, external, dtype, model_key, model_reference(source))


def discover_nodes(seconds: float, bind: str) -> list:
    """The nodes zeroconf finds on `bind` within `seconds` (their adverts)."""
    from vramancer.cluster.discovery import discover

    return discover(seconds, bind)


def serve_node(devices_text: str, bind: str, port: int, token_file: str | None, advertise: bool, ready,
               lease_s: float | None = None) -> int:
    """Serve this machine's devices to a coordinator until stopped (`vramancer node`)."""
    from vramancer.cluster.node import run_node

    from vramancer.cluster.protocol import DEFAULT_LEASE_S

    return run_node(devices_text, bind, port, token_file, advertise=advertise, ready=ready,
                    lease_s=DEFAULT_LEASE_S if lease_s is None else lease_s)
