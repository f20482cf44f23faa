"""Devices: the spec a user types, what the machine has, and the bytes we put on each.

`parse_device_spec` is the only parser of `--devices` (remote names `node:HOST:PORT/DEVICE`
included). `resolve_devices` turns the local part of a spec into `Device` objects; devices of
other machines are opened by `engine/factory.py`. Every device keeps a `MemoryLedger` of what
this process placed on it; a simulated device is nothing but host memory plus that ledger,
which refuses any claim past the device's capacity.

`Device` is the one seam between the engine and a kind of device: each subclass answers every
per-kind question the engine asks (room, reserve, shortfall, snapshot, whether it may hold the
model's ends), so no caller branches on what kind it holds. The kind string is data for people
(JSON, the dashboard) and is compared only here.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import psutil
import torch

from vramancer.config.device_spec import (
    DeviceRequest,
    DeviceSpec,
    DeviceSpecError,
)
from vramancer.config.errors import VramancerError
from vramancer.config.units import format_bytes
from vramancer.planning.memory import CUDA_RESERVE
from vramancer.platforms.readings import DeviceReading, DeviceSnapshot

log = logging.getLogger(__name__)

LEDGER_CATEGORIES = ("weights", "kv", "workspace", "other")



class DeviceFullError(VramancerError):
    """A claim would take a device past its capacity."""


class DeviceLost(VramancerError):
    """A device went away while the engine depended on it (a node died or fell silent).

    The one loss signal: generation and migration handle it without knowing what was lost.
    `where` names what went (node:HOST:PORT); every device whose `host` it is, is gone."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"node {where} was lost: {reason}.")
        self.where = where
        self.reason = reason


@dataclass
class MemoryLedger:
    """Bytes this process holds on one device, by category, with an optional hard cap."""

    capacity: int | None = None
    claims: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LEDGER_CATEGORIES, 0))
    device_name: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def total(self) -> int:
        return sum(self.claims.values())

    def set(self, category: str, nbytes: int, force: bool = False) -> None:
        """Set one category's claim (see `set_many`)."""
        self.set_many({category: nbytes}, force=force)

    def set_many(self, claims: dict[str, int], force: bool = False) -> None:
        """Set several claims at once; refuses (and changes nothing) if the total would pass
        the cap. A change that does not grow the total is always allowed, so an over-committed
        device can still give memory back.

        `force` is for memory taken by someone else (another process), who does not ask us:
        the device may then be over-committed, which is what rebalancing answers."""
        with self._lock:
            after = self.total + sum(n - self.claims[c] for c, n in claims.items())
            if not force and self.capacity is not None and after > self.capacity and after > self.total:
                raise DeviceFullError(
                    f"{self.device_name} cannot hold {format_bytes(after)}; "
                    f"its capacity is {format_bytes(self.capacity)}."
                )
            self.claims.update(claims)


@dataclass(eq=False)
class Device:
    """A place layers can live. Subclasses: this machine's CPU, CUDA and MPS devices, a
    simulated device in host memory, and (cluster/) a device of another machine."""

    name: str
    kind: str  # "cuda" | "mps" | "cpu" | "sim": for people and JSON; behaviour is the subclass's
    label: str  # GPU model name, "CPU", or "simulated"
    torch_device: torch.device
    ledger: MemoryLedger
    cap: int | None = None
    index: int | None = None  # CUDA ordinal

    # Bytes kept free that no tensor of ours accounts for (a CUDA context, allocator slack).
    reserve: ClassVar[int] = 0
    # True for a device that only takes what the others cannot hold (the CPU beside accelerators).
    last_resort: ClassVar[bool] = False
    # True while the device's tensors live in this process: it can hold the embeddings and the
    # head, and its layers run here. A device of another machine holds decoder layers only.
    local: ClassVar[bool] = True

    @property
    def simulated(self) -> bool:
        return False

    @property
    def host(self) -> str | None:
        """The machine holding the device (node:HOST:PORT); None for this machine's devices."""
        return None

    @property
    def lost(self) -> bool:
        """True once the device has gone away (only another machine's can)."""
        return False

    def mark_lost(self, reason: str) -> None:
        """Take note that the device went away; this machine's devices never do."""

    def close(self) -> None:
        """Let go of whatever connection the device needs; this machine's need none."""

    def watch(self, on_lost: Callable[[str, str], None] | None) -> None:
        """Have `on_lost(where, reason)` called (on any thread) if the device goes away;
        None stops it. This machine's devices never go."""

    def read(self) -> DeviceReading:
        """Total and free memory now (free as this process could still use it)."""
        reading = self._read_hardware()
        if self.cap is not None:
            # A cap makes the device look this size to us: free is what is left of the cap,
            # and never more than the hardware has.
            reading.total = min(reading.total, self.cap)
            reading.free = max(0, min(reading.free, self.cap - self.ledger.total))
        return reading

    def _read_hardware(self) -> DeviceReading:
        raise NotImplementedError

    def room(self) -> int:
        """Bytes this model could hold here: free now plus what the model already holds."""
        return self.read().free + self.ledger.total - self.ledger.claims["other"]

    def shortfall(self, planned: int, held: int) -> int:
        """Bytes that must leave this device: what the plan still needs here beyond what it
        already holds (`planned - held`), less what is free. Positive means pressure."""
        return planned - held - self.read().free

    def squeeze(self, nbytes: int) -> None:
        """Take `nbytes` as another process would (for tests and demos)."""
        raise VramancerError(f"{self.name} is a real device; only simulated devices can be squeezed.")

    def reported_kv(self) -> int | None:
        """KV cache bytes as the device's own machine reports them; None where this process
        counts them itself from the cache it holds."""
        return None

    def snapshot(self, kv_bytes: int = 0) -> DeviceSnapshot:
        """One reading; `kv_bytes` is the KV cache this model holds here now."""
        reading = self.read()
        claims = self.ledger.claims
        weights = claims["weights"]
        beyond = max(reading.used - weights - kv_bytes, 0)
        # Of the rest, what this model set aside and has not filled yet (KV room, workspace) is
        # ours; whatever remains belongs to other processes (or a simulated squeeze).
        reserved = min(max(claims["kv"] + claims["workspace"] - kv_bytes, 0), beyond)
        return DeviceSnapshot(
            name=self.name, kind=self.kind, label=self.label, simulated=self.simulated,
            total=reading.total, free=reading.free, weights=weights, kv=kv_bytes,
            other=beyond - reserved, reserved=reserved,
            utilization=reading.utilization, temperature=reading.temperature, power=reading.power,
            pcie_rx=reading.pcie_rx, pcie_tx=reading.pcie_tx,
        )

    def to_json(self) -> dict:
        reading = self.read()
        return {
            "name": self.name,
            "kind": self.kind,
            "label": self.label,
            "simulated": self.simulated,
            "total_bytes": reading.total,
            "free_bytes": reading.free,
            "cap_bytes": self.cap,
            "remote": not self.local,
            "host": self.host,
        }


@dataclass(eq=False)
class CpuDevice(Device):
    """This machine's CPU and its memory, as psutil sees them."""

    last_resort: ClassVar[bool] = True

    def _read_hardware(self) -> DeviceReading:
        vm = psutil.virtual_memory()
        return DeviceReading(total=vm.total, free=vm.available, utilization=psutil.cpu_percent(None))


@dataclass(eq=False)
class CudaDevice(Device):
    """An NVIDIA (or ROCm) GPU: NVML where it answers, else torch.cuda.mem_get_info."""

    reserve: ClassVar[int] = CUDA_RESERVE

    def _read_hardware(self) -> DeviceReading:
        return _read_cuda(self.index or 0)


@dataclass(eq=False)
class MpsDevice(Device):
    """An Apple GPU: unified memory, so its total is the machine's."""

    def _read_hardware(self) -> DeviceReading:
        total = psutil.virtual_memory().total
        used = torch.mps.driver_allocated_memory()
        return DeviceReading(total=total, free=max(total - used, 0))


@dataclass(eq=False)
class SimulatedDevice(Device):
    """Host memory with a hard capacity enforced by exact byte accounting."""

    @property
    def simulated(self) -> bool:
        return True

    def read(self) -> DeviceReading:
        assert self.cap is not None
        return DeviceReading(total=self.cap, free=max(self.cap - self.ledger.total, 0))

    def room(self) -> int:
        return (self.cap or 0) - self.ledger.claims["other"]

    def shortfall(self, planned: int, held: int) -> int:
        # The ledger is the device: everything claimed, squeezes included, against the cap.
        return self.ledger.total - (self.cap or 0)

    def squeeze(self, nbytes: int) -> None:
        if nbytes < 0:
            raise VramancerError(f"a reservation must be 0 bytes or more, not {nbytes}.")
        self.ledger.set("other", nbytes, force=True)


_KINDS: dict[str, type[Device]] = {"cpu": CpuDevice, "cuda": CudaDevice, "mps": MpsDevice, "sim": SimulatedDevice}


def kind_class(kind: str) -> type[Device]:
    """The class of this machine's devices of `kind`: where the facts of a kind live (a
    device of another machine takes its reserve and last-resort facts from here)."""
    return _KINDS.get(kind, CpuDevice)


def close_devices(devices: list[Device]) -> None:
    """Let go of every device's connection (nodes release what they held for us)."""
    for device in devices:
        device.close()


# --- probing ---------------------------------------------------------------------------


def resolve_devices(spec: DeviceSpec, simulated_size: int | None = None) -> list[Device]:
    """Check the local part of a spec against this machine and build its devices.

    `simulated_size` sizes each of the two simulated devices that `auto` falls back to on a
    machine without accelerators; the caller derives it from the model's footprint. Devices of
    other machines are not opened here: `engine/factory.open_devices` does both.
    """
    return _resolve_local(spec, simulated_size) if (spec.requests or spec.auto) else []


def _resolve_local(spec: DeviceSpec, simulated_size: int | None) -> list[Device]:
    requests = spec.requests
    if spec.auto:
        requests = tuple(DeviceRequest(name) for name in _accelerator_names())
        if not requests:
            if simulated_size is None:
                raise DeviceSpecError("no accelerator was found and no simulated pool size was given.")
            requests = (DeviceRequest("sim0", simulated_size), DeviceRequest("sim1", simulated_size))
    return [_make_device(r) for r in requests]


def _accelerator_names() -> list[str]:
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return ["mps"]
    return []


def _make_device(request: DeviceRequest) -> Device:
    name, cap = request.name, request.cap
    ledger = MemoryLedger(capacity=cap, device_name=name)
    if name.startswith("sim"):
        return SimulatedDevice(name, "sim", "simulated", torch.device("cpu"), ledger, cap=cap)
    if name == "cpu":
        return CpuDevice(name, "cpu", "CPU", torch.device("cpu"), ledger, cap=cap)
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DeviceSpecError("mps is not available: this machine has no Apple GPU that torch can use.")
        return MpsDevice(name, "mps", "Apple GPU", torch.device("mps"), ledger, cap=cap)
    index = int(name.split(":")[1])
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        have = "no CUDA devices" if count == 0 else f"{count} CUDA device(s), cuda:0 to cuda:{count - 1}"
        raise DeviceSpecError(f"{name} is not available: this machine has {have}.")
    label = torch.cuda.get_device_name(index)
    return CudaDevice(name, "cuda", label, torch.device("cuda", index), ledger, cap=cap, index=index)


# --- NVML ------------------------------------------------------------------------------

_nvml_state: dict[str, object] = {"ready": None}
_nvml_lock = threading.Lock()


def _nvml():
    """The pynvml module once initialised, or None (logged once) where NVML is missing."""
    with _nvml_lock:
        if _nvml_state["ready"] is None:
            try:
                import pynvml

                pynvml.nvmlInit()
                _nvml_state["ready"] = pynvml
            except Exception as exc:  # no driver, no library, no permission
                log.info("NVML unavailable (%s); using torch.cuda.mem_get_info instead.", exc)
                _nvml_state["ready"] = False
        return _nvml_state["ready"] or None


def _nvml_handle(nvml, index: int):
    """NVML's handle for torch's cuda:index (NVML numbers devices without CUDA_VISIBLE_DEVICES):
    by PCI bus id, else by UUID, else by index. The PCI fields are missing from some torch
    builds' device properties, which must not cost the whole reading."""
    props = torch.cuda.get_device_properties(index)
    try:
        bus_id = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        return nvml.nvmlDeviceGetHandleByPciBusId(bus_id)
    except Exception:
        pass
    try:
        return nvml.nvmlDeviceGetHandleByUUID(f"GPU-{props.uuid}")
    except Exception:
        return nvml.nvmlDeviceGetHandleByIndex(index)


def _read_cuda(index: int) -> DeviceReading:
    nvml = _nvml()
    if nvml is not None:
        try:
            handle = _nvml_handle(nvml, index)
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            reading = DeviceReading(total=int(mem.total), free=int(mem.free))
            reading.utilization = _optional(lambda: float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu))
            reading.temperature = _optional(
                lambda: float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
            )
            reading.power = _optional(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)
            # NVML reports PCIe throughput in KB/s.
            reading.pcie_rx = _optional(
                lambda: nvml.nvmlDeviceGetPcieThroughput(handle, nvml.NVML_PCIE_UTIL_RX_BYTES) * 1024.0
            )
            reading.pcie_tx = _optional(
                lambda: nvml.nvmlDeviceGetPcieThroughput(handle, nvml.NVML_PCIE_UTIL_TX_BYTES) * 1024.0
            )
            return reading
        except Exception as exc:
            _log_once(f"NVML reading of cuda:{index} failed ({exc}); using torch.cuda.mem_get_info.")
    free, total = torch.cuda.mem_get_info(index)
    return DeviceReading(total=int(total), free=int(free))


def _optional(read):
    try:
        return read()
    except Exception:
        return None


_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.warning(message)
