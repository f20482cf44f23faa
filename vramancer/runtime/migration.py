"""Moving parts of a loaded model to other devices, live and all-or-nothing.

A migration moves a contiguous range of layers (or the `embed` / `head` parts) — weights and
their KV cache entries — to one device. `relocate` is the general form (any new placement);
re-planning uses it too. Room is checked first with the planner's memory model; if anything
fails part-way, every part already moved goes back and the ledgers and hooks are restored.

A layer moving to or from a device that is not `local` goes through the split's
`ExternalLayers` adapter (for a node: it places the weights from its own copy of the model,
the KV cache travels over the process group). The embeddings and the head stay on this
machine. A device lost part-way raises DeviceLost after the roll-back.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from vramancer.config.errors import VramancerError
from vramancer.config.units import format_bytes, format_rate
from vramancer.planning.placement import (
    EMBED,
    HEAD,
    Placement,
    part_label,
    parts_for_range,
    refusal_sentence,
    room_shortfall,
)
from vramancer.planning.tiers import TIER_ORDER, stream_refusal
from vramancer.platforms.devices import DeviceLost
from vramancer.runtime.split_model import SplitModel, move_module

Part = str | int


class MigrationRefused(VramancerError):
    """The move was not started: a bad range or device, or no room. Nothing changed."""


class MigrationFailed(VramancerError):
    """The move failed part-way and was rolled back. Nothing changed."""


@dataclass
class MigrationResult:
    first_layer: int | str
    last_layer: int | str
    src: str  # the source device, or several joined by "+"
    dst: str
    bytes: int
    seconds: float
    step: int | None = None

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    @property
    def label(self) -> str:
        return part_label(self.first_layer, self.last_layer)

    def describe(self) -> str:
        rate = format_rate(self.bytes / self.seconds) if self.seconds > 0 else "instant"
        return f"{self.label} {self.src} → {self.dst}: {format_bytes(self.bytes)} in {self.seconds * 1000:.1f} ms ({rate})"

    def to_json(self) -> dict:
        return {
            "first_layer": self.first_layer,
            "last_layer": self.last_layer,
            "src": self.src,
            "dst": self.dst,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 6),
            "gb_per_s": round(self.gb_per_s, 3),
            "step": self.step,
        }


_RANGE = re.compile(r"^\s*([0-9]+)\s*(?:-\s*([0-9]+))?\s*$", re.ASCII)  # ASCII digits only


def parse_range(text: str) -> tuple[int | str, int | str]:
    """'0-9' -> (0, 9); '7' -> (7, 7); 'embed' / 'head' -> (name, name)."""
    text = text.strip().lower()
    if text in (EMBED, HEAD):
        return text, text
    match = _RANGE.match(text)
    if not match:
        raise MigrationRefused(f"'{text}' is not a layer range; write A-B (e.g. 0-9), a single layer, embed or head.")
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) is not None else first
    return first, last


def parts_of(split: SplitModel, first: int | str, last: int | str) -> list[Part]:
    try:
        return parts_for_range(split.profile, first, last)
    except VramancerError as exc:
        raise MigrationRefused(str(exc)) from None


def check_room(split: SplitModel, new: Placement, what: str) -> None:
    """Refuse `new` if any device would need more than it has free (planner's memory model)."""
    assert split.placement is not None
    reserves = {name: d.reserve for name, d in split.devices.items()}
    free = {name: d.read().free for name, d in split.devices.items()}
    short = room_shortfall(split.profile, split.placement, new, reserves, free, split.context, split.streamed)
    if short is not None:
        raise MigrationRefused(refusal_sentence(what, *short, split.context))


def migrate(split: SplitModel, first: int | str, last: int | str, dst: str, cache=None) -> MigrationResult:
    """Move parts first..last (or embed/head) to `dst`, or refuse with nothing changed. A tier
    (host, disk) as `dst` keeps the layers' weights there: they stream to where they run."""
    if dst in TIER_ORDER and dst not in split.devices:
        return to_tier(split, first, last, dst)
    if dst not in split.devices:
        raise MigrationRefused(f"{dst} is not one of this model's devices ({', '.join(split.devices)}).")
    assert split.placement is not None
    parts = parts_of(split, first, last)
    if not split.is_local(dst) and any(part in (EMBED, HEAD) for part in parts):
        raise MigrationRefused(f"the {part_label(first, last)} stays on this machine; only decoder layers go to nodes.")
    if split.devices[dst].lost:
        raise MigrationRefused(f"{dst} is on a node that was lost.")
    sources = sorted({split.placement.device_of(p) for p in parts if split.placement.device_of(p) != dst})
    new = split.placement.moved(parts, dst)
    check_room(split, new, part_label(first, last))
    nbytes, seconds = relocate(split, new, cache)
    return MigrationResult(first, last, "+".join(sources) or dst, dst, nbytes, seconds)


def to_tier(split: SplitModel, first: int | str, last: int | str, tier: str) -> MigrationResult:
    """Layers first..last keep their weights in `tier` from now on and stream to the devices
    that run them (the dashboard's drop on a tier); refused, nothing changed, when they are
    not resident layers of this machine, the tier's cap is too small, or the staging room
    does not fit."""
    assert split.placement is not None
    what = part_label(first, last)
    parts = parts_of(split, first, last)
    if any(part in (EMBED, HEAD) for part in parts):
        raise MigrationRefused(f"only decoder layers stream from a tier; the {what} stays on a device.")
    if any(not split.is_local(split.placement.device_of(p)) for p in parts):
        raise MigrationRefused(f"{what} runs on another machine; only this machine's layers stream from its tiers.")
    reserves = {name: d.reserve for name, d in split.devices.items()}
    free = {name: d.read().free for name, d in split.devices.items()}
    refusal = stream_refusal(split.profile, split.placement, split.streamed, split.tier_caps, [int(p) for p in parts],
                             tier, reserves, free, split.context)
    if refusal is not None:
        raise MigrationRefused(refusal)
    layers = [int(p) for p in parts if int(p) not in split.streamed]
    adding = sum(split.profile.layer_bytes[i] for i in layers)
    sources = "+".join(sorted({split.placement.device_of(i) for i in layers}))
    start = time.perf_counter()
    split.stream(layers, tier)
    split.rewire()
    return MigrationResult(first, last, sources, tier, adding, time.perf_counter() - start)


def relocate(split: SplitModel, new: Placement, cache=None) -> tuple[int, float]:
    """Make `new` the placement: copy each part that changes device, with its KV cache.

    All or nothing: on any exception every part moved so far goes back, the ledgers and
    hooks are as before, and MigrationFailed is raised. Returns (bytes moved, seconds)."""
    assert split.placement is not None
    old = split.placement.copy()
    to_move = [p for p in split.profile.parts() if new.device_of(p) != old.device_of(p)]
    start = time.perf_counter()
    nbytes = 0
    try:
        split.sync_ledgers(new)  # claims room first; a simulated device refuses here
        together, alone = _by_link(split, to_move, new)
        for (_, dst), layers in together.items():
            for batch in _batches(split, layers):
                nbytes += split.move_layers(batch, dst, cache)
        for part in alone:
            nbytes += split.move(part, new.device_of(part), cache)
    except Exception as exc:
        moved = [p for p in to_move if split.placement.device_of(p) != old.device_of(p)]
        failed_back = _roll_back(split, old, moved, cache)
        lost = next((e for e in (exc, failed_back) if isinstance(e, DeviceLost)), None)
        if lost is not None:
            # A device went away: the placement is as before, but KV caches that were on the
            # move may be gone. The caller's generation rebuilds them (see engine/recovery).
            raise lost
        raise MigrationFailed(f"the move failed and was undone, nothing changed: {exc}") from exc
    split.settle_tie()
    split.rewire()
    return nbytes, time.perf_counter() - start


def _by_link(split: SplitModel, parts: list[Part], new: Placement) -> tuple[dict[tuple[str, str], list[int]], list[Part]]:
    """The layers that go between two of this machine's devices, by (source, destination),
    and the parts that move one by one (embed, head, streamed layers, another machine's).

    A link's layers move in one transfer (or a few: see MOVE_BATCH_BYTES). Each transfer lets
    go of the GIL while it copies, and taking it back waits for whichever thread took it
    meanwhile: with the dashboard drawing the move's "moving…" line on its thread, a 108 MiB
    block moved part by part took 1.5-3 times as long as from the command line, where no
    other thread wants the GIL."""
    assert split.placement is not None
    together: dict[tuple[str, str], list[int]] = {}
    alone: list[Part] = []
    for part in parts:
        src, dst = split.placement.device_of(part), new.device_of(part)
        if part in (EMBED, HEAD) or part in split.streamed or not (split.is_local(src) and split.is_local(dst)):
            alone.append(part)
        else:
            together.setdefault((src, dst), []).append(int(part))
    return together, alone


# The most weight bytes one transfer of layers copies: the old copies are let go only after
# it, so host memory briefly holds this much more (one layer's worth when a layer is larger).
MOVE_BATCH_BYTES = 256 * 2**20


def _batches(split: SplitModel, layers: list[int]) -> list[list[int]]:
    """`layers` in runs of at most MOVE_BATCH_BYTES of weights (at least one layer each)."""
    batches: list[list[int]] = []
    size = 0
    for layer in layers:
        weight = split.profile.layer_bytes[layer]
        if not batches or size + weight > MOVE_BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(layer)
        size += weight
    return batches


def _roll_back(split: SplitModel, old: Placement, moved: list[Part], cache) -> BaseException | None:
    """Put every moved part back. A part that cannot come back from a lost node keeps its
    place in `old` (weights from the host copy when that place is local); the first such
    failure is returned, the rest of the roll-back goes on."""
    failure = None
    for part in reversed(moved):
        here = split.placement.device_of(part)
        back = old.device_of(part)
        if split.external_between(here, back):
            try:
                split.external.move(int(part), here, back, cache)
            except Exception as exc:
                failure = failure or exc
                if split.is_local(back):
                    move_module(split.layer_modules[int(part)], split.devices[back].torch_device)
            split.placement = split.placement.moved([part], back)
            continue
        split.move(part, back, cache)
    split.placement = old
    split.sync_ledgers(old)
    split.settle_tie()
    split.rewire()
    return failure
