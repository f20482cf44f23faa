"""Commands into the engine worker and events out of it: the one contract with the UI.

Everything here is plain, immutable data. No live engine object crosses a thread through
these: a UI reads snapshots, never the engine itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from vramancer.config.options import LoadOptions
from vramancer.config.units import format_bytes
from vramancer.planning.placement import (
    ModelProfile,
    Placement,
    need_changes,
    part_label,
    parts_for_range,
    refusal_sentence,
    room_shortfall,
)
from vramancer.planning.pricing import Pricing, Timings
from vramancer.platforms.readings import DeviceSnapshot

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
class Submit(Command):
    """A request for the scheduler (the server's, one per HTTP request; a dashboard prompt
    and Engine.generate become one too, with an int request_id).

    It waits its turn, is prefilled, then joins the sequences decoding together; between two
    decode steps finished ones leave and waiting ones join. Answered by Token events, then
    one GenerationDone (finish_reason set), or by one RequestRefused if it cannot be run.
    `stop` strings end the answer where they first appear; their text is never streamed."""

    request_id: str | int
    prompt: str | tuple  # text, or chat messages ({"role", "content"}) for the chat template
    sampling: dict = field(default_factory=dict)  # SamplingSettings fields
    raw: bool = False
    stop: tuple[str, ...] = ()
    client: str = ""  # who asked, for the dashboard and the log ("127.0.0.1:51234")
    logprobs: int | None = None  # each token's log probability, with this many likeliest alternatives
    # The answer must follow ("json_schema", schema as JSON text) or ("lark", grammar): scheduling/constrained.py
    constraint: tuple[str, str] | None = None
    tools: tuple = ()  # function tools (OpenAI's JSON) for the chat template to show the model
    # A dashboard prompt or Engine.generate: max_new_tokens is cut to what the context leaves
    # after the prompt, instead of the request being refused (too_long).
    fit_context: bool = False
    # The prompt's own tokens scored too (PromptScored), with `logprobs` alternatives each: a
    # completion's `echo` with logprobs, what evaluation harnesses ask to score a text.
    prompt_logprobs: bool = False


@dataclass(frozen=True)
class Reserve(Command):
    """Take `bytes` of a simulated device as another process would (a squeeze, for demos)."""

    device: str
    bytes: int


@dataclass(frozen=True)
class Cancel(Command):
    """Cancel the Generate with this `request_id`: the one streaming (within one decode step)
    or one still queued (it then finishes at once, cancelled, with no tokens)."""

    request_id: int | str


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
    """The placement as it stands, with what is needed to price a move without the engine.

    Data only (sizes, needs, reserves, measured timings); the questions a UI asks of it are
    answered from that data with the planner's own pure functions."""

    blocks: tuple[BlockInfo, ...]
    embed: str
    head: str
    strategy: str
    context: int
    needs: dict  # device -> bytes needed under this placement
    reserves: dict  # device -> bytes it keeps free for what no tensor accounts for
    profile: ModelProfile
    layer_devices: tuple[str, ...]
    timings: Timings | None = None  # measured timings; None when nothing could be measured
    streamed: tuple[tuple[int, str], ...] = ()  # (layer, tier) of layers streamed from a host or disk tier
    stream_s: float = 0.0  # their copies in one decode step, which overlap the compute
    tier_caps: tuple[tuple[str, int], ...] = ()  # (tier, bytes it may hold) of each tier asked for

    def tier_layers(self, tier: str) -> list[int]:
        """The layers whose weights live in `tier`."""
        return sorted(layer for layer, name in self.streamed if name == tier)
    empty: dict = field(default_factory=dict)  # device -> why it holds nothing (planning's empty_reasons)

    @property
    def predicted_tokens_per_s(self) -> float | None:
        if not self.timings:
            return None
        return 1.0 / max(Pricing(self.timings, self.profile).predict(self.placement).step_s, self.stream_s)

    def predict_move(self, first: int | str, last: int | str, device: str) -> float | None:
        """Predicted tokens/s of the placement that moving first..last to `device` would make."""
        if self.timings is None or device in dict(self.tier_caps):
            return None  # onto a tier: its rates are not in the snapshot
        proposed = self.placement.moved(parts_for_range(self.profile, first, last), device)
        return 1.0 / max(Pricing(self.timings, self.profile).predict(proposed).step_s, self.stream_s)

    @property
    def placement(self) -> Placement:
        return Placement(list(self.layer_devices), self.embed, self.head)

    def part_bytes(self, first: int | str, last: int | str) -> int:
        """What the parts hold where they are: beside its embeddings, a tied head holds no
        copy of their weight."""
        from vramancer.planning.placement import HEAD, part_bytes

        parts = parts_for_range(self.profile, first, last)
        held = sum(part_bytes(self.profile, p) for p in parts)
        return held - self.profile.tied_bytes if HEAD in parts and self.head == self.embed else held

    def move_effect(self, first: int | str, last: int | str, device: str) -> str:
        """What moving first..last to `device` frees and takes, device by device: "frees 54 MiB
        on sim0 · takes 54 MiB on sim1". Moving tied embeddings or head away from the other adds
        a copy of their weight (the head then holds its own) and says so; joining them frees it."""
        current = self.placement
        proposed = current.moved(parts_for_range(self.profile, first, last), device)
        changes = need_changes(self.profile, current, proposed, self.reserves, self.context)
        said = [f"frees {format_bytes(-delta)} on {name}" for name, delta in changes.items() if delta < 0]
        said += [f"takes {format_bytes(delta)} on {name}" for name, delta in changes.items() if delta > 0]
        tied = self.profile.tied_bytes
        if tied and current.embed == current.head and proposed.embed != proposed.head:
            said.append(f"the head then holds its own copy of the tied embeddings ({format_bytes(tied)})")
        elif tied and current.embed != current.head and proposed.embed == proposed.head:
            said.append(f"the head's copy of the tied embeddings ({format_bytes(tied)}) is given back")
        return " · ".join(said) or "changes no device's memory"

    def would_fit(self, first: int | str, last: int | str, device: str, free: dict) -> str | None:
        """None if moving first..last to `device` fits the free bytes given, else the refusal.
        A device missing from `free` counts as having nothing free: unknown is not room. A tier
        as `device`: whether the layers may stream from it (planning/tiers.py)."""
        if device in dict(self.tier_caps):
            from vramancer.planning.tiers import stream_refusal

            parts = parts_for_range(self.profile, first, last)
            if any(isinstance(p, str) for p in parts):
                return f"only decoder layers stream from a tier; the {part_label(first, last)} stays on a device."
            free = {name: free.get(name, 0) for name in self.reserves}
            return stream_refusal(self.profile, self.placement, dict(self.streamed), dict(self.tier_caps), parts,
                                  device, self.reserves, free, self.context)
        current = self.placement
        proposed = current.moved(parts_for_range(self.profile, first, last), device)
        free = {name: free.get(name, 0) for name in self.reserves}
        short = room_shortfall(self.profile, current, proposed, self.reserves, free, self.context,
                               dict(self.streamed))
        return None if short is None else refusal_sentence(part_label(first, last), *short, self.context)


@dataclass(frozen=True)
class LinkSnapshot:
    src: str
    dst: str
    transfers: int
    bytes: int
    seconds: float
    gb_per_s: float  # rolling, over recent transfers
    timestamp: float = field(default_factory=time.time)


@dataclass(frozen=True)
class TierSnapshot:
    """A host or disk tier as it stands: the weights it holds and what it has streamed so far."""

    name: str  # "host" or "disk"
    cap: int  # bytes it may hold
    held: int  # bytes of weights it holds
    layers: tuple[int, ...]  # the layers whose weights it holds
    devices: tuple[str, ...]  # the devices they stream to
    bytes_per_token: int  # streamed out of it at every decode step
    streamed: int  # bytes copied out of it since the load
    copy_gb_per_s: float  # how fast its copies went, while copying
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
    cuda_graphs: bool = False  # decode steps of CUDA layers replayed from graphs


@dataclass(frozen=True)
class PlanChanged(Event):
    plan: PlanSnapshot
    seconds: float | None = None  # how long a re-plan took to move its parts (None: no re-plan)


@dataclass(frozen=True)
class TokenLogprob:
    """One answer token's log probability under the model (its own softmax, before any
    sampling adjustment), and the likeliest tokens at that step with theirs."""

    token: str
    logprob: float | None  # None: the prompt's first token, which nothing before it predicts
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Token(Event):
    text: str
    request_id: int | str = 0
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens behind this text, when a Submit asked
    # The answer's tokens decoded when this text was sent (0: not counted), and when (time.monotonic, on the engine's thread): a UI's tok/s comes from these,
    # never from when it got round to drawing them.
    step: int = 0
    at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class GenerationDone(Event):
    request_id: int | str
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    new_tokens: int
    ttft_s: float | None
    decode_tokens_per_s: float | None
    cancelled: bool
    finish_reason: str = ""  # stop | length | cancelled, as OpenAI names them ("" from Generate)
    total_s: float | None = None  # from arrival (Submit) or start (Generate) to the last token


@dataclass(frozen=True)
class PromptScored(Event):
    """A Submit's prompt, token by token, with each token's log probability given the ones
    before it (the first has none), when the Submit asked for `prompt_logprobs`."""

    request_id: str | int
    logprobs: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class RequestQueued(Event):
    """A Submit was accepted and waits for room in the batch."""

    request_id: str
    client: str
    prompt_head: str  # the prompt's first characters, for a one-line view
    prompt_tokens: int
    max_tokens: int


@dataclass(frozen=True)
class RequestStarted(Event):
    """A Submit was prefilled and joined the batch; its first token is on its way."""

    request_id: str


@dataclass(frozen=True)
class RequestRefused(Event):
    """A Submit that will not run: `reason` is too_long | queue_full | bad_request | shutting_down |
    not_ready (no model is loaded yet)."""

    request_id: str
    reason: str
    message: str  # one sentence, with the numbers


@dataclass(frozen=True)
class BatchStatus(Event):
    """The continuous batch after a step (coalesced: at most a few a second, and when it empties)."""

    running: int
    waiting: int
    tokens_per_s: float  # all sequences together, over the last second or so
    kv_tokens: int  # tokens whose keys and values the running sequences hold
    kv_budget: int  # KV slots the plan budgeted (--context)
    kv_blocks: int = 0  # KV blocks held (sequences and kept prefixes), of kv_budget_blocks
    kv_budget_blocks: int = 0
    preemptions: int = 0  # sequences preempted for KV room so far (by this scheduler)
    prefix_hits: int = 0  # requests that found a kept prefix, since the engine loaded
    prefix_misses: int = 0
    prefix_tokens_reused: int = 0  # prompt tokens copied from kept prefixes instead of computed


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
    at: float = field(default_factory=time.time)  # when it ended (wall clock, as LinkSnapshot's)

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class MigrationNotDone(Event):
    """A Migrate that changed nothing: refused before it began, or undone part-way."""

    first: int | str
    last: int | str
    device: str
    reason: str


@dataclass(frozen=True)
class DeviceSample(Event):
    devices: tuple[DeviceSnapshot, ...]
    tiers: tuple[TierSnapshot, ...] = ()  # the tiers streamed layers' weights live in, if any


@dataclass(frozen=True)
class LinkSample(Event):
    links: tuple[LinkSnapshot, ...]


@dataclass(frozen=True)
class Notice(Event):
    """Something worth a line in the log that is not an error (e.g. pressure nothing can relieve)."""

    message: str


@dataclass(frozen=True)
class DeviceFault(Notice):
    """A machine holding some devices went away (`recovered` False), or their layers found
    new homes (True).

    A Notice, so a UI that only shows notices shows these too."""

    node: str = ""  # node:HOST:PORT
    layers: str = ""  # what it held, e.g. "L10–19"
    recovered: bool = False


@dataclass(frozen=True)
class Error(Event):
    command: str  # the command's class name, e.g. "Load"
    message: str  # one sentence
