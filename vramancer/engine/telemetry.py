"""Device and link telemetry: a sampler thread and ring buffers of recent readings.

Every device is read the best way it can be: NVML (memory, utilisation, temperature, power,
PCIe) for NVIDIA GPUs, torch.cuda.mem_get_info when NVML is missing, psutil for the CPU, and
byte accounts for simulated devices. What a device cannot tell stays None.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable

from vramancer.engine.events import (
    DeviceSample,
    DeviceSnapshot,
    LinkSample,
    LinkSnapshot,
)

log = logging.getLogger(__name__)

DEFAULT_HZ = 2.0
DEFAULT_HISTORY = 240  # two minutes at 2 Hz


class Telemetry:
    """Samples the engine's devices and links on a thread; keeps the last `history` of each.

    `source()` returns (devices, link stats, kv bytes by device) or None while nothing is
    loaded, and, after them, the tiers' snapshots where layers stream; `emit` receives
    DeviceSample and LinkSample events."""

    def __init__(
        self,
        source: Callable[[], tuple | None],
        emit: Callable[[object], None],
        hz: float = DEFAULT_HZ,
        history: int = DEFAULT_HISTORY,
    ):
        if hz <= 0:
            raise ValueError("telemetry rate must be positive")
        self.source = source
        self.emit = emit
        self.interval = 1.0 / hz
        self.devices: dict[str, deque[DeviceSnapshot]] = {}
        self.links: dict[tuple[str, str], deque[LinkSnapshot]] = {}
        self._history = history
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vramancer-telemetry", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def sample(self) -> tuple[DeviceSample, LinkSample] | None:
        """Take one sample now, record it, and return the two events (also used by tests)."""
        state = self.source()
        if state is None:
            return None
        devices, links, kv, *rest = state
        tiers = tuple(rest[0]) if rest else ()
        # Each device reads itself: hardware, byte accounts, or (another machine's) its own report.
        snaps = tuple(d.snapshot(kv.get(d.name, 0)) for d in devices)
        link_snaps = tuple(
            LinkSnapshot(l.src, l.dst, l.transfers, l.bytes, l.seconds, l.rolling_bytes_per_s / 1e9) for l in links
        )
        with self._lock:
            for snap in snaps:
                self.devices.setdefault(snap.name, deque(maxlen=self._history)).append(snap)
            for snap in link_snaps:
                self.links.setdefault((snap.src, snap.dst), deque(maxlen=self._history)).append(snap)
        return DeviceSample(snaps, tiers), LinkSample(link_snaps)

    def history(self) -> dict:
        """All kept samples as plain data, for `export metrics`."""
        with self._lock:
            return {
                "devices": {name: [s.__dict__ for s in ring] for name, ring in self.devices.items()},
                "links": {f"{a}->{b}": [s.__dict__ for s in ring] for (a, b), ring in self.links.items()},
            }

    def _run(self) -> None:
        failed_once = False
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                events = self.sample()
                if events is not None:
                    for event in events:
                        self.emit(event)
            except Exception as exc:  # a bad reading must never kill the sampler
                if not failed_once:
                    log.warning("telemetry sample failed: %s", exc)
                    failed_once = True
            # Wait out the rest of the interval; a stop wakes us at once.
            self._stop.wait(max(self.interval - (time.monotonic() - started), 0.0))
