"""Automatic rebalancing: when something else takes a device's memory, move layers off it.

A device is under pressure when what the plan still needs there (KV cache not yet grown,
workspace, reserve) no longer fits in what is free. The answer is the smallest run of layers
at the edge of one of its blocks whose departure covers the deficit, moved by the ordinary
live-migration path to a device with room — preferably the neighbour that already holds the
adjacent layer, so no new hand-over appears.
"""

from __future__ import annotations

from dataclasses import dataclass

from vramancer.config.units import format_bytes
from vramancer.planning.placement import EMBED, HEAD, device_need
from vramancer.runtime.migration import MigrationRefused, MigrationResult


@dataclass(frozen=True)
class Pressure:
    device: str
    deficit: int  # bytes that must leave the device


def pressures(engine) -> list[Pressure]:
    """Devices whose memory no longer covers what the current plan needs of them."""
    found = []
    needs = engine.split.needs(engine.placement)
    kv_used = engine.kv_bytes_by_device()
    for device in engine.devices:
        need = needs[device.name]
        if need.total == 0:
            continue
        # Real memory already holds the weights and the KV cache grown so far; the rest of the
        # plan's claim must still fit in what is free (a simulated device counts its ledger).
        deficit = device.shortfall(need.total, need.weights + kv_used.get(device.name, 0))
        if deficit > 0:
            found.append(Pressure(device.name, deficit))
    return found


def relieve(engine, pressure: Pressure) -> MigrationResult | str:
    """Move the fewest edge layers that cover `pressure.deficit`; the result, or why not."""
    placement = engine.placement
    profile = engine.profile
    device = engine.device(pressure.device)
    layers_here = [i for i, d in enumerate(placement.layer_devices) if d == device.name]
    if not layers_here:
        return f"{device.name} is short of {format_bytes(pressure.deficit)} and holds no layers to move."
    options = []
    for block in placement.blocks():
        if block.device != device.name:
            continue
        # From the block's tail goes towards the part after it; from its head, the part before.
        for edge in ("tail", "head"):
            run = list(block.layers)[::-1] if edge == "tail" else list(block.layers)
            if edge == "tail":
                neighbour = HEAD if block.layers.last == profile.num_layers - 1 else block.layers.last + 1
            else:
                neighbour = EMBED if block.layers.first == 0 else block.layers.first - 1
            for count in range(1, len(run) + 1):
                moved = sorted(run[:count])
                remaining = [p for p in placement.parts_on(device.name) if p not in moved]
                saved = engine.split.needs(placement)[device.name].total - device_need(
                    profile, remaining, device.reserve, engine.context, engine.split.streamed).total
                if saved >= pressure.deficit:
                    options.append((count, moved, placement.device_of(neighbour)))
                    break
    options.sort(key=lambda o: o[0])
    # First choice: the neighbour's device, so the move adds no hand-over; then any with room.
    for count, moved, neighbour_device in options:
        if neighbour_device != device.name and engine.would_fit(moved[0], moved[-1], neighbour_device) is None:
            return engine.migrate(moved[0], moved[-1], neighbour_device)
    for count, moved, _ in options:
        for target in sorted((d for d in engine.devices if d.name != device.name), key=lambda d: -d.read().free):
            if engine.would_fit(moved[0], moved[-1], target.name) is None:
                return engine.migrate(moved[0], moved[-1], target.name)
    return (f"{device.name} is short of {format_bytes(pressure.deficit)} and no device has room "
            f"for the layers that would relieve it.")


def rebalance(engine) -> tuple[list[MigrationResult], list[str]]:
    """Relieve every device under pressure. Returns the moves made and, for pressure that
    nothing could relieve, why."""
    moves, warnings, stuck = [], [], set()
    for _ in range(len(engine.devices) * 4):  # bounded: each pass moves layers or gives up on a device
        found = [p for p in pressures(engine) if p.device not in stuck]
        if not found:
            break
        try:
            outcome = relieve(engine, found[0])
        except MigrationRefused as exc:
            outcome = str(exc)
        if isinstance(outcome, str):
            warnings.append(outcome)
            stuck.add(found[0].device)
        else:
            moves.append(outcome)
    return moves, warnings
