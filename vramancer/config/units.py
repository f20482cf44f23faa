"""Byte sizes: parsed in one place, formatted in one place."""

from __future__ import annotations

import re

from vramancer.config.errors import VramancerError

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4
MAX_SIZE = 1024**6  # 1 EiB: past any device, and still exact as an int64

_UNITS = {
    "": 1, "b": 1,
    "k": KiB, "kb": 1000, "kib": KiB,
    "m": MiB, "mb": 1000**2, "mib": MiB,
    "g": GiB, "gb": 1000**3, "gib": GiB,
    "t": TiB, "tb": 1000**4, "tib": TiB,
}
_SIZE = re.compile(r"^\s*([+-]?[0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$", re.ASCII)  # ASCII digits only


def parse_size(text: str) -> int:
    """'2GiB', '512MiB', '1.5G', '1000000' -> bytes. Refuses zero, negatives and unknown units."""
    match = _SIZE.match(text)
    if not match or match.group(2).lower() not in _UNITS:
        raise VramancerError(f"'{text}' is not a size; write it like 2GiB, 512MiB or 1.5GB.")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value <= 0:
        raise VramancerError(f"'{text}' is not a usable size; a size must be positive.")
    if value > MAX_SIZE:
        shown = text if len(text) <= 24 else f"{text[:12]}…{text[-8:]}"
        raise VramancerError(f"'{shown}' is larger than any device; a size must be at most 1024 PiB.")
    return int(value)


def format_bytes(n: float) -> str:
    """Binary units, three significant figures: 1.9 GiB, 210 MiB, 512 B."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            value = n / size
            text = f"{value:.1f}" if value < 100 else f"{value:.0f}"
            return f"{sign}{text} {unit}"
    return f"{sign}{int(n)} B"


def format_rate(bytes_per_s: float) -> str:
    """Link bandwidth in decimal GB/s, the unit PCIe and NVLink figures are quoted in."""
    return f"{bytes_per_s / 1e9:.2f} GB/s"
