"""Continuous batching on the split model: requests decode together, joining and leaving
between two decode steps.

Why not transformers' own continuous-batching manager (`generate_batch`,
`init_continuous_batching`, in transformers/generation/continuous_batching/): its
`PagedAttentionCache` keeps the KV of every layer in one flat tensor allocated on
`model.device` (a single device), it switches the model to its paged attention kernels, and
its `ContinuousBatchingManager` runs the decode loop on a thread of its own. Our split keeps
each layer's KV beside its layer, on that layer's device, moves it with the layer when a
migration runs between two steps, and counts it per device; and our worker thread must own
every forward pass so that Migrate, Reserve and Replan can run between two of them. So the
batch is built on our runtime directly.

How it works:
- A request that finds the scheduler empty runs exactly as `generate` runs it: its prompt in
  one forward, then one decode step at a time, in the engine's lone cache (under CUDA graphs
  the kept StaticCache, whose steps replay the layers' recordings).
- Several run in a ragged cache (scheduling/ragged.py): each sequence keeps its own keys and
  values in every layer, grown a block at a time, and one forward a step feeds every
  sequence's new tokens together (a running one's last token, a newcomer's prompt, a chunk of
  a long prompt) while each attends to its own cache only. A second request joining a lone
  one moves the lone one's columns in. `Engine.cache` is always the cache in use, so
  migrations, KV telemetry and auto-rebalance move and count every sequence's KV.
- The KV budget is `context` tokens (what the memory model planned), counted in blocks that
  are actually held. A request is admitted when its prompt and one block more fit beside
  what the others hold; each sequence grows as it decodes. When a step finds no block for a
  sequence, kept prefixes are evicted, then the newest sequence is preempted: its KV goes,
  it waits first in line, and when it runs again its prompt and tokens so far are computed
  again, so its answer goes on where it was (nothing is streamed twice).
- Leaving sequences' whole blocks are kept as prefixes (scheduling/prefix_cache.py, the
  engine's): a request whose prompt starts with one copies those keys and values and
  computes the rest only.

Models whose cache is not plain full attention in every layer (sliding windows, recurrent
states), that take no position ids, or whose layers partly run on other machines, run one
sequence at a time through the same loop (`ragged.ragged_reason`). The batch says so once,
with a Notice, at its first request.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from vramancer.config.errors import VramancerError
from vramancer.engine import events as ev
from vramancer.platforms.devices import DeviceLost
from vramancer.runtime import recovery
from vramancer.scheduling import kv_room
from vramancer.scheduling.constrained import Constraint
from vramancer.scheduling.generation import SamplingSettings, encode_prompt
from vramancer.scheduling.ragged import BLOCK, Piece, RaggedCache, blocks_for, ragged_forward, ragged_reason

log = logging.getLogger(__name__)

Emit = Callable[[ev.Event], None]
STATUS_INTERVAL_S = 0.25  # BatchStatus at most this often (and once when the batch empties)
RATE_WINDOW_S = 1.0  # tokens/s is counted over about this long
PROMPT_HEAD_CHARS = 60
ROOM_COLUMNS = 32  # KV columns reserved ahead: one copy of the cache every 32 steps, not every step
# A prompt longer than this that arrives while others decode is prefilled this many tokens per
# step, between their decode steps, so they keep streaming and a short newcomer is not held
# behind it for more than about one chunk.
PREFILL_CHUNK = 256


class AnswerText:
    """One answer's text as it streams.

    Each token's text goes out as soon as it is decoded; only an incomplete character is held
    back (a byte-level token that ends part-way through a character's UTF-8 bytes decodes to
    U+FFFD until the rest arrives), so an answer without spaces (emoji, code, most scripts)
    streams token by token. Special tokens are skipped. Stop strings are looked for in the
    whole decoded answer after every token; text that could still become the start of one is
    held back, so a stop string is never streamed."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.text = ""  # the answer so far (cut before a stop string once one is found)
        self.stopped = False  # a stop string was found
        self._sent = 0  # characters of `text` already streamed
        self._released = ""  # the text of the complete characters decoded so far
        self._line: list[int] = []  # the tokens of the current line (decoding starts afresh after one)
        self._line_text = 0  # characters of the current line already released

    def add(self, tokens: list[int]) -> str:
        """`tokens` are the answer's tokens so far, the last one new. Returns the piece to stream."""
        self._decode_next(tokens[-1])
        if not self.stops:  # nothing to look for: the released text is the answer so far
            self.text = self._released
            return self._release(len(self.text))
        full = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = min((i for i in (full.find(s) for s in self.stops) if i >= 0), default=None)
        if cut is not None:
            self.stopped = True
            self.text = full[:cut]
            return self._release(len(self.text))
        self.text = full
        return self._release(len(self._released) - self._held_back(self._released))

    def finish(self, tokens: list[int]) -> str:
        """The rest of the answer, held back until now (`tokens`: all of the answer's)."""
        if not self.stopped:
            self.text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return self._release(len(self.text))

    def _decode_next(self, token: int) -> None:
        self._line.append(token)
        text = self.tokenizer.decode(self._line, skip_special_tokens=True)
        complete = len(text.rstrip("\ufffd"))
        self._released += text[self._line_text:complete]
        if complete == len(text) and text.endswith("\n"):
            # Each token decodes the current line only, not the whole answer again.
            self._line, self._line_text = [], 0
        else:
            self._line_text = max(self._line_text, complete)

    def _release(self, upto: int) -> str:
        piece = self.text[self._sent:upto]
        self._sent = max(self._sent, upto)
        return piece

    def _held_back(self, text: str) -> int:
        """Length of the longest end of `text` that a stop string starts with."""
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest


@dataclass(eq=False)  # compared by identity: each one is a request of its own
class Sequence:
    """One request in the batch: what was asked, and what it has produced so far."""

    request: ev.Submit
    prompt_ids: list[int]
    settings: SamplingSettings
    arrived: float  # time.perf_counter() when the request arrived
    answer: AnswerText
    processors: LogitsProcessorList
    tokens: list[int] = field(default_factory=list)  # new tokens; the last one is the next input
    token_times: list[float] = field(default_factory=list)
    generator: torch.Generator | None = None
    finish_reason: str = ""  # stop | length | cancelled, once it is done
    logprobs: list[ev.TokenLogprob] = field(default_factory=list)  # tokens not yet sent with a Token event
    constraint: Constraint | None = None  # response_format or a required tool call: what it must follow
    slot: int | None = None  # its keys and values in the ragged cache, while it holds any
    held: int = 0  # tokens of its row (its prompt, then its new tokens) whose KV it holds
    blocks: int = 0  # KV blocks of the budget counted for it
    order: int = 0  # when it was last admitted: the newest is preempted first
    preempted: int = 0  # times its KV was dropped for room, to be computed again

    @property
    def length(self) -> int:
        """Tokens of its row: the prompt and every new token."""
        return len(self.prompt_ids) + len(self.tokens)

    @property
    def row(self) -> list[int]:
        return self.prompt_ids + self.tokens

    @property
    def request_id(self) -> str | int:
        return self.request.request_id

    @property
    def cached(self) -> int:
        """Tokens in this sequence's KV cache: the prompt and every new token but the last."""
        return len(self.prompt_ids) + max(len(self.tokens) - 1, 0)

    @property
    def final_length(self) -> int:
        return len(self.prompt_ids) + self.settings.max_new_tokens

    @property
    def greedy(self) -> bool:
        return self.settings.temperature == 0


def score_processors(settings: SamplingSettings, prompt_length: int) -> LogitsProcessorList:
    """What adjusts a request's scores before its token is picked: transformers' own
    processors and warpers, in the order generate applies them (ours for OpenAI's penalties)."""
    processors = LogitsProcessorList(settings.adjusting_processors(prompt_length))
    if settings.temperature > 0:
        if settings.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k:
            processors.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p is not None and settings.top_p < 1.0:
            processors.append(TopPLogitsWarper(settings.top_p))
        if settings.min_p:
            processors.append(MinPLogitsWarper(settings.min_p))
    return processors


def encode_request(tokenizer, request: ev.Submit) -> list[int]:
    """A request's prompt as token ids (its chat template unless raw); VramancerError if it
    cannot be encoded. Any thread may call it, each with a tokenizer of its own."""
    prompt = list(request.prompt) if isinstance(request.prompt, tuple) else request.prompt
    return encode_prompt(tokenizer, prompt, request.raw, tools=list(request.tools) or None)["input_ids"][0].tolist()


def single_sequence_reason(engine) -> str | None:
    """Why this model's requests cannot share a batch, or None when they can."""
    return ragged_reason(engine)


class Batch:
    """The sequences decoding together on one engine, driven step by step from one thread.

    `submit` a request, then call `step` while `busy`. Every outcome goes out through `emit`
    as events (RequestQueued, RequestStarted, Token, GenerationDone, RequestRefused,
    BatchStatus). Migrations may run between two steps: the batch's cache is `engine.cache`."""

    def __init__(self, engine, emit: Emit, max_batch: int = 8, max_waiting: int = 64):
        if max_batch < 1:
            raise VramancerError(f"--max-batch must be at least 1, not {max_batch}.")
        if max_waiting < 0:
            raise VramancerError(f"the waiting queue must hold 0 requests or more, not {max_waiting}.")
        self.engine = engine
        self.emit = emit
        self.max_waiting = max_waiting
        self.single_reason = single_sequence_reason(engine)
        self.max_batch = 1 if self.single_reason else max_batch
        self.running: list[Sequence] = []  # in the order of the cache's rows
        self.prefilling: Sequence | None = None  # a long prompt prefilled a chunk a step, beside them
        self.waiting: deque[Sequence] = deque()
        self.cache = None  # the lone sequence's cache, or the batch's RaggedCache
        self.width = 0  # columns of the lone sequence's cache
        self.attention = engine.model.config._attn_implementation
        # The engine's kept prefixes (None where sequences cannot share a batch).
        self.prefix = None if self.single_reason else getattr(engine, "prefix_cache", None)
        self.preemptions = 0
        self._joining: list[Sequence] = []  # admitted this step, not yet running
        self._order = 0
        self._slots = 0
        self._placement: list[str] | None = None
        self.steps = 0  # decode steps run since the scheduler last started from empty, for MigrationDone.step
        self._told_single = False
        takes = inspect.signature(engine.model.forward).parameters
        self._keep_one = {"logits_to_keep": 1} if "logits_to_keep" in takes else {}
        self._positions = "position_ids" in takes
        config = engine.model.generation_config
        eos = config.eos_token_id if config.eos_token_id is not None else engine.tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self._stamps: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self._status_at = 0.0
        self._status_sent = (0, 0)
        self.losses: list[str] = []  # devices lost while it ran, each said in a sentence
        self.failure: VramancerError | None = None  # why the requests were ended (abort after a loss), if they were

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting or self.prefilling)

    @property
    def context(self) -> int:
        return self.engine.context

    def holds(self, request_id: str | int) -> bool:
        return any(s.request_id == request_id for s in (*self.running, *self.waiting, *self._prefilling()))

    def _prefilling(self) -> list[Sequence]:
        return [self.prefilling] if self.prefilling is not None else []

    def tokens_so_far(self, request_id: str | int) -> int:
        """New tokens the request has made (0 once it has left, or before it starts)."""
        return next((len(s.tokens) for s in self.running if s.request_id == request_id), 0)

    # --- requests in ---------------------------------------------------------------------

    def submit(self, request: ev.Submit, arrived: float | None = None, prompt_ids: list[int] | None = None) -> bool:
        """Queue a request (RequestQueued), or refuse it (RequestRefused). True if queued.
        `prompt_ids`: the prompt already encoded (off this thread, `encode_request`)."""
        arrived = time.perf_counter() if arrived is None else arrived
        if self.single_reason and not self._told_single:
            self._told_single = True
            self.emit(ev.Notice(f"{self.engine.source.display_name} answers one request at a time: "
                                f"{self.single_reason}."))
        rid = request.request_id
        if not isinstance(rid, (str, int)) or isinstance(rid, bool) or rid == "" or self.holds(rid):
            return self._refuse(request, "bad_request", f"request id {rid!r} is empty or already in use.")
        try:
            settings = SamplingSettings(**request.sampling)
            settings.check()
            prompt = list(request.prompt) if isinstance(request.prompt, tuple) else request.prompt
            if prompt_ids is None:
                prompt_ids = encode_request(self.engine.tokenizer, request)
        except TypeError as exc:
            return self._refuse(request, "bad_request", f"the sampling settings are not understood: {exc}.")
        except VramancerError as exc:
            return self._refuse(request, "bad_request", str(exc))
        vocabulary = self.engine.model.config.vocab_size
        outside = sorted(t for t in (settings.logit_bias or {}) if t >= vocabulary)
        if outside:
            return self._refuse(request, "bad_request", f"logit_bias names token {outside[0]}, but this model's "
                                                        f"tokens are numbered 0 to {vocabulary - 1}.")
        stops = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop)
        if any(not isinstance(s, str) for s in stops):
            return self._refuse(request, "bad_request", "each stop sequence must be text.")
        prompt_tokens = len(prompt_ids)
        if request.fit_context:
            if prompt_tokens >= self.context:
                return self._refuse(request, "too_long", (
                    f"the prompt is {prompt_tokens} tokens, longer than the context of {self.context}; "
                    "start afresh or load with a larger --context."))
            # The KV cache was budgeted for `context` tokens: stop there rather than overrun it.
            settings.max_new_tokens = min(settings.max_new_tokens, self.context - prompt_tokens)
        wanted = settings.max_new_tokens
        if prompt_tokens + wanted > self.context:
            return self._refuse(request, "too_long", (
                f"the prompt is {prompt_tokens} tokens and {wanted} more were asked for, {prompt_tokens + wanted} in "
                f"all, more than the context of {self.context}; ask for fewer tokens or send a shorter prompt."))
        if len(self.waiting) - self._free_slots() >= self.max_waiting:
            return self._refuse(request, "queue_full", (
                f"{len(self.running)} requests are running and {len(self.waiting)} waiting, as many as may wait; "
                f"try again shortly."))
        constraint = None
        if request.constraint is not None:
            try:
                constraint = Constraint(*request.constraint, self.engine.tokenizer, vocabulary, sorted(self.eos))
            except VramancerError as exc:
                return self._refuse(request, "bad_request", str(exc))
        sequence = Sequence(request, prompt_ids, settings, arrived, AnswerText(self.engine.tokenizer, stops),
                            score_processors(settings, len(prompt_ids)), constraint=constraint)
        head = prompt if isinstance(prompt, str) else (prompt[-1].get("content", "") if prompt else "")
        self.emit(ev.RequestQueued(request.request_id, request.client, " ".join(head.split())[:PROMPT_HEAD_CHARS],
                                   prompt_tokens, wanted))
        if request.prompt_logprobs:
            self.emit(ev.PromptScored(request.request_id, self._score_prompt(prompt_ids, request.logprobs or 0)))
        self.waiting.append(sequence)
        return True

    def cancel(self, request_id: str | int) -> bool:
        """End a request now (between two steps): a running one leaves the batch with its KV,
        a waiting one ends with no tokens. False if the batch does not hold it."""
        for sequence in self.waiting:
            if sequence.request_id == request_id:
                self.waiting.remove(sequence)
                sequence.finish_reason = "cancelled"
                self._finish(sequence)
                self._report()
                return True
        for sequence in self.running:
            if sequence.request_id == request_id:
                sequence.finish_reason = "cancelled"
                self._leave()
                self._report()
                return True
        if self.prefilling is not None and self.prefilling.request_id == request_id:
            self._end_prefilling("cancelled")
            self._report()
            return True
        return False

    def _end_prefilling(self, reason: str) -> None:
        sequence, self.prefilling = self.prefilling, None
        self._release(sequence)
        sequence.finish_reason = reason
        self._finish(sequence)
        if not self.running:
            self._empty()

    def close(self) -> None:
        """Shutting down: running requests end cancelled (with the text they have), waiting
        ones are refused (shutting_down)."""
        for sequence in self.running:
            sequence.finish_reason = "cancelled"
        self._leave()
        if self.prefilling is not None:
            self._end_prefilling("cancelled")
        while self.waiting:
            sequence = self.waiting.popleft()
            if sequence.tokens:  # preempted: it streamed already, so it ends with the text it has
                sequence.finish_reason = "cancelled"
                self._finish(sequence)
                continue
            self.emit(ev.RequestRefused(sequence.request_id, "shutting_down",
                                        "the engine is shutting down; the request was not run."))
        self._report(force=True)

    def abort(self, message: str) -> None:
        """Something broke that the batch cannot go on from: every request ends, cancelled,
        and the reason goes out as one Error."""
        self.emit(ev.Error("Submit", message))
        for sequence in self.running:
            sequence.finish_reason = "cancelled"
        self._leave(keep=False)  # its KV may be on a device that is gone
        if self.prefilling is not None:
            self._end_prefilling("cancelled")
        while self.waiting:
            sequence = self.waiting.popleft()
            sequence.finish_reason = "cancelled"
            self._finish(sequence)
        self._report(force=True)

    # --- one step ------------------------------------------------------------------------

    def step(self) -> None:
        """Admit the waiting requests that fit, then one forward for every sequence: a decode
        step for the running ones, the prompts (or a chunk of a long one) of the newcomers. A
        device lost on the way is recovered and the batch rebuilt."""
        if not self.running:
            self.steps = 0  # counted from the start of each busy spell: a lone answer's step is its token count
        while True:
            try:
                with torch.inference_mode():
                    self._follow_split()
                    newcomers = self._admit()
                    try:
                        self._run(newcomers)
                    except BaseException:  # a device lost on the way: newcomers not yet started wait again
                        back = [s for s in newcomers if not s.finish_reason and s not in self.running
                                and s is not self.prefilling]
                        for sequence in back:
                            self._release(sequence)
                        self.waiting.extendleft(reversed(back))
                        raise
                break
            except DeviceLost as lost:
                self.recover(lost)
        self._report()

    def _run(self, newcomers: list[Sequence]) -> None:
        for sequence in [s for s in newcomers if not s.tokens and s.settings.max_new_tokens == 0]:
            sequence.finish_reason = "length"  # nothing asked: nothing to run
            self.emit(ev.RequestStarted(sequence.request_id))
            self._release(sequence)
            self._finish(sequence)
        newcomers = [s for s in newcomers if not s.finish_reason]
        if not self.running and self.prefilling is None and len(newcomers) == 1:
            self._join_alone(newcomers[0])
            if self.running:  # its first decode step too, as a lone answer always stepped
                self._decode_alone()
        elif newcomers or self.prefilling is not None or self.ragged:
            self._ragged_step(newcomers)
        elif self.running:
            self._decode_alone()

    @property
    def ragged(self) -> bool:
        return isinstance(self.cache, RaggedCache)

    def recover(self, lost: DeviceLost) -> None:
        """A device went away: re-place its layers, then rebuild every running sequence's KV.
        A lone sequence replays its prompt and its tokens so far step by step, as they first
        ran, so its answer goes on exactly; several are computed again together at the next
        step, so their greedy answers go on exactly only up to batch arithmetic. If the layers
        fit nowhere, every request ends (abort)."""
        self.losses.append(str(lost))
        if self.prefix is not None:
            self.prefix.clear()  # kept prefixes on the lost device are gone with it
        recovery.mark_lost(self.engine, lost)
        try:
            recovery.recover_lost_devices(self.engine, replay_tokens=max((len(s.tokens) for s in self.running),
                                                                        default=0))
        except VramancerError as exc:
            self.failure = exc
            self.abort(str(exc))
            return
        rows = [*self.running, *self._prefilling()]
        was_alone = not self.ragged
        self.prefilling = None
        self._empty()
        for sequence in rows:
            sequence.slot, sequence.held, sequence.blocks = None, 0, 0
        if len(rows) == 1 and was_alone:
            while True:
                try:
                    with torch.inference_mode():
                        self._join_alone(rows[0])
                    return
                except DeviceLost as again:
                    recovery.mark_lost(self.engine, again)
                    try:
                        recovery.recover_lost_devices(self.engine)
                    except VramancerError as exc:
                        self.running = rows
                        self.failure = exc
                        self.abort(str(exc))
                        return
                    self._empty()
        # Several: they go first in line, and the next step computes their rows again together.
        self.waiting.extendleft(reversed(rows))

    def _free_slots(self) -> int:
        return max(self.max_batch - len(self.running) - len(self._prefilling()), 0)

    # --- the KV budget -------------------------------------------------------------------

    @property
    def budget_blocks(self) -> int:
        """The KV the plan budgeted (`context` tokens, as the memory model counts it), in blocks."""
        return max(self.context // BLOCK, 1)

    def _holding(self) -> list[Sequence]:
        """Every sequence that holds (or is about to hold) KV."""
        joining = [s for s in self._joining if s not in self.running and s is not self.prefilling]
        return [*self.running, *self._prefilling(), *joining]

    def _held_blocks(self) -> int:
        held = sum(s.blocks for s in self._holding())
        return held + (self.prefix.blocks if self.prefix is not None else 0)

    def _room(self, blocks: int) -> bool:
        """`blocks` more fit the budget, kept prefixes evicted (least recently used first) to make them fit."""
        free = self.budget_blocks - self._held_blocks()
        if blocks > free and self.prefix is not None:
            self.prefix.evict(blocks - free)
            free = self.budget_blocks - self._held_blocks()
        return blocks <= free

    def _grow(self, sequence: Sequence, tokens: int) -> bool:
        """Room for `sequence` to hold `tokens`: blocks from the budget, then from kept prefixes,
        then by preempting the newest sequences. False if `sequence` itself was preempted."""
        want = min(blocks_for(tokens), blocks_for(sequence.final_length))
        while want > sequence.blocks and not self._room(want - sequence.blocks):
            others = [s for s in self._holding() if s.blocks]
            if len(others) <= 1:
                break  # alone it fits: it was admitted within the context
            newest = max(others, key=lambda s: s.order)
            self._preempt(newest)
            if newest is sequence:
                return False
        sequence.blocks = max(sequence.blocks, want)
        if self.ragged and sequence.slot is not None:
            self.cache.capacity[sequence.slot] = min(sequence.blocks * BLOCK, sequence.final_length)
        return True

    def _preempt(self, sequence: Sequence) -> None:
        """Out of KV room: `sequence` lets its KV go and waits, first in line; when it is admitted
        again its prompt and tokens so far are computed again, and its answer goes on."""
        if sequence is self.prefilling:
            self.prefilling = None
        if sequence in self.running:
            self.running.remove(sequence)
        if sequence in self._joining:
            self._joining.remove(sequence)
        self._release(sequence)
        sequence.preempted += 1
        self.preemptions += 1
        self.waiting.appendleft(sequence)

    def _release(self, sequence: Sequence) -> None:
        if self.ragged and sequence.slot is not None:
            self.cache.remove(sequence.slot)
        sequence.slot, sequence.held, sequence.blocks = None, 0, 0

    # --- admission -----------------------------------------------------------------------

    def _admit(self) -> list[Sequence]:
        """The waiting requests that fit join, first in line first: a request is admitted when
        its prompt (and one block to grow into, unless its whole answer fits less) fits the KV
        budget beside what the others hold now. While others decode, a prompt longer than a
        chunk is prefilled a chunk a step, one such at a time; shorter ones behind it still join."""
        newcomers = self._joining = []
        decoding = bool(self.running)
        for sequence in list(self.waiting):
            if len(self.running) + len(newcomers) + len(self._prefilling()) >= self.max_batch:
                break
            row = sequence.length
            if decoding and row > PREFILL_CHUNK and self.prefilling is not None:
                continue
            need = min(blocks_for(row) + 1, blocks_for(sequence.final_length))
            if not self._room(need):
                break  # it waits for KV room; the first in line goes first
            self.waiting.remove(sequence)
            self._order += 1
            sequence.order = self._order
            sequence.blocks = min(blocks_for(row), blocks_for(sequence.final_length))
            if decoding and row > PREFILL_CHUNK:
                self.prefilling = sequence
            newcomers.append(sequence)
        if newcomers and not self.running and self.prefilling is None:
            self.engine.recover_lost_nodes()  # a device lost between answers: re-place its layers first
        return newcomers

    def _find_prefix(self, sequence: Sequence):
        """The longest prefix of `sequence`'s prompt kept, or held now by a running sequence in
        the ragged cache (a prompt being prefilled a chunk a step included)."""
        if self.prefix is None or sequence.tokens:
            return None
        running = []
        if self.ragged:
            for other in [*self.running, *self._prefilling()]:
                if other.slot is not None and other.held >= BLOCK and other is not sequence:
                    running.append(((other.prompt_ids + other.tokens)[:other.held],
                                    lambda slot=other.slot, held=other.held: [layer.read(slot, held)
                                                                              for layer in self.cache.layers]))
        return self.prefix.find(sequence.prompt_ids, running)

    # --- one sequence alone --------------------------------------------------------------

    def _join_alone(self, sequence: Sequence) -> None:
        cache, logits = self._start_alone(sequence)
        self.cache, self.width, self.running = cache, sequence.cached, [sequence]
        sequence.held = sequence.cached
        if not sequence.tokens:
            self.emit(ev.RequestStarted(sequence.request_id))
            token = self._pick(sequence, logits)
            self._accept(sequence, token, time.perf_counter(), self._logprob(sequence, logits[0], token))
        if sequence.finish_reason:
            self._leave()

    def _start_alone(self, sequence: Sequence) -> tuple[object, torch.Tensor]:
        """A sequence that finds the batch empty runs exactly as `generate` ran it: its prompt
        in one forward, in the cache a lone answer uses (under CUDA graphs the engine's kept
        StaticCache, whose decode steps replay the layers' recordings). A kept prefix of its
        prompt is written into that cache first, and only the rest is computed. A rebuilt one
        (after a device was lost, or preempted) then replays its tokens so far one decode step
        at a time, the same forward passes in the same shapes as the first time, so its cache
        is rebuilt exactly. Returns its cache and the last step's logits [1, vocab]."""
        device = self.engine.split.input_device
        cache = self.engine.lone_cache()
        if cache is None:
            cache = kv_room.spare_room_cache(self.engine.model.config)
        self.engine.cache = cache  # migrations and telemetry see it from the first forward
        start = 0
        hit = self._find_prefix(sequence)
        if hit is not None:
            for layer, (keys, values) in zip(cache.layers, hit.layers()):
                layer.update(keys, values)
            start = hit.tokens
        extra = dict(self._keep_one)
        if self._positions:
            extra["position_ids"] = torch.arange(start, len(sequence.prompt_ids), device=device)[None]
        input_ids = torch.tensor([sequence.prompt_ids[start:]], device=device)
        output = self.engine.model(input_ids=input_ids, cache=cache, use_cache=True, **extra)
        for position, token in enumerate(sequence.tokens[:-1], start=len(sequence.prompt_ids)):
            kv_room.make_room(cache, ROOM_COLUMNS)
            extra = dict(self._keep_one)
            if self._positions:
                extra["position_ids"] = torch.tensor([[position]], device=device)
            output = self.engine.model(input_ids=torch.tensor([[token]], device=device), cache=cache,
                                       use_cache=True, **extra)
        return cache, output.logits[:, -1, :]

    def _decode_alone(self) -> None:
        """One decode step of the lone sequence in its own cache, exactly as `generate` steps."""
        device = self.engine.split.input_device
        sequence = self.running[0]
        extra = dict(self._keep_one)
        if self._positions:
            extra["position_ids"] = torch.tensor([[sequence.cached]], device=device)
        # Room for this step's column and, when the cache must grow, the next few: never past
        # its final length, so the KV stays within the budget it was admitted to.
        kv_room.make_room(self.cache, max(1, min(ROOM_COLUMNS, sequence.final_length - self.width)))
        output = self.engine.model(input_ids=torch.tensor([[sequence.tokens[-1]]], device=device), cache=self.cache,
                                   use_cache=True, **extra)
        self.width += 1
        sequence.held = self.width
        # Its blocks are the columns its cache has room for (spare ones included).
        self._grow(sequence, max(self.width + 1, getattr(self.cache.layers[0], "capacity", 0)))
        self.steps += 1
        now = time.perf_counter()
        logits = output.logits[:, -1, :]
        plain = sequence.greedy and not sequence.processors and sequence.constraint is None
        token = int(logits[0].argmax()) if plain else self._pick(sequence, logits)
        self._accept(sequence, token, now, self._logprob(sequence, logits[0], token))
        self._stamps.append((now, 1))
        if sequence.finish_reason:
            self._leave()

    def _to_ragged(self) -> None:
        """A second sequence joins a lone one: the lone one's used columns move into a ragged
        cache (under CUDA graphs this lets the kept StaticCache and its recordings go)."""
        ragged = RaggedCache(len(self.cache.layers), self.attention)
        sequence = self.running[0]
        sequence.slot = self._new_slot()
        ragged.add(sequence.slot)
        ragged.capacity[sequence.slot] = min(max(sequence.blocks, blocks_for(self.width + 1)) * BLOCK,
                                             sequence.final_length)
        layers = self.cache.layers
        if all(isinstance(layer, kv_room.SpareRoomLayer) and layer.key_room is not None
               and layer.key_room.shape[0] == 1 for layer in layers):
            # Its buffers (spare columns and all) become its own: no copy of a long prompt's KV.
            ragged.adopt(sequence.slot, [(layer.key_room, layer.value_room) for layer in layers], self.width)
        else:
            ragged.put(sequence.slot, [(layer.keys[:, :, :self.width], layer.values[:, :, :self.width])
                                       for layer in layers])
        self.cache = ragged
        self.engine.cache = ragged

    def _new_slot(self) -> int:
        self._slots += 1
        return self._slots

    # --- the ragged batch ----------------------------------------------------------------

    def _ragged_step(self, newcomers: list[Sequence]) -> None:
        """One forward for every sequence: each running one's last token, each newcomer's
        prompt (after a kept prefix), the long prompt's next chunk; each sequence attends to
        its own keys and values only (scheduling/ragged.py)."""
        if self.cache is not None and not self.ragged:
            self._to_ragged()
        elif self.cache is None:
            self.cache = RaggedCache(len(self.engine.split.layer_modules), self.attention)
            self.engine.cache = self.cache  # migrations and telemetry see the batch's KV
        cache = self.cache
        for sequence in newcomers:
            sequence.slot = self._new_slot()
            cache.add(sequence.slot)
            cache.capacity[sequence.slot] = min(sequence.blocks * BLOCK, sequence.final_length)
            hit = self._find_prefix(sequence)
            if hit is not None:
                cache.put(sequence.slot, hit.layers())
                sequence.held = hit.tokens
        # What each sequence feeds this step; room for it first (which may preempt the newest).
        work = [*self.running, *self._prefilling(), *[s for s in newcomers if s is not self.prefilling]]
        for sequence in work:
            if sequence.slot is not None:  # not preempted to make room for an older one
                self._grow(sequence, sequence.held + self._count(sequence))
        work = [s for s in work if s.slot is not None]
        self._joining = []
        if not work:
            return
        device = self.engine.split.input_device
        counts = [self._count(s) for s in work]
        # Decoding sequences only: one row each ([rows, 1]: the shape of the few-rows kernels and
        # of a fused layer's decode step, which asks the cache for each row's keys and values).
        as_rows = len(work) > 1 and all(c == 1 for c in counts)
        pieces, ids, positions = [], [], []
        for i, (sequence, count) in enumerate(zip(work, counts)):
            pieces.append(Piece(sequence.slot, 0 if as_rows else len(ids), count, sequence.held, i if as_rows else 0))
            if sequence.tokens and sequence.held == sequence.length - 1:  # a decode step: its last token
                ids.append(sequence.tokens[-1])
            else:
                ids.extend(sequence.row[sequence.held:sequence.held + count])
            positions.extend(range(sequence.held, sequence.held + count))
        ends = [p.offset + p.count - 1 for p in pieces]
        extra = {}
        if self._keep_one:
            extra["logits_to_keep"] = 1 if as_rows else torch.tensor(ends, device=device)
        shape = (len(ids), 1) if as_rows else (1, len(ids))
        if self._positions:
            extra["position_ids"] = torch.tensor(positions, device=device).view(shape)
        with ragged_forward(self.engine.model, cache, pieces):
            output = self.engine.model(input_ids=torch.tensor(ids, device=device).view(shape), cache=cache,
                                       use_cache=True, **extra)
        if as_rows:
            logits = output.logits[:, -1, :]
        else:
            logits = output.logits[0] if self._keep_one else output.logits[0, ends]
        self.steps += 1
        now = time.perf_counter()
        best = logits.argmax(dim=-1).tolist()  # greedy rows with nothing to adjust their scores take one argmax
        produced = 0
        for i, (sequence, piece) in enumerate(zip(work, pieces)):
            sequence.held += piece.count
            if sequence.held < sequence.length:
                continue  # a chunk of a long prompt: more to come
            if sequence is self.prefilling:
                self.prefilling = None
            if sequence not in self.running:
                self.running.append(sequence)
            if not sequence.tokens:
                self.emit(ev.RequestStarted(sequence.request_id))
            plain = sequence.greedy and not sequence.processors and sequence.constraint is None
            token = best[i] if plain else self._pick(sequence, logits[i:i + 1])
            self._accept(sequence, token, now, self._logprob(sequence, logits[i], token))
            produced += 1
        self._stamps.append((now, produced))
        if any(s.finish_reason for s in self.running):
            self._leave()

    def _count(self, sequence: Sequence) -> int:
        """Tokens `sequence` feeds this step: the rest of its row, or a chunk of a long prompt
        while others decode."""
        rest = sequence.length - sequence.held
        return min(rest, PREFILL_CHUNK) if sequence is self.prefilling else rest

    def _follow_split(self) -> None:
        """Kept prefixes go where their layers are now (a migration moved the running caches)."""
        if self.prefix is None:
            return
        placement = list(self.engine.placement.layer_devices)
        if placement != self._placement:
            self._placement = placement
            self.prefix.follow(self.engine.layer_torch_devices())

    def _pick(self, sequence: Sequence, logits: torch.Tensor) -> int:
        """The next token from one row's logits [1, vocab]: greedy, or sampled with the
        request's own generator (so a seed gives the same answer whatever else runs)."""
        scores = logits.to(dtype=torch.float32)
        if sequence.processors:
            so_far = torch.tensor([sequence.prompt_ids + sequence.tokens], device=scores.device)
            scores = sequence.processors(so_far, scores)
        if sequence.constraint is not None:
            scores = sequence.constraint.restrict(scores)
        if sequence.greedy:
            return int(scores.argmax(dim=-1))
        if sequence.generator is None:
            sequence.generator = torch.Generator(device=scores.device)
            if sequence.settings.seed is not None:
                sequence.generator.manual_seed(sequence.settings.seed)
            else:
                sequence.generator.seed()
        probabilities = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probabilities, 1, generator=sequence.generator))

    def _logprob(self, sequence: Sequence, logits: torch.Tensor, token: int) -> ev.TokenLogprob | None:
        """`token`'s log probability under the model's own softmax over one row's raw logits
        [vocab] (before penalties and warpers: what the model thinks, not what the sampler
        was allowed to pick), with the request's number of likeliest alternatives."""
        wanted = sequence.request.logprobs
        if wanted is None or token in self.eos:
            return None  # the end-of-text token is not part of the answer's text
        logprobs = torch.log_softmax(logits.to(torch.float32), dim=-1)
        decode = self.engine.tokenizer.decode
        top = ()
        if wanted:
            values, ids = torch.topk(logprobs, wanted)
            top = tuple((decode([i]), v) for i, v in zip(ids.tolist(), values.tolist()))
        return ev.TokenLogprob(decode([token]), float(logprobs[token]), top)

    def _score_prompt(self, ids: list[int], alternatives: int) -> tuple[ev.TokenLogprob, ...]:
        """Each prompt token's log probability given the tokens before it, from one forward over
        the prompt that keeps every position's logits (a prefill keeps only the last), with
        `alternatives` likeliest tokens at each position. Its own pass, without a cache: the
        sequence's prefill, when its turn comes, is the same as for any other request."""
        device = self.engine.split.input_device
        with torch.inference_mode():
            logits = self.engine.model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0]
        decode = self.engine.tokenizer.decode
        scored = [ev.TokenLogprob(decode([ids[0]]), None)]
        for position in range(1, len(ids)):
            row = torch.log_softmax(logits[position - 1].to(torch.float32), dim=-1)
            top = ()
            if alternatives:
                values, best = torch.topk(row, alternatives)
                top = tuple((decode([i]), v) for i, v in zip(best.tolist(), values.tolist()))
            scored.append(ev.TokenLogprob(decode([ids[position]]), float(row[ids[position]]), top))
        return tuple(scored)

    def _accept(self, sequence: Sequence, token: int, now: float, logprob: ev.TokenLogprob | None = None) -> None:
        sequence.tokens.append(token)
        sequence.token_times.append(now)
        if logprob is not None:
            sequence.logprobs.append(logprob)
        if sequence.constraint is not None and token not in self.eos:
            sequence.constraint.accept(token)
        piece = sequence.answer.add(sequence.tokens)
        if piece:
            self.emit(ev.Token(piece, sequence.request_id, self._take_logprobs(sequence), step=len(sequence.tokens)))
        if token in self.eos or sequence.answer.stopped or (sequence.constraint and sequence.constraint.done):
            sequence.finish_reason = "stop"
        elif len(sequence.tokens) >= sequence.settings.max_new_tokens:
            sequence.finish_reason = "length"

    # --- leaving -------------------------------------------------------------------------

    def _leave(self, keep: bool = True) -> None:
        """Finished sequences leave: the whole blocks of their KV are kept as a prefix for later
        requests (within the budget), then their KV goes."""
        for sequence in [s for s in self.running if s.finish_reason]:
            if keep:
                self._keep_prefix(sequence)
            self.running.remove(sequence)
            self._release(sequence)
            self._finish(sequence)
        if not self.running and self.prefilling is None:
            self._empty()

    def _keep_prefix(self, sequence: Sequence) -> None:
        if self.prefix is None or sequence.held < BLOCK or self.cache is None:
            return
        tokens = (sequence.prompt_ids + sequence.tokens)[:sequence.held]
        if self.ragged:
            layers = [layer.read(sequence.slot, sequence.held) for layer in self.cache.layers]
        else:
            layers = [(layer.keys[:, :, :sequence.held], layer.values[:, :, :sequence.held])
                      for layer in self.cache.layers]
        running = sum(s.blocks for s in self._holding() if s is not sequence)  # its own blocks are about to go
        self.prefix.keep(tokens, layers, self.budget_blocks - running)

    def _empty(self) -> None:
        self.running = []
        self.cache = None
        self.width = 0
        self.engine.cache = None

    @staticmethod
    def _take_logprobs(sequence: Sequence) -> tuple[ev.TokenLogprob, ...]:
        taken = tuple(sequence.logprobs)
        sequence.logprobs.clear()
        return taken

    def _finish(self, sequence: Sequence) -> None:
        rest = sequence.answer.finish(sequence.tokens)
        if rest or sequence.logprobs:  # tokens held back until now go out with the last text
            self.emit(ev.Token(rest, sequence.request_id, self._take_logprobs(sequence), step=len(sequence.tokens)))
        times = sequence.token_times
        now = time.perf_counter()
        rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None
        self.emit(ev.GenerationDone(
            request_id=sequence.request_id,
            text=sequence.answer.text,
            token_ids=tuple(sequence.tokens),
            prompt_tokens=len(sequence.prompt_ids),
            new_tokens=len(sequence.tokens),
            ttft_s=times[0] - sequence.arrived if times else None,
            decode_tokens_per_s=rate,
            cancelled=sequence.finish_reason == "cancelled",
            finish_reason=sequence.finish_reason,
            total_s=(times[-1] if times and sequence.finish_reason != "cancelled" else now) - sequence.arrived,
        ))

    def _refuse(self, request: ev.Submit, reason: str, message: str) -> bool:
        self.emit(ev.RequestRefused(request.request_id, reason, message))
        return False

    # --- status --------------------------------------------------------------------------

    def tokens_per_s(self, now: float | None = None) -> float:
        """All sequences together, over the last second or so."""
        now = time.perf_counter() if now is None else now
        while self._stamps and now - self._stamps[0][0] > RATE_WINDOW_S:
            self._stamps.popleft()
        if len(self._stamps) < 2:
            return 0.0
        span = self._stamps[-1][0] - self._stamps[0][0]
        return sum(n for _, n in list(self._stamps)[1:]) / span if span > 0 else 0.0

    def status(self) -> ev.BatchStatus:
        held = sum(s.held for s in (*self.running, *self._prefilling()))
        prefix = self.prefix
        return ev.BatchStatus(len(self.running) + len(self._prefilling()), len(self.waiting), self.tokens_per_s(),
                              held, self.context, prefix_hits=prefix.hits if prefix else 0,
                              prefix_misses=prefix.misses if prefix else 0,
                              prefix_tokens_reused=prefix.tokens_reused if prefix else 0,
                              kv_blocks=self._held_blocks(), kv_budget_blocks=self.budget_blocks,
                              preemptions=self.preemptions)

    def _report(self, force: bool = False) -> None:
        """BatchStatus, coalesced: at most every STATUS_INTERVAL_S, and once when the batch empties."""
        now = time.perf_counter()
        emptied = not self.busy and self._status_sent != (0, 0)
        if not (force or emptied or now - self._status_at >= STATUS_INTERVAL_S):
            return
        status = self.status()
        self._status_at = now
        self._status_sent = (status.running, status.waiting)
        self.emit(status)


__all__ = ["AnswerText", "Batch", "Sequence", "encode_request", "single_sequence_reason"]
