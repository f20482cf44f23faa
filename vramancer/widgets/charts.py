"""Text charts shared by the panels: a sparkline on a fixed scale.

Textual's Sparkline scales between the smallest and largest value it is given, which makes a
steady memory reading look like a wild swing. Memory is drawn against the device's size and
bandwidth against its peak, so the height of a bar means the same thing from one frame to the next.
"""

from __future__ import annotations

from statistics import median
from typing import Sequence

BARS = "▁▂▃▄▅▆▇█"


def spark(values: Sequence[float], top: float, width: int) -> str:
    """The last `width` values as bars, 0 → lowest bar, `top` → full bar; empty space pads left."""
    if width <= 0:
        return ""
    recent = list(values)[-width:]
    if top <= 0:
        top = max(recent, default=0.0) or 1.0
    bars = []
    for value in recent:
        share = min(max(value / top, 0.0), 1.0)
        bars.append(BARS[min(int(share * (len(BARS) - 1) + 0.5), len(BARS) - 1)])
    return " " * (width - len(bars)) + "".join(bars)


def time_axis_s(gaps: Sequence[float], cells: int) -> float:
    """Seconds a graph `cells` readings wide stands for: the cells times the usual gap between
    readings (the median, so a reading taken out of turn, after a plan change, does not move it).
    Like a monitor's time axis it is this wide from the first readings on, filling from the
    right, so the stated window does not change (and redraw) every second while it fills."""
    return median(gaps) * cells if gaps and cells > 0 else 0.0
