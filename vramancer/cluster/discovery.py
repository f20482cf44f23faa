"""Finding nodes with zeroconf (mDNS service `_vramancer._tcp.local.`).

A node advertises one service whose TXT record holds `host`, `port`, `devices` (its device
names with sizes, "sim0=1.0 GiB;sim1=1.0 GiB") and `version`. The advertisement carries no
secret: it says where a node is, and admission still needs the cluster token.

mDNS runs only on the address given (the node's --bind, the coordinator's --discover-bind;
both default to 127.0.0.1). zeroconf's own listening socket is bound to the mDNS group address
rather than to every address, so a loopback-only node receives nothing from the network.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

from vramancer.cluster.protocol import PROTOCOL_VERSION, SERVICE_TYPE, ClusterError
from vramancer.config.device_spec import node_label

log = logging.getLogger(__name__)

MDNS_GROUP = "224.0.0.251"
DEFAULT_DISCOVER_SECONDS = 3.0
_construct_lock = threading.Lock()


@dataclass(frozen=True)
class NodeAdvert:
    """One node as zeroconf saw it."""

    host: str
    port: int
    devices: tuple[tuple[str, str], ...]  # (name, size as shown) as advertised
    version: int = PROTOCOL_VERSION

    @property
    def label(self) -> str:
        return node_label(self.host, self.port)

    def device_names(self) -> list[str]:
        return [f"{self.label}/{name}" for name, _ in self.devices]

    def properties(self) -> dict[str, str]:
        return {
            "host": self.host,
            "port": str(self.port),
            "devices": ";".join(f"{name}={size}" for name, size in self.devices),
            "version": str(self.version),
        }

    def instance_name(self) -> str:
        safe = self.host.replace(".", "-").replace(":", "-")
        return f"vramancer-{safe}-{self.port}.{SERVICE_TYPE}"


def parse_properties(properties: dict) -> NodeAdvert:
    """A NodeAdvert from a TXT record (bytes or str keys and values); ClusterError if unusable."""
    text = {}
    for key, value in properties.items():
        key = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
        if value is None:
            continue
        text[key] = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    host, port_text = text.get("host", ""), text.get("port", "")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ClusterError(f"an advertisement without a usable host and port: {text!r}.")
    devices = []
    for item in filter(None, (part.strip() for part in text.get("devices", "").split(";"))):
        name, _, size = item.partition("=")
        if name.strip():
            devices.append((name.strip(), size.strip()))
    version = int(text["version"]) if text.get("version", "").isdigit() else 0
    return NodeAdvert(host, int(port_text), tuple(devices), version)


@contextmanager
def _group_bound_listen_socket():
    """While a Zeroconf is built, bind its shared multicast socket to the mDNS group address
    instead of 0.0.0.0, so it receives the group's datagrams only on the interfaces that joined
    it. Falls back to zeroconf's default (logged) if its internals have changed."""
    try:
        import zeroconf._utils.net as znet

        original_listen, new_socket = znet.new_listen_socket, znet.new_socket
    except (ImportError, AttributeError):
        log.warning("zeroconf's socket helpers moved; its multicast socket listens on 0.0.0.0:5353.")
        yield
        return

    def group_listen(ip_version=None, apple_p2p: bool = False):
        return new_socket(bind_addr=(MDNS_GROUP,), ip_version=ip_version, apple_p2p=apple_p2p)

    with _construct_lock:
        znet.new_listen_socket = group_listen
        try:
            yield
        finally:
            znet.new_listen_socket = original_listen


def open_zeroconf(address: str):
    """A Zeroconf instance on one IPv4 address (or every interface for 0.0.0.0)."""
    from zeroconf import InterfaceChoice, IPVersion, Zeroconf

    if address in ("0.0.0.0", ""):
        return Zeroconf(interfaces=InterfaceChoice.All, ip_version=IPVersion.V4Only)
    try:
        socket.inet_aton(address)
    except OSError:
        raise ClusterError(f"zeroconf needs an IPv4 address to run on, not '{address}'.") from None
    with _group_bound_listen_socket():
        return Zeroconf(interfaces=[address], ip_version=IPVersion.V4Only)


class Advertiser:
    """Registers a node's service on start, withdraws it on close."""

    def __init__(self, advert: NodeAdvert, bind: str):
        self.advert = advert
        self.bind = bind
        self._zeroconf = None
        self._info = None

    def start(self) -> None:
        from zeroconf import ServiceInfo

        addresses = [self.advert.host] if self.bind not in ("0.0.0.0", "") else _host_addresses()
        self._zeroconf = open_zeroconf(self.bind)
        self._info = ServiceInfo(
            SERVICE_TYPE,
            self.advert.instance_name(),
            addresses=[socket.inet_aton(a) for a in addresses],
            port=self.advert.port,
            properties=self.advert.properties(),
            server=f"vramancer-{self.advert.port}-{socket.gethostname()}.local.",
        )
        self._zeroconf.register_service(self._info, allow_name_change=True)

    def close(self) -> None:
        if self._zeroconf is None:
            return
        try:
            self._zeroconf.unregister_service(self._info)
        except Exception as exc:  # closing anyway
            log.debug("withdrawing the advertisement failed: %s", exc)
        self._zeroconf.close()
        self._zeroconf = None


def discover(seconds: float = DEFAULT_DISCOVER_SECONDS, bind: str = "127.0.0.1") -> list[NodeAdvert]:
    """Every node that answers on `bind` within `seconds`, sorted by host and port."""
    from zeroconf import ServiceBrowser

    found: dict[str, NodeAdvert] = {}
    lock = threading.Lock()
    zc = open_zeroconf(bind)

    class Listener:
        def add_service(self, zc_, type_, name):
            self._resolve(zc_, type_, name)

        def update_service(self, zc_, type_, name):
            self._resolve(zc_, type_, name)

        def remove_service(self, zc_, type_, name):
            with lock:
                found.pop(name, None)

        def _resolve(self, zc_, type_, name):
            info = zc_.get_service_info(type_, name, timeout=int(max(seconds, 0.5) * 1000))
            if info is None:
                return
            try:
                advert = parse_properties(info.properties or {})
            except ClusterError as exc:
                log.info("ignoring %s: %s", name, exc)
                return
            addresses = info.parsed_addresses()
            if not _is_ipv4(advert.host) and addresses:
                # A node bound to every interface names its host; reach it where mDNS found it.
                advert = NodeAdvert(addresses[0], advert.port, advert.devices, advert.version)
            with lock:
                found[name] = advert

    browser = ServiceBrowser(zc, SERVICE_TYPE, listener=Listener())
    try:
        time.sleep(max(seconds, 0.0))
    finally:
        browser.cancel()
        zc.close()
    with lock:
        adverts = {(a.host, a.port): a for a in found.values()}
    return [adverts[key] for key in sorted(adverts)]


def _is_ipv4(text: str) -> bool:
    try:
        socket.inet_aton(text)
    except OSError:
        return False
    return text.count(".") == 3


def _host_addresses() -> list[str]:
    """This machine's IPv4 addresses, for a node bound to 0.0.0.0."""
    import psutil

    addresses = []
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family == socket.AF_INET:
                addresses.append(entry.address)
    return addresses or ["127.0.0.1"]
