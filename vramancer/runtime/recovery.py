"""When a device goes away mid-answer: re-place its layers on the devices left.

The lost layers go to the devices left (the neighbours of the lost block first, then whichever
has room), with their weights from the host copies this machine kept. Their KV cache died
with the device; the generate loop (scheduling/generation.py) rebuilds it by replaying the prompt
and the tokens so far. Only devices of other machines can be lost, but nothing here knows
about machines: a device says whether it is lost, and the split's external adapter adopts
the layers that move.
"""

from __future__ import annotations

from vramancer.config.errors import VramancerError
from vramancer.config.units import format_bytes
from vramancer.planning.placement import (
    LayerRange,
    Placement,
    Plan,
    device_needs,
    room_shortfall,
)
from vramancer.platforms.devices import DeviceLost


class NoRoomAfterLoss(VramancerError):
    """A device was lost and the devices left cannot hold its layers."""


def mark_lost(engine, lost: DeviceLost) -> None:
    """Every device on what `lost` names is gone (its host may not have noticed yet)."""
    for device in engine.devices:
        if device.host == lost.where:
            device.mark_lost(lost.reason)


def recover_lost_devices(engine, replay_tokens: int | None = None) -> bool:
    """Re-place the layers of every lost device on the devices left. True if any moved; raises
    NoRoomAfterLoss (the engine unchanged, still usable) when they do not fit."""
    for _ in range(len(engine.devices) + 1):  # each round loses one more device, or ends
        try:
            return _recover_once(engine, replay_tokens)
        except DeviceLost as again:  # a device we were moving layers to went too
            mark_lost(engine, again)
    raise NoRoomAfterLoss("every node was lost while the layers were being re-placed.")


def _recover_once(engine, replay_tokens: int | None) -> bool:
    split = engine.split
    placement = split.placement
    dead = {d.name for d in engine.devices if d.lost}
    layers = [i for i, name in enumerate(placement.layer_devices) if name in dead]
    if not layers:
        return False
    nodes = sorted({d.host for d in engine.devices if d.name in dead and placement.parts_on(d.name)})
    label = layer_ranges(layers)
    new = rehome(engine, placement, layers)
    if new is None:
        live = [d for d in engine.devices if not d.lost]
        free = ", ".join(f"{d.name} {format_bytes(d.read().free)}" for d in live)
        raise NoRoomAfterLoss(
            f"{' and '.join(nodes)} {'were' if len(nodes) > 1 else 'was'} lost and its layers {label} fit on none "
            f"of the devices left (free: {free}); free memory or add a node, then ask again."
        )
    split.sync_ledgers(new)
    try:
        split.external.adopt(new, layers)
    except BaseException:
        split.sync_ledgers(placement)
        raise
    split.placement = new
    split.rewire()
    engine.plan = Plan(new.copy(), engine.plan.strategy, engine.context,
                       device_needs(split.profile, new, engine.devices, engine.context),
                       {d.name: d.room() for d in engine.devices})
    homes = sorted({new.layer_devices[i] for i in layers})
    rebuild = (f"; rebuilding the KV cache from the prompt and the {replay_tokens} tokens so far"
               if replay_tokens is not None else "")
    engine.report_fault(f"{label} of lost {' and '.join(nodes)} now on {', '.join(homes)}{rebuild}.",
                        node=" ".join(nodes), layers=label, recovered=True)
    return True


def rehome(engine, placement: Placement, layers: list[int]) -> Placement | None:
    """`placement` with `layers` on live devices that have room for them, or None. A run of lost
    layers goes whole to one device if it can (a neighbour's first), else layer by layer."""
    live = [d for d in engine.devices if not d.lost]
    reserves = {d.name: d.reserve for d in live}
    free = {d.name: d.read().free for d in live}
    profile, context = engine.profile, engine.context
    proposed = placement.copy()

    def fits(trial: Placement) -> bool:
        return room_shortfall(profile, placement, trial, reserves, free, context) is None

    for run in _runs(layers):
        before = placement.device_of(run[0] - 1) if run[0] > 0 else placement.embed
        after = placement.device_of(run[-1] + 1) if run[-1] + 1 < len(placement.layer_devices) else placement.head
        options = [n for n in (before, after) if n in reserves]
        options += [n for n in sorted(reserves, key=lambda n: -free[n]) if n not in options]
        for name in options:
            trial = proposed.moved(run, name)
            if fits(trial):
                proposed = trial
                break
        else:
            for index in run:
                for name in options:
                    trial = proposed.moved([index], name)
                    if fits(trial):
                        proposed = trial
                        break
                else:
                    return None
    return proposed


def _runs(layers: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for index in sorted(layers):
        if runs and runs[-1][-1] == index - 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


def layer_ranges(layers: list[int]) -> str:
    """'L0–3, L7' for layers [0, 1, 2, 3, 7]."""
    return ", ".join(str(LayerRange(run[0], run[-1])) for run in _runs(layers))


__all__ = ["NoRoomAfterLoss", "layer_ranges", "mark_lost", "recover_lost_devices", "rehome"]
