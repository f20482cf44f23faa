"""Commands into the engine worker and events out of it: the one contract with the UI.

Everything here is plain, immutable data. No live engine object crosses a thread through
these: a UI reads snapshots, never the engine itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from vramancer.engine.engine import LoadOptions
from vramancer.engine.migration import part_label, refusal_sentence
from vramancer.engine.planner import ModelProfile, Placement, parts_for_range, room_shortfall
from vramancer.engine.profiler import Pricing

# --- commands (UI → worker) ---------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    pass


@dataclass(frozen=True)
class Load(Command):
    options: LoadOptions


@dataclass(frozen=True)
class Replan(Command):
    strategy: str


@dataclass(frozen=True)
class Migrate(Command):
    """Move layers first..last (ints), or the part `embed` / `head` (first == last), to `device`."""

    first: int | str
    last: int | str
    device: str


@dataclass(frozen=True)
class Generate(Command):
    """`prompt` is text, or a list of chat messages ({"role", "content"}) for a conversation."""

    prompt: str | tuple
    sampling: dict = field(default_factory=dict)
    raw: bool = False
    request_id: int = 0


@dataclass(frozen=True)
class Reserve(Command):
    """Take `bytes` of a simulated device as another process would (a squeeze, for demos)."""

    device: str
    bytes: int


@dataclass(frozen=True)
class Cancel(Command):
    pass


@dataclass(frozen=True)
class Shutdown(Command):
    pass


# --- snapshots ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockInfo:
    first_layer: int
    last_layer: int
    device: str
    bytes: int  # weights of these layers

    @property
    def label(self) -> str:
        return part_label(self.first_layer, self.last_layer)


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    kind: str  # cuda | mps | cpu | sim
    label: str  # GPU model name, "CPU", "simulated"
    simulated: bool
    total: int
    host: str | None = None  # node:HOST:PORT for a remote device, None for this machine's


@dataclass(frozen=True)
class PlanSnapshot:
    """The placement as it stands, with what is needed to price a move without the engine."""

    blocks: tuple[BlockInfo, ...]
    embed: str
    head: str
    strategy: str
    context: int
    needs: dict  # device -> bytes needed under this placement
    kinds: dict  # device -> kind
    profile: ModelProfile
    layer_devices: tuple[str, ...]
    pricing: Pricing | None = None  # measured timings; None when nothing could be measured

    @property
    def predicted_tokens_per_s(self) -> float | None:
        return self.pricing.predict(self.placement).tokens_per_s if self.pricing else None

    def predict_move(self, first: int | str, last: int | str, device: str) -> float | None:
        """Predicted tokens/s of the placement that moving first..last to `device` would make."""
        if self.pricing is None:
            return None
        proposed = self.placement.moved(parts_for_range(self.profile, first, last), device)
        return self.pricing.predict(proposed).tokens_per_s

    @property
    def placement(self) -> Placement:
        return Placement(list(self.layer_devices), self.embed, self.head)

    def part_bytes(self, first: int | str, last: int | str) -> int:
        from vramancer.engine.planner import part_bytes

        return sum(part_bytes(self.profile, p) for p in parts_for_range(self.profile, first, last))

    def would_fit(self, first: int | str, last: int | str, device: str, free: dict) -> str | None:
        """None if moving first..last to `device` fits the free bytes given, else the refusal.
        A device missing from `free` counts as having nothing free: unknown is not room."""
        current = self.placement
        proposed = current.moved(parts_for_range(self.profile, first, last), device)
        free = {name: free.get(name, 0) for name in self.kinds}
        short = room_shortfall(self.profile, current, proposed, self.kinds, free, self.context)
        return None if short is None else refusal_sentence(part_label(first, last), *short, self.context)


@dataclass(frozen=True)
class DeviceSnapshot:
    """One telemetry reading of one device. None means the device cannot tell."""

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


@dataclass(frozen=True)
class LinkSnapshot:
    src: str
    dst: str
    transfers: int
    bytes: int
    seconds: float
    gb_per_s: float  # rolling, over recent transfers
    timestamp: float = field(default_factory=time.time)


# --- events (worker → UI) ------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    pass


@dataclass(frozen=True)
class LoadProgress(Event):
    stage: str  # reading | dequantising | reading weights | placing
    fraction: float


@dataclass(frozen=True)
class Loaded(Event):
    model: str
    dtype: str
    strategy: str
    context: int
    devices: tuple[DeviceInfo, ...]
    simulated: bool  # every device is simulated
    simulated_fallback: bool  # `auto` found no accelerator and made a simulated pool
    seconds: float


@dataclass(frozen=True)
class PlanChanged(Event):
    plan: PlanSnapshot


@dataclass(frozen=True)
class Token(Event):
    text: str
    request_id: int = 0


@dataclass(frozen=True)
class GenerationDone(Event):
    request_id: int
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    new_tokens: int
    ttft_s: float | None
    decode_tokens_per_s: float | None
    cancelled: bool


@dataclass(frozen=True)
class MigrationStarted(Event):
    first: int | str
    last: int | str
    device: str


@dataclass(frozen=True)
class MigrationDone(Event):
    first: int | str
    last: int | str
    src: str
    dst: str
    bytes: int
    seconds: float
    step: int | None  # new tokens so far when it ran during a generation, else None
    reason: str = ""  # why it happened, when the engine decided it (auto-rebalance)

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class MigrationRefused(Event):
    first: int | str
    last: int | str
    device: str
    reason: str


@dataclass(frozen=True)
class DeviceSample(Event):
    devices: tuple[DeviceSnapshot, ...]


@dataclass(frozen=True)
class LinkSample(Event):
    links: tuple[LinkSnapshot, ...]


@dataclass(frozen=True)
class Notice(Event):
    """Something worth a line in the log that is not an error (e.g. pressure nothing can relieve)."""

    message: str


@dataclass(frozen=True)
class NodeLost(Notice):
    """A node went away (`recovered` False), or its layers found new homes (True).

    A Notice, so a UI that only shows notices shows these too."""

    node: str = ""  # node:HOST:PORT
    layers: str = ""  # what it held, e.g. "L10–19"
    recovered: bool = False


@dataclass(frozen=True)
class Error(Event):
    command: str  # the command's class name, e.g. "Load"
    message: str  # one sentence
