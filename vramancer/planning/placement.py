"""Where each part of the model goes, and what that costs each device.

A model is a sequence of parts: `embed`, layers 0..n-1, `head` (final norm + lm_head). A
`Placement` gives each part a device. The memory model (`device_needs`) prices a placement
per device; the strategies search for a placement whose needs fit every device's room.

Devices that are not `local` (another machine's, see cluster/) take decoder layers
only: the embeddings and the head stay on this machine, where the sampler is. They come after
the local devices in the pipeline; their room is what their machine reports. Everything the
planner asks of a device (room, reserve, whether it is a last resort) is the device's answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping, Protocol, Sequence

from vramancer.planning.memory import LayerCache

if TYPE_CHECKING:
    from vramancer.platforms.devices import Device
from vramancer.config.errors import VramancerError
from vramancer.config.units import format_bytes

EMBED = "embed"
HEAD = "head"
STRATEGIES = ("proportional", "sequential", "profiled")
# Pools of this many devices or more (a rig) have every device take part under `proportional`
# where the layers go round (`_spread`). Smaller pools keep the placement by shares of room,
# which can leave one device empty when a tied head joins its embeddings.
RIG_DEVICES = 4


class PlanError(VramancerError):
    """No placement of the model fits the devices."""


@dataclass(frozen=True)
class LayerRange:
    """Layers first..last, both included."""

    first: int
    last: int

    def __post_init__(self) -> None:
        if self.first < 0 or self.last < self.first:
            raise VramancerError(f"L{self.first}-{self.last} is not a layer range; write it first-last, first <= last.")

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.first, self.last + 1))

    def __len__(self) -> int:
        return self.last - self.first + 1

    def __str__(self) -> str:
        return f"L{self.first}" if self.first == self.last else f"L{self.first}–{self.last}"


@dataclass(frozen=True)
class ModelProfile:
    """The sizes the memory model needs, measured from the model's own modules."""

    num_layers: int
    layer_bytes: tuple[int, ...]
    embed_bytes: int  # what runs before the decoder stack: embeddings, positions, rotary tables
    head_bytes: int  # what runs after it: final norm + output head, counting the head's weight even when tied
    tied_bytes: int  # bytes the head shares with the embeddings (0 when untied)
    kv_bytes_per_token: int  # one full-attention layer, keys + values, for one token
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    dtype_bytes: int
    # Each layer's cache as it really is (full, sliding window, compressed); empty: every
    # layer caches kv_bytes_per_token for every token.
    layer_caches: tuple[LayerCache, ...] = ()
    architecture: str = ""

    def kv_bytes(self, layer: int, context: int) -> int:
        """KV cache bytes layer `layer` holds with `context` tokens."""
        if self.layer_caches:
            return self.layer_caches[layer].bytes_for(context)
        return self.kv_bytes_per_token * context

    def parts(self) -> list[str | int]:
        return [EMBED, *range(self.num_layers), HEAD]

    def weight_bytes(self) -> int:
        return self.embed_bytes + sum(self.layer_bytes) + self.head_bytes - self.tied_bytes


@dataclass(frozen=True)
class Block:
    """A contiguous run of layers on one device."""

    layers: LayerRange
    device: str


@dataclass
class Placement:
    """Which device holds each part."""

    layer_devices: list[str]
    embed: str
    head: str

    def device_of(self, part: str | int) -> str:
        if part == EMBED:
            return self.embed
        if part == HEAD:
            return self.head
        return self.layer_devices[int(part)]

    def blocks(self) -> list[Block]:
        runs: list[Block] = []
        start = 0
        for i in range(1, len(self.layer_devices) + 1):
            if i == len(self.layer_devices) or self.layer_devices[i] != self.layer_devices[start]:
                runs.append(Block(LayerRange(start, i - 1), self.layer_devices[start]))
                start = i
        return runs

    def parts_on(self, device: str) -> list[str | int]:
        parts: list[str | int] = [EMBED] if self.embed == device else []
        parts += [i for i, d in enumerate(self.layer_devices) if d == device]
        return parts + ([HEAD] if self.head == device else [])

    def moved(self, parts: Iterable[str | int], device: str) -> "Placement":
        """A copy with `parts` on `device`."""
        new = Placement(list(self.layer_devices), self.embed, self.head)
        for part in parts:
            if part == EMBED:
                new.embed = device
            elif part == HEAD:
                new.head = device
            else:
                new.layer_devices[int(part)] = device
        return new

    def copy(self) -> "Placement":
        return self.moved([], self.embed)


@dataclass
class DeviceNeed:
    """What one device must hold under a placement."""

    weights: int = 0
    kv: int = 0
    workspace: int = 0
    reserve: int = 0
    staging: int = 0  # room for layers streamed in from a host or disk tier (planning/tiers.py)

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.workspace + self.reserve + self.staging


def parts_for_range(profile: ModelProfile, first: int | str, last: int | str) -> list[str | int]:
    """The parts named by a range: layers first..last, or the single part embed / head."""
    if isinstance(first, str) or isinstance(last, str):
        if first not in (EMBED, HEAD) or first != last:
            raise VramancerError(f"'{first}' is not a part; name a layer range, embed or head.")
        return [first]
    if not (0 <= first <= last < profile.num_layers):
        raise VramancerError(f"layers {first}-{last} are not in this model; it has layers 0-{profile.num_layers - 1}.")
    return list(range(first, last + 1))


def part_bytes(profile: ModelProfile, part: str | int) -> int:
    if part == EMBED:
        return profile.embed_bytes
    if part == HEAD:
        return profile.head_bytes
    return profile.layer_bytes[int(part)]


def device_need(profile: ModelProfile, parts: Sequence[str | int], reserve: int, context: int,
                streamed: Mapping[int, str] | None = None) -> DeviceNeed:
    """The memory model for one device holding `parts`, which keeps `reserve` bytes free for
    what no tensor accounts for (`Device.reserve`; docs/design/memory-model.md). Layers in
    `streamed` (layer -> tier) keep their weights in a tier: the device holds their KV cache
    and the staging room for the two largest of them (the one running, the one arriving)."""
    need = DeviceNeed()
    if not parts:
        return need
    streamed = streamed or {}
    here = sorted((profile.layer_bytes[int(p)] for p in parts if p not in (EMBED, HEAD) and int(p) in streamed),
                  reverse=True)
    need.staging = sum(here[:2])
    need.weights = sum(part_bytes(profile, p) for p in parts) - sum(here)
    if EMBED in parts and HEAD in parts:
        need.weights -= profile.tied_bytes  # tied weights are counted once
    layers = [p for p in parts if p not in (EMBED, HEAD)]
    need.kv = sum(profile.kv_bytes(int(layer), context) for layer in layers)
    # Activations of one layer at a time for a full-context prefill: the residual stream,
    # q/k/v/o and the MLP's gate/up/down. Attention scores are left out: SDPA does not
    # materialise them. The head adds one row of logits (generate keeps only the last).
    per_token = 4 * profile.hidden_size + 3 * profile.intermediate_size
    if layers:
        need.workspace = context * per_token * profile.dtype_bytes
    if HEAD in parts:
        need.workspace += 2 * profile.vocab_size * 4
    need.reserve = reserve
    return need


def device_needs(
    profile: ModelProfile, placement: Placement, devices: Sequence[Device], context: int,
    streamed: Mapping[int, str] | None = None,
) -> dict[str, DeviceNeed]:
    return {d.name: device_need(profile, placement.parts_on(d.name), d.reserve, context, streamed) for d in devices}


@dataclass
class Plan:
    """A placement and what it costs each device, as the planner priced it."""

    placement: Placement
    strategy: str
    context: int
    needs: dict[str, DeviceNeed] = field(default_factory=dict)
    rooms: dict[str, int] = field(default_factory=dict)
    # Layers whose weights live in a host or disk tier (layer -> tier name) and stream to the
    # device the placement gives them at their turn (planning/tiers.py); empty: none.
    streamed: dict[int, str] = field(default_factory=dict)
    empty: dict[str, str] = field(default_factory=dict)  # device -> why it holds nothing

    def blocks(self) -> list[Block]:
        return self.placement.blocks()


def room_shortfall(
    profile: ModelProfile,
    current: Placement,
    proposed: Placement,
    reserves: dict[str, int],
    free: dict[str, int],
    context: int,
    streamed: Mapping[int, str] | None = None,
) -> tuple[str, int, int] | None:
    """(device, extra bytes needed, bytes free) for the first device that cannot take
    `proposed`, or None if it fits. `reserves` names the devices (each with its reserve).
    Pure: the dashboard prices a drag with it too."""
    for name, reserve in reserves.items():
        now = device_need(profile, current.parts_on(name), reserve, context, streamed).total
        after = device_need(profile, proposed.parts_on(name), reserve, context, streamed).total
        if after - now > 0 and after - now > free[name]:
            return name, after - now, free[name]
    return None


def need_changes(profile: ModelProfile, current: Placement, proposed: Placement, reserves: dict[str, int],
                 context: int) -> dict[str, int]:
    """Bytes each device would need more (+) or less (-) under `proposed` than under `current`,
    for the devices whose need changes. Pure, like room_shortfall: what a drop preview says a
    move frees and takes, a tied head's own copy of the embeddings included."""
    changes = {}
    for name, reserve in reserves.items():
        delta = (device_need(profile, proposed.parts_on(name), reserve, context).total
                 - device_need(profile, current.parts_on(name), reserve, context).total)
        if delta:
            changes[name] = delta
    return changes


def split_footprint(profile: ModelProfile, context: int) -> int:
    """What the model needs in all when split in two: the head keeps its own copy of tied
    weights and each side has its own workspace. Sizes the fallback simulated pool."""
    whole = device_need(profile, profile.parts(), 0, context)
    return whole.total + profile.tied_bytes + whole.workspace


# --- strategies ------------------------------------------------------------------------


class Pricing(Protocol):
    """Seconds per decode step of each part on each device, and of each hand-over."""

    def part_s(self, part: str | int, device: str) -> float: ...
    def hand_over_s(self, src: str, dst: str) -> float: ...
    def logits_s(self, head: str, embed: str) -> float: ...


def make_plan(
    profile: ModelProfile,
    devices: Sequence[Device],
    strategy: str,
    context: int,
    pricing: Pricing | None = None,
) -> Plan:
    """Place the model on `devices` with `strategy`, or raise PlanError saying why it cannot."""
    if strategy not in STRATEGIES:
        raise PlanError(f"'{strategy}' is not a strategy; choose one of {', '.join(STRATEGIES)}.")
    if not all(d.local for d in devices):
        return _plan_with_nodes(profile, devices, strategy, context, pricing)
    rooms = {d.name: d.room() for d in devices}
    accelerators = [d for d in devices if not d.last_resort]
    cpu = [d for d in devices if d.last_resort]
    placement = None
    if strategy == "profiled":
        if pricing is None:
            raise PlanError("the profiled strategy needs device timings; load the model to measure them.")
        # Speed decides: a slow CPU only takes layers when that is fastest or nothing else fits.
        placement = _profiled(profile, list(devices), context, rooms, pricing)
    elif accelerators:
        placement = _place(profile, accelerators, strategy, context, rooms)
        if placement is None and cpu:
            # The CPU takes the overflow: fill the accelerators first, the rest goes to host memory.
            placement = _sequential(profile, accelerators + cpu, context, rooms)
    else:
        placement = _place(profile, cpu, strategy, context, rooms)
    if placement is None:
        single = device_need(profile, profile.parts(), devices[0].reserve, context)
        free = ", ".join(f"{d.name} {format_bytes(rooms[d.name])}" for d in devices)
        raise PlanError(
            f"model needs {format_bytes(single.total - single.reserve)} at context {context}; "
            f"free: {free}; use more or larger devices, a shorter --context, or a smaller --dtype."
        )
    if strategy != "profiled":  # profiled weighs logits and hand-overs itself: its choice stands
        placement = _tied_head_home(profile, devices, placement, context, rooms)
    if strategy == "proportional":
        placement = _spread(profile, devices, placement, context, rooms)
    return Plan(placement, strategy, context, device_needs(profile, placement, devices, context), rooms,
                empty=empty_reasons(profile, placement, devices, strategy, context, rooms))


def _tied_head_home(profile: ModelProfile, devices: Sequence[Device], placement: Placement, context: int,
                    rooms) -> Placement:
    """A head whose weight is the embeddings' (tied) goes where they are, if it fits there:
    the weight is then held once instead of copied onto another device, and what crosses back
    to the sampler each token is one hidden state instead of a row of logits."""
    if not profile.tied_bytes or placement.head == placement.embed:
        return placement
    home = placement.moved([HEAD], placement.embed)
    return home if _fits(profile, devices, home, context, rooms) else placement


def _plan_with_nodes(profile: ModelProfile, devices: Sequence[Device], strategy: str, context: int,
                     pricing: Pricing | None) -> Plan:
    """A plan over local and remote devices: local ones first, the ends (embed, head) local."""
    live = [d for d in devices if not d.lost]
    local = [d for d in live if d.local]
    remote = [d for d in live if not d.local]
    if not local:
        raise PlanError("remote devices hold decoder layers only; add a device of this machine "
                        "(cpu, cuda:N or a sim pool) for the embeddings and the head.")
    ordered = local + remote
    rooms = {d.name: d.room() for d in ordered}
    if strategy == "profiled":
        if pricing is None:
            raise PlanError("the profiled strategy needs device timings; load the model to measure them.")
        first = _profiled(profile, ordered, context, rooms, pricing)
    else:
        # As on one machine: accelerators first, the CPU takes the overflow.
        accelerators = [d for d in ordered if not d.last_resort]
        participants = accelerators or ordered
        local_first = [d for d in participants if d.local] or local
        first = None
        if strategy == "proportional":
            first = _proportional_layers(profile, ordered, participants, local_first[0], context, rooms)
        if first is None:
            first = _sequential(profile, participants, context, rooms)
    placement = _keep_ends_local(profile, ordered, first, context, rooms) if first is not None else None
    if placement is None:
        fallback = _sequential(profile, ordered, context, rooms)
        placement = _keep_ends_local(profile, ordered, fallback, context, rooms) if fallback is not None else None
    if placement is None:
        free = ", ".join(f"{d.name} {format_bytes(rooms[d.name])}" for d in ordered)
        single = device_need(profile, profile.parts(), local[0].reserve, context)
        raise PlanError(
            f"model needs {format_bytes(single.total - single.reserve)} at context {context} with its embeddings "
            f"and head on this machine; free: {free}; use more or larger devices or a shorter --context."
        )
    if strategy != "profiled":
        placement = _tied_head_home(profile, ordered, placement, context, rooms)
    return Plan(placement, strategy, context, device_needs(profile, placement, ordered, context), rooms,
                empty=empty_reasons(profile, placement, ordered, strategy, context, rooms))


def _proportional_layers(profile: ModelProfile, devices: Sequence[Device], participants: Sequence[Device],
                         ends: Device, context: int, rooms) -> Placement | None:
    """Layers in contiguous segments sized to each participant's usable room, with the
    embeddings and the head both on `ends` (counted there before the layers are shared out)."""
    costs = [profile.layer_bytes[i] + profile.kv_bytes(i, context) for i in range(profile.num_layers)]
    usable = []
    for device in participants:
        fixed = device_need(profile, [0], device.reserve, context).total - costs[0]
        if device is ends:
            both = device_need(profile, [EMBED, HEAD], device.reserve, context)
            fixed += both.total - both.reserve
        usable.append(max(rooms[device.name] - fixed, 0))
    if sum(usable) <= 0:
        return None
    owners = []
    for device, count in zip(participants, _proportional_counts(costs, usable)):
        owners += [device.name] * count
    placement = Placement(owners, embed=ends.name, head=ends.name)
    return placement if _fits(profile, devices, placement, context, rooms) else None


def _keep_ends_local(profile: ModelProfile, devices: Sequence[Device], placement: Placement, context: int,
                     rooms) -> Placement | None:
    """Move the embeddings and the head of `placement` onto local devices, if they are not
    there already and it fits; None if it cannot."""
    by_name = {d.name: d for d in devices}
    local = [d.name for d in devices if d.local]

    def remote(name: str) -> bool:
        return not by_name[name].local

    def layer_holders(reverse: bool) -> list[str]:
        order = placement.layer_devices[::-1] if reverse else placement.layer_devices
        return [name for name in dict.fromkeys(order) if not remote(name)]

    for part in (EMBED, HEAD):
        if not remote(placement.device_of(part)):
            continue
        preferred = layer_holders(reverse=part == HEAD)
        if part == HEAD and not remote(placement.embed):
            preferred.append(placement.embed)  # tied weights are then held once
        options = list(dict.fromkeys(preferred + sorted(local, key=lambda n: -rooms[n])))
        for name in options:
            trial = placement.moved([part], name)
            if _fits(profile, devices, trial, context, rooms):
                placement = trial
                break
        else:
            return None
    return placement if _fits(profile, devices, placement, context, rooms) else None


def _place(profile, devices, strategy, context, rooms) -> Placement | None:
    if strategy == "proportional":
        placement = _proportional(profile, devices, context, rooms)
        if placement is not None:
            return placement
    return _sequential(profile, devices, context, rooms)


def _segments_to_placement(profile: ModelProfile, devices: Sequence[Device], counts: list[int]) -> Placement:
    owners: list[str] = []
    for device, count in zip(devices, counts):
        owners += [device.name] * count
    layer_devices = owners[1:-1]
    return Placement(layer_devices, embed=owners[0], head=owners[-1])


def _fits(profile, devices, placement, context, rooms) -> bool:
    needs = device_needs(profile, placement, devices, context)
    return all(needs[d.name].total <= rooms[d.name] for d in devices)


def _sequential(profile: ModelProfile, devices, context: int, rooms) -> Placement | None:
    """Fill each device in order as far as it goes, like accelerate's "sequential"."""
    parts = profile.parts()
    counts = [0] * len(devices)
    i = 0
    for d_index, device in enumerate(devices):
        taken: list[str | int] = []
        while i < len(parts):
            trial = taken + [parts[i]]
            if device_need(profile, trial, device.reserve, context).total > rooms[device.name]:
                break
            taken = trial
            i += 1
        counts[d_index] = len(taken)
    if i < len(parts):
        return None
    return _segments_to_placement(profile, devices, counts)


def _proportional_counts(costs: Sequence[float], usable: Sequence[float]) -> list[int]:
    """How many consecutive items each device takes so that the running cost follows the
    running share of usable room as closely as item boundaries allow (the last takes the rest)."""
    total_cost, room_total = sum(costs), sum(usable)
    counts, taken, cumulative, target = [], 0, 0.0, 0.0
    for index, room in enumerate(usable):
        target += total_cost * room / room_total
        start = taken
        if index == len(usable) - 1:
            taken = len(costs)
        else:
            while taken < len(costs) and abs(cumulative + costs[taken] - target) <= abs(cumulative - target):
                cumulative += costs[taken]
                taken += 1
        counts.append(taken - start)
    return counts


def _spread(profile: ModelProfile, devices: Sequence[Device], placement: Placement, context: int,
            rooms) -> Placement:
    """`placement`, or where it leaves a device that takes part empty though there are layers
    enough to go round (a rig of many small devices: whole parts handed out by room skip a
    device whose share is less than the embeddings), one with the ends on the first device
    (the head on the last when untied) and the layers in proportion to what room the others
    leave, at least one on each device that holds no end, if that fits. With fewer layers than
    devices, the first devices take them and the last stay empty."""
    used = set(placement.layer_devices) | {placement.embed, placement.head}
    takers = [d for d in devices if not d.last_resort] or list(devices)
    if any(d.name in used for d in devices if d.last_resort):
        takers = list(devices)  # the CPU took the overflow: every device takes part
    if all(d.name in used for d in takers) or len(takers) < RIG_DEVICES:
        return placement
    # Fewer layers than devices: the first ones, one layer each, and the rest left empty.
    takers = takers[:profile.num_layers + (1 if profile.tied_bytes else 2)]
    first, last = takers[0], takers[-1]
    head = first if profile.tied_bytes else last
    ends = {first.name: [EMBED] + ([HEAD] if head is first else []), last.name: [HEAD] if head is last else []}
    costs = [profile.layer_bytes[i] + profile.kv_bytes(i, context) for i in range(profile.num_layers)]
    usable = []
    for device in takers:
        end_parts = ends.get(device.name, [])
        fixed = device_need(profile, [0, *end_parts], device.reserve, context).total - costs[0]
        usable.append(max(rooms[device.name] - fixed, 0))
    if sum(usable) <= 0:
        return placement
    counts = _proportional_counts(costs, usable)
    for index, device in enumerate(takers):  # a device with no end takes a layer from the most laden
        if counts[index] == 0 and not ends.get(device.name):
            donor = max(range(len(counts)), key=lambda k: counts[k])
            if counts[donor] < 2:
                return placement
            counts[donor] -= 1
            counts[index] += 1
    owners = [device.name for device, count in zip(takers, counts) for _ in range(count)]
    spread = Placement(owners, embed=first.name, head=head.name)
    return spread if _fits(profile, devices, spread, context, rooms) else placement


def empty_reasons(profile: ModelProfile, placement: Placement, devices: Sequence[Device], strategy: str,
                  context: int, rooms) -> dict[str, str]:
    """Why each device the plan leaves empty holds nothing, in a few words (the dashboard shows
    them in the device's column): layers stay whole, so fewer layers than devices leaves some
    empty; the CPU only takes what the accelerators cannot hold; sequential fills devices in
    order; profiled found it faster without; else the device's room or share is under a layer."""
    used = set(placement.layer_devices) | {placement.embed, placement.head}
    accelerators_only = not any(d.name in used for d in devices if d.last_resort)
    reasons = {}
    for device in devices:
        if device.name in used:
            continue
        smallest = min(range(profile.num_layers), key=lambda i: part_bytes(profile, i) + profile.kv_bytes(i, context),
                       default=None)
        alone = device_need(profile, [smallest], device.reserve, context).total if smallest is not None else 0
        if profile.num_layers + 1 < len(devices):  # the ends share a device with some layers or each other
            reasons[device.name] = f"{profile.num_layers} layers, {len(devices)} devices"
        elif device.lost:
            reasons[device.name] = "its node is lost"
        elif device.last_resort and accelerators_only:
            reasons[device.name] = "the accelerators hold it all"
        elif alone > rooms.get(device.name, 0):
            reasons[device.name] = f"{format_bytes(rooms.get(device.name, 0))} free < a layer's {format_bytes(alone)}"
        elif strategy == "sequential":
            reasons[device.name] = "sequential filled the devices before it"
        elif strategy == "profiled":
            reasons[device.name] = "priced faster without it"
        else:
            reasons[device.name] = f"its share < a layer ({format_bytes(max(profile.layer_bytes, default=0))})"
    return reasons


def _proportional(profile: ModelProfile, devices, context: int, rooms) -> Placement | None:
    """Contiguous segments sized in proportion to each device's usable room."""
    parts = profile.parts()
    costs = []
    for part in parts:
        cost = part_bytes(profile, part)
        if part not in (EMBED, HEAD):
            cost += profile.kv_bytes(int(part), context)
        costs.append(cost)
    fixed = [device_need(profile, [0], d.reserve, context).total - costs[1] for d in devices]
    usable = [max(rooms[d.name] - f, 0) for d, f in zip(devices, fixed)]
    if sum(usable) <= 0:
        return None
    placement = _segments_to_placement(profile, devices, _proportional_counts(costs, usable))
    return placement if _fits(profile, devices, placement, context, rooms) else None


def _profiled(profile: ModelProfile, devices: list[Device], context: int, rooms, pricing: Pricing) -> Placement | None:
    """The contiguous placement, in device order, with the least predicted time per token.

    A dynamic programme over (parts placed, first device used, last device used): each step
    gives the next segment of parts to a later device. Equal devices make every layer cost
    the same anywhere, so the cheapest plan is the one with the fewest hand-overs that fits."""
    parts = profile.parts()
    n, inf = len(parts), float("inf")
    names = [d.name for d in devices]
    prefix = {name: [0.0] for name in names}  # prefix sums of part seconds per device
    for name in names:
        for part in parts:
            prefix[name].append(prefix[name][-1] + pricing.part_s(part, name))
    fits: dict[tuple[int, int, int], bool] = {}

    def segment_fits(e: int, i: int, j: int) -> bool:
        key = (e, i, j)
        if key not in fits:
            fits[key] = device_need(profile, parts[i:j], devices[e].reserve, context).total <= rooms[names[e]]
        return fits[key]

    # best[(i, first, last)] = (seconds, previous state, segment (device, i, j))
    best: dict[tuple[int, int, int], tuple[float, object, tuple[int, int, int] | None]] = {}
    for e in range(len(devices)):
        for j in range(1, n + 1):
            if segment_fits(e, 0, j):
                cost = prefix[names[e]][j]
                best[(j, e, e)] = min(best.get((j, e, e), (inf, None, None)), (cost, None, (e, 0, j)), key=lambda t: t[0])
    for i in range(1, n):
        for first in range(len(devices)):
            for last in range(len(devices)):
                state = best.get((i, first, last))
                if state is None:
                    continue
                for e in range(last + 1, len(devices)):
                    hand_over = pricing.hand_over_s(names[last], names[e])
                    for j in range(i + 1, n + 1):
                        if not segment_fits(e, i, j):
                            break  # longer segments need even more
                        cost = state[0] + hand_over + prefix[names[e]][j] - prefix[names[e]][i]
                        key = (j, first, e)
                        if cost < best.get(key, (inf,))[0]:
                            best[key] = (cost, (i, first, last), (e, i, j))
    finals = [
        (state[0] + pricing.logits_s(names[last], names[first]), (n, first, last))
        for (i, first, last), state in best.items()
        if i == n
    ]
    if not finals:
        return None
    _, key = min(finals, key=lambda t: t[0])
    owners = [""] * n
    while key is not None:
        _, previous, (e, i, j) = best[key]
        for k in range(i, j):
            owners[k] = names[e]
        key = previous
    return Placement(owners[1:-1], embed=owners[0], head=owners[-1])


def part_label(first: int | str, last: int | str) -> str:
    if isinstance(first, str):
        return first
    return str(LayerRange(int(first), int(last)))


def refusal_sentence(what: str, device: str, grow: int, free: int, context: int) -> str:
    return (
        f"{what} does not fit on {device}: it needs {format_bytes(grow)} more "
        f"(weights, KV cache for {context} tokens, workspace) and {device} has {format_bytes(free)} free."
    )
