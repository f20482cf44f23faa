"""Host and disk tiers: where the weights of layers that fit on no device wait for their turn.

A tier computes nothing. A layer kept in a tier still runs on a computing device (the
placement's device for it): its weights are copied there just before its turn, the copy of
the next one overlapping its compute, and dropped after; its KV cache stays on that device.
So a streamed layer costs its device its KV cache and staging room, not its weights, and
costs every decode step its bytes over the tier→device link.

The planner streams as few layers as it can: the last k of the stack, k the smallest that
lets the rest fit, computed on the device where a decode step costs least — the slower of
compute and the copies, max(predicted step, bytes streamed ÷ measured tier→device rate),
since the copies overlap the compute. Plain data and arithmetic: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

from vramancer.config.units import format_bytes
from vramancer.planning.placement import (
    Placement,
    Plan,
    PlanError,
    Pricing,
    device_need,
    device_needs,
    make_plan,
)

if TYPE_CHECKING:
    from vramancer.planning.placement import ModelProfile
    from vramancer.platforms.devices import Device

HOST, DISK = "host", "disk"
NEAR = 1.05  # predicted steps this close are a tie, which the fewer bytes streamed break
TIER_ORDER = (HOST, DISK)  # the host tier fills first: it is the faster of the two


@dataclass(frozen=True)
class Tier:
    """A place that holds weights but computes nothing, with its cap and measured rates."""

    name: str  # host | disk
    capacity: int  # bytes of weights it may hold
    bytes_per_s: Mapping[str, float]  # measured copy rate from the tier to each computing device

    def rate_to(self, device: str) -> float:
        """The measured rate to `device`; for a device not measured, the slowest measured one
        (never an optimistic guess); with nothing measured at all, 1 GB/s."""
        rates = [r for r in self.bytes_per_s.values() if r > 0]
        return self.bytes_per_s.get(device) or (min(rates) if rates else 1e9)

    def to_json(self) -> dict:
        return {"tier": self.name, "capacity": self.capacity,
                "gb_per_s": {name: round(rate / 1e9, 3) for name, rate in self.bytes_per_s.items()}}


@dataclass(frozen=True)
class StreamCost:
    """What streaming costs a decode step."""

    bytes_per_token: int  # every streamed layer's weights cross once per step
    stream_s: float  # those copies at the measured tier→device rates
    step_s: float  # the predicted step: compute and copies overlap, so the slower of the two
    tier_bytes: Mapping[str, int]  # what each tier holds

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.step_s if self.step_s > 0 else 0.0

    def to_json(self) -> dict:
        return {"bytes_streamed_per_token": self.bytes_per_token, "predicted_stream_ms": round(self.stream_s * 1000, 3),
                "tier_bytes": dict(self.tier_bytes)}


def tier_bytes(profile: ModelProfile, streamed: Mapping[int, str]) -> dict[str, int]:
    held = {name: 0 for name in TIER_ORDER}
    for layer, tier in streamed.items():
        held[tier] = held.get(tier, 0) + profile.layer_bytes[layer]
    return held


def stream_cost(profile: ModelProfile, placement: Placement, streamed: Mapping[int, str],
                tiers: Sequence[Tier], compute_step_s: float) -> StreamCost:
    """The cost of streaming `streamed` to the devices `placement` gives them, beside a
    compute step of `compute_step_s` (the pricing's prediction for the same placement)."""
    by_name = {t.name: t for t in tiers}
    stream_s = sum(profile.layer_bytes[layer] / by_name[tier].rate_to(placement.layer_devices[layer])
                   for layer, tier in streamed.items())
    total = sum(profile.layer_bytes[layer] for layer in streamed)
    return StreamCost(total, stream_s, max(compute_step_s, stream_s), tier_bytes(profile, streamed))


def assign_tiers(profile: ModelProfile, layers: Sequence[int], tiers: Sequence[Tier]) -> dict[int, str] | None:
    """Each of `layers` to a tier, the host tier first, within their caps; None if they do not fit."""
    free = {t.name: t.capacity for t in sorted(tiers, key=lambda t: TIER_ORDER.index(t.name))}
    streamed = {}
    for layer in layers:
        size = profile.layer_bytes[layer]
        tier = next((name for name, left in free.items() if left >= size), None)
        if tier is None:
            return None
        free[tier] -= size
        streamed[layer] = tier
    return streamed


class _LessRoom:
    """A device seen with `minus` bytes less room: the planner keeps staging room free on it."""

    def __init__(self, device: Device, minus: int):
        self._device, self._minus = device, minus

    def __getattr__(self, name):
        return getattr(self._device, name)

    def room(self) -> int:
        return max(self._device.room() - self._minus, 0)


def plan_with_tiers(profile: ModelProfile, devices: Sequence[Device], strategy: str, context: int,
                    tiers: Sequence[Tier] = (), pricing: Pricing | None = None) -> Plan:
    """A plan on `devices` alone when the model fits them; else one that keeps the fewest
    layers it can in `tiers`, each run by the device where it costs least; else PlanError,
    the devices' refusal with what the tiers could hold."""
    try:
        return make_plan(profile, devices, strategy, context, pricing)
    except PlanError as refusal:
        tiers = [t for t in tiers if t.capacity > 0]
        if not tiers or not all(d.local for d in devices):
            raise
        found = _stream_fewest(profile, devices, strategy, context, tiers, pricing)
        if found is None:
            caps = ", ".join(f"{t.name} tier {format_bytes(t.capacity)}" for t in tiers)
            sentence = str(refusal).rstrip(".")
            raise PlanError(f"{sentence.split('; use ')[0]}; {caps}; even with the tiers it does not fit: "
                            f"use larger tiers (--host-tier, --disk-tier), more or larger devices, "
                            f"or a shorter --context.") from None
        return found


def _stream_fewest(profile: ModelProfile, devices: Sequence[Device], strategy: str, context: int,
                   tiers: Sequence[Tier], pricing: Pricing | None) -> Plan | None:
    """For each device that could run the streamed layers, the fewest it needs streamed;
    of those, the plan whose step costs least."""
    n = profile.num_layers
    capacity = sum(t.capacity for t in tiers)
    options = []
    for runner in devices:
        for k in range(1, n + 1):
            layers = list(range(n - k, n))
            streamed = assign_tiers(profile, layers, tiers) \
                if sum(profile.layer_bytes[i] for i in layers) <= capacity else None
            if streamed is None:
                break  # more layers would not fit the tiers either
            found = _stream_on(profile, devices, strategy, context, tiers, pricing, streamed, runner)
            if found is not None:
                options.append(found)
                break
    if not options:
        return None
    # Within NEAR of the fastest prediction, the fewest bytes streamed: copies that the
    # prediction says compute hides still take memory bandwidth from it on a CPU.
    fastest = min(key[0] for key, _ in options)
    near = [(key, plan) for key, plan in options if key[0] <= fastest * NEAR]
    return min(near, key=lambda o: (sum(profile.layer_bytes[i] for i in o[1].streamed), o[0][1]))[1]


def _stream_on(profile: ModelProfile, devices: Sequence[Device], strategy: str, context: int,
               tiers: Sequence[Tier], pricing: Pricing | None, streamed: dict[int, str],
               runner: Device) -> tuple[tuple[float, int], Plan] | None:
    """((predicted step seconds, hand-overs), plan) with the layers of `streamed` (the last k) run on
    `runner`, or None. The first n-k layers, the embeddings and the head are planned by the
    strategy as a shorter model, on devices where `runner` keeps room for the streamed layers'
    staging and KV cache (and its workspace, tried both ways: it may hold none of its own)."""
    from dataclasses import replace

    n, k = profile.num_layers, len(streamed)
    rooms = {d.name: d.room() for d in devices}
    sizes = sorted((profile.layer_bytes[i] for i in streamed), reverse=True)
    kept = sum(sizes[:2]) + sum(profile.kv_bytes(i, context) for i in streamed)
    workspace = device_need(profile, [n - 1], runner.reserve, context).workspace
    placements = []
    if k == n:
        ends = [(runner.name, runner.name)] + [(e.name, h.name) for e in devices for h in devices]
        placements = [Placement([runner.name] * n, embed=e, head=h) for e, h in ends]
    else:
        shorter = replace(profile, num_layers=n - k, layer_bytes=profile.layer_bytes[:n - k],
                          layer_caches=profile.layer_caches[:n - k])
        # A tied head is planned as its norm alone and then put beside the embeddings, where its
        # weight is theirs: the strategies place it last, where it would need a copy of its own.
        untied = replace(shorter, head_bytes=shorter.head_bytes - shorter.tied_bytes, tied_bytes=0)
        for extra in (kept, kept + workspace):
            seen = [_LessRoom(d, extra) if d is runner else d for d in devices]
            for model, beside in ((shorter, False),) + (((untied, True),) if profile.tied_bytes else ()):
                try:
                    first = make_plan(model, seen, strategy, context, pricing).placement
                except PlanError:
                    continue
                head = first.embed if beside else first.head
                placements.append(Placement(first.layer_devices + [runner.name] * k, first.embed, head))
    best = None
    for placement in placements:
        needs = device_needs(profile, placement, devices, context, streamed)
        if all(needs[d.name].total <= rooms[d.name] for d in devices):
            compute = pricing.predict(placement).step_s if pricing is not None else 0.0
            cost = stream_cost(profile, placement, streamed, tiers, compute)
            # Equal costs (no timings): the fewer hand-overs, the fewer copies of hidden states.
            crossings = len(placement.blocks()) + (placement.head != placement.layer_devices[-1])
            if best is None or (cost.step_s, crossings) < best[0]:
                best = (cost.step_s, crossings), Plan(placement, strategy, context, needs, rooms, dict(streamed))
    return best


# --- what `plan` shows ---------------------------------------------------------------------


def _ranges(layers: Sequence[int]) -> list[str]:
    from vramancer.planning.placement import LayerRange

    runs, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            runs.append(str(LayerRange(start, layer)))
            start = None
    return runs


def tiers_device_parts(plan: Plan, device: str) -> list[str]:
    """The layer ranges `device` runs, those streamed in from a tier marked so."""
    mine = [i for i, d in enumerate(plan.placement.layer_devices) if d == device]
    return (_ranges([i for i in mine if i not in plan.streamed])
            + [f"{r} streamed" for r in _ranges([i for i in mine if i in plan.streamed])])


def tiers_report(profile: ModelProfile, plan: Plan, tiers: Sequence[Tier], compute_step_s: float) -> dict:
    """The tiers of `plan` as `plan --json` shows them, with the step predicted with the copies."""
    cost = stream_cost(profile, plan.placement, plan.streamed, tiers, compute_step_s)
    rows = []
    for t in tiers:
        layers = sorted(i for i, name in plan.streamed.items() if name == t.name)
        rows.append({**t.to_json(), "holds": cost.tier_bytes.get(t.name, 0), "layers": layers,
                     "streams_to": sorted({plan.placement.layer_devices[i] for i in layers})})
    return {"streamed_layers": {str(i): name for i, name in sorted(plan.streamed.items())},
            "bytes_streamed_per_token": cost.bytes_per_token, "tiers": rows,
            "predicted_stream_ms": round(cost.stream_s * 1000, 3),
            "predicted_compute_tokens_per_s": round(1.0 / compute_step_s, 2) if compute_step_s > 0 else None,
            "predicted_tokens_per_s": round(cost.tokens_per_s, 2), "predicted_step_ms": round(cost.step_s * 1000, 3)}


def tiers_lines(report: dict) -> list[str]:
    """The same as lines of text, for `plan`."""
    lines = []
    for row in report["tiers"]:
        where = f" streamed to {', '.join(row['streams_to'])}" if row["layers"] else ""
        rate = max(row["gb_per_s"].values(), default=0.0)
        lines.append(f"  {row['tier'] + ' tier':<10} {', '.join(_ranges(row['layers'])) or '(nothing)'}{where}: "
                     f"holds {format_bytes(row['holds'])} of {format_bytes(row['capacity'])}, {rate:.2f} GB/s")
    if report["bytes_streamed_per_token"]:
        lines.append(f"  streams {format_bytes(report['bytes_streamed_per_token'])} per token "
                     f"({report['predicted_stream_ms']:.1f} ms of copies per step, overlapped with compute; "
                     f"compute alone {report['predicted_compute_tokens_per_s']} tokens/s)")
    return lines


# --- moving resident layers onto a tier ------------------------------------------------------


def stream_refusal(profile: ModelProfile, placement: Placement, streamed: Mapping[int, str], caps: Mapping[str, int],
                   layers: Sequence[int], tier: str, reserves: Mapping[str, int], free: Mapping[str, int],
                   context: int) -> str | None:
    """Why `layers` cannot start streaming from `tier` under `placement` (one sentence), or None:
    the tier's cap must hold their weights, and the devices that run them the staging room.
    Pure: the engine checks a move with it, the dashboard prices a drop on a tier with it."""
    from vramancer.planning.placement import part_label, refusal_sentence

    what = part_label(min(layers), max(layers))
    adding = [i for i in layers if i not in streamed]
    if not adding:
        return f"{what} already streams from a tier."
    cap = caps.get(tier, 0)
    held = sum(profile.layer_bytes[i] for i, t in streamed.items() if t == tier)
    size = sum(profile.layer_bytes[i] for i in adding)
    if held + size > cap:
        hint = f" of its {format_bytes(cap)} cap" if cap else f" (no cap set: --{tier}-tier SIZE)"
        return (f"{what} does not fit in the {tier} tier: it needs {format_bytes(size)} and the tier "
                f"has {format_bytes(max(cap - held, 0))} free{hint}.")
    after = {**streamed, **{i: tier for i in adding}}
    for name, reserve in reserves.items():
        parts = placement.parts_on(name)
        grow = (device_need(profile, parts, reserve, context, after).total
                - device_need(profile, parts, reserve, context, streamed).total)
        if grow > free.get(name, 0):
            return refusal_sentence(f"staging {what} from the {tier} tier", name, grow, free.get(name, 0), context)
    return None


def tier_change_refusal(streamed: Mapping[int, str], planned: Mapping[int, str], strategy: str) -> str:
    """Why a re-plan with `strategy` is refused when it would stream other layers than
    `streamed` (layer -> tier): a layer does not leave a tier, nor join one, while the model
    runs, except by a move of the user's onto a tier."""
    changed = sorted(i for i in set(streamed) | set(planned) if streamed.get(i) != planned.get(i))
    leaving = [i for i in changed if i in streamed]
    what = (f"would bring {', '.join(_ranges(leaving))} back from the tiers onto a device" if leaving else
            f"would stream {', '.join(_ranges(changed))} from a tier as well")
    return (f"the {strategy} plan {what}, and re-planning keeps the tiers' layers as they are; "
            f"load the model again with --strategy {strategy}.")
