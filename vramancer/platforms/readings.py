"""What a device reports: plain data, no torch, so the UI contract (engine/events.py) carries
readings without importing what makes them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class DeviceReading:
    """One look at a device. A field the device cannot give is None, never a guess."""

    total: int
    free: int
    utilization: float | None = None  # percent
    temperature: float | None = None  # degrees C
    power: float | None = None  # watts
    pcie_rx: float | None = None  # bytes/s
    pcie_tx: float | None = None  # bytes/s

    @property
    def used(self) -> int:
        return self.total - self.free


@dataclass(frozen=True)
class DeviceSnapshot:
    """One telemetry reading of one device, as plain data. None means the device cannot tell."""

    name: str
    kind: str
    label: str
    simulated: bool
    total: int
    free: int
    weights: int  # this model's weights here
    kv: int  # this model's KV cache here, as held right now
    other: int  # in use by someone else: other processes (a simulated squeeze on sim devices)
    utilization: float | None = None
    temperature: float | None = None
    power: float | None = None
    pcie_rx: float | None = None
    pcie_tx: float | None = None
    timestamp: float = field(default_factory=time.time)
    reserved: int = 0  # this model's, set aside and not yet used (KV room, workspace); a remote device's is in other

    @property
    def used(self) -> int:
        return self.total - self.free
