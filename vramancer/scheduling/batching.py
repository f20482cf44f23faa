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

How it works (simple and exact):
- One DynamicCache for the whole batch, so `Engine.cache` is it and the existing
  migration, KV telemetry and auto-rebalance move and count every sequence's KV unchanged.
  Its layers keep spare columns (scheduling/kv_room.py), so a step writes one column instead of
  copying the cache.
- Rows are left-padded to a common width T. The requests that join between two steps are
  prefilled together (one forward, left-padded, in a fresh cache of their own; a lone one
  exactly as `generate` would), each one's first token sampled from its prefill logits, then
  their keys and values, zero on padding, are stacked under the batch's (or the batch is
  padded when the newcomers are longer).
- A decode step feeds every row's last token with a 2D attention mask (0 on padding; left out
  when there is no padding, as generate does) and position ids = each row's real length.
- A sequence that leaves takes its rows with it; columns that are padding for every row left
  are dropped.

Models whose cache is not plain full attention in every layer (sliding windows, recurrent
states), that take no position ids, or whose layers partly run on other machines, run one
sequence at a time through the same loop: their caches cannot be padded and stacked row by
row here. The batch says so once, with a Notice, at its first request.

Memory: the plan budgets KV for `context` tokens, shared by the batch (llama.cpp's meaning of
--context). A request needs prompt + max_tokens <= context; it joins only when the padded
batch after it fits at every sequence's final length: (running + 1) x max(final lengths) <=
context. Until then it waits; past `max_waiting` waiting ones, it is refused.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.nn import functional as F
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.cache_utils import DynamicLayer

from vramancer.config.errors import VramancerError
from vramancer.engine import events as ev
from vramancer.platforms.devices import DeviceLost
from vramancer.runtime import recovery
from vramancer.scheduling import kv_room
from vramancer.scheduling.constrained import Constraint
from vramancer.scheduling.generation import SamplingSettings, encode_prompt

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
    partial: DynamicCache | None = None  # while it is prefilled in chunks: its own cache so far
    prefilled: int = 0  # tokens of its prompt in `partial`
    partial_placement: list[str] | None = None  # the split `partial` was made on

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
    """Why this model's requests cannot share a padded batch, or None when they can."""
    model = engine.model
    if engine.connected:
        return "some of its layers run on other machines, whose caches are not padded row by row"
    if any(type(layer) is not DynamicLayer for layer in DynamicCache(config=model.config).layers):
        return "not every layer keeps a plain full-attention cache (sliding windows or recurrent states)"
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return "it takes no position ids, so left-padded rows would get the wrong positions"
    return None


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
        self.cache: DynamicCache | None = None
        self.width = 0  # columns of every row of the cache (the padded length T)
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
        sequence.partial = None
        sequence.finish_reason = reason
        self._finish(sequence)

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
            self.emit(ev.RequestRefused(sequence.request_id, "shutting_down",
                                        "the engine is shutting down; the request was not run."))
        self._report(force=True)

    def abort(self, message: str) -> None:
        """Something broke that the batch cannot go on from: every request ends, cancelled,
        and the reason goes out as one Error."""
        self.emit(ev.Error("Submit", message))
        for sequence in self.running:
            sequence.finish_reason = "cancelled"
        self._leave()
        if self.prefilling is not None:
            self._end_prefilling("cancelled")
        while self.waiting:
            sequence = self.waiting.popleft()
            sequence.finish_reason = "cancelled"
            self._finish(sequence)
        self._report(force=True)

    # --- one step ------------------------------------------------------------------------

    def step(self) -> None:
        """Admit the waiting requests that fit (prefilled together), then one decode step
        for the batch. A device lost on the way is recovered and the batch rebuilt."""
        if not self.running:
            self.steps = 0  # counted from the start of each busy spell: a lone answer's step is its token count
        while True:
            try:
                with torch.inference_mode():
                    self._admit()
                    if self.prefilling is not None:
                        self._prefill_chunk()
                    if self.running:
                        self._decode()
                break
            except DeviceLost as lost:
                self.recover(lost)
        self._report()

    def recover(self, lost: DeviceLost) -> None:
        """A device went away: re-place its layers, then rebuild every running sequence's KV.
        A lone sequence replays its prompt and its tokens so far step by step, as they first
        ran, so its answer goes on exactly; several are prefilled together, so their greedy
        answers go on exactly only up to batch arithmetic. If the layers fit nowhere, every
        request ends (abort)."""
        self.losses.append(str(lost))
        if self.prefilling is not None:  # its chunks so far were made on the old split: start over
            self.prefilling.partial, self.prefilling.prefilled = None, 0
        recovery.mark_lost(self.engine, lost)
        try:
            recovery.recover_lost_devices(self.engine, replay_tokens=max((len(s.tokens) for s in self.running),
                                                                        default=0))
        except VramancerError as exc:
            self.failure = exc
            self.abort(str(exc))
            return
        rows = self.running
        self._empty()
        while True:
            try:
                with torch.inference_mode():
                    self._join([s for s in rows if s not in self.running])
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

    def _free_slots(self) -> int:
        return max(self.max_batch - len(self.running), 0)

    def _admit(self) -> None:
        """The waiting requests that fit join, first in line first, prefilled together. While
        others decode, a long prompt is not prefilled at once: it is taken aside and
        prefilled a chunk a step (`_prefill_chunk`), one at a time; shorter ones behind it
        still join."""
        newcomers: list[Sequence] = []
        for sequence in list(self.waiting):
            if len(self.running) + len(newcomers) + len(self._prefilling()) >= self.max_batch:
                break
            finals = [s.final_length for s in (*self.running, *newcomers, *self._prefilling(), sequence)]
            if len(finals) * max(finals) > self.context:
                break  # it waits for KV room; the first in line goes first
            if (self.running or self.prefilling) and sequence.cached + 1 > PREFILL_CHUNK:
                if self.prefilling is None:
                    self.waiting.remove(sequence)
                    self.prefilling = sequence
                continue
            self.waiting.remove(sequence)
            newcomers.append(sequence)
        if not newcomers:
            return
        try:
            if not self.running:
                self.engine.recover_lost_nodes()  # a device lost between answers: re-place its layers first
            self._join(newcomers)
        except BaseException:  # a device lost on the way: they wait again, first in line
            self.waiting.extendleft(reversed([s for s in newcomers if not s.finish_reason]))
            raise

    def _join(self, sequences: list[Sequence]) -> None:
        """Prefill `sequences` in one forward and stack their KV under the batch's. A new
        sequence gets its first token from the prefill; a rebuilt one keeps its last token as
        the next input."""
        for sequence in [s for s in sequences if not s.tokens and s.settings.max_new_tokens == 0]:
            sequence.finish_reason = "length"  # nothing asked: nothing to run
            self.emit(ev.RequestStarted(sequence.request_id))
            self._finish(sequence)
        sequences = [s for s in sequences if not s.finish_reason]
        if not sequences:
            return
        if not self.running and len(sequences) == 1:
            cache, logits = self._start_alone(sequences[0])
        else:
            cache, logits = self._prefill(sequences)
        now = time.perf_counter()
        for i, sequence in enumerate(sequences):
            if not sequence.tokens:
                self.emit(ev.RequestStarted(sequence.request_id))
                token = self._pick(sequence, logits[i:i + 1])
                self._accept(sequence, token, now, self._logprob(sequence, logits[i], token))
        keep = [i for i, s in enumerate(sequences) if not s.finish_reason]
        for sequence in sequences:
            if sequence.finish_reason:
                self._finish(sequence)
        if not keep:
            return
        width = max(s.cached for s in sequences)
        if len(keep) < len(sequences):
            sequences = [sequences[i] for i in keep]
            _keep_rows(cache, keep, width - max(s.cached for s in sequences))
            width = max(s.cached for s in sequences)
        self._stack(sequences, cache, width)

    def _prefill(self, sequences: list[Sequence]) -> tuple[DynamicCache, torch.Tensor]:
        """One forward over each sequence's tokens so far (its prompt and its new tokens but the
        last), left-padded to the longest: their cache and each row's last logits [rows, vocab].

        One sequence alone runs exactly as `generate`'s prefill (no mask, no padding). Several
        share the forward with a mask that hides the padding, positions counted from each
        row's first real token, and the padding's keys and values zeroed afterwards, like the
        padding `_stack` adds; their first tokens then equal their solo answers up to batch
        arithmetic."""
        device = self.engine.split.input_device
        rows = [s.prompt_ids + s.tokens[:-1] for s in sequences]
        width = max(len(r) for r in rows)
        pads = [width - len(r) for r in rows]
        # The padding's token is any valid id: the mask hides it from every real position.
        input_ids = torch.tensor([[r[0]] * pad + r for r, pad in zip(rows, pads)], device=device)
        extra = dict(self._keep_one)
        if any(pads):
            extra["attention_mask"] = torch.tensor([[0] * pad + [1] * len(r) for r, pad in zip(rows, pads)],
                                                   device=device)
        if self._positions:
            extra["position_ids"] = torch.tensor([[0] * pad + list(range(len(r))) for r, pad in zip(rows, pads)],
                                                 device=device)
        cache = kv_room.spare_room_cache(self.engine.model.config)
        output = self.engine.model(input_ids=input_ids, cache=cache, use_cache=True, **extra)
        for i, pad in enumerate(pads):
            if pad:
                for layer in cache.layers:
                    layer.keys[i, :, :pad] = 0
                    layer.values[i, :, :pad] = 0
        return cache, output.logits[:, -1, :]

    def _prefill_chunk(self) -> None:
        """The next chunk of the long prompt being prefilled beside the batch, in a cache of its
        own; after the last one it gets its first token and its rows join the batch's."""
        sequence = self.prefilling
        placement = list(self.engine.placement.layer_devices)
        if sequence.partial is None or sequence.partial_placement != placement:
            # First chunk, or the split changed since the last one (a migration moves the
            # batch's cache, not this one): start its prefill on the split as it is now.
            sequence.partial = kv_room.spare_room_cache(self.engine.model.config)
            sequence.partial_placement, sequence.prefilled = placement, 0
        device = self.engine.split.input_device
        row = sequence.prompt_ids + sequence.tokens[:-1]
        chunk = row[sequence.prefilled:sequence.prefilled + PREFILL_CHUNK]
        extra = dict(self._keep_one)
        if self._positions:
            extra["position_ids"] = torch.arange(sequence.prefilled, sequence.prefilled + len(chunk),
                                                 device=device)[None]
        output = self.engine.model(input_ids=torch.tensor([chunk], device=device), cache=sequence.partial,
                                   use_cache=True, **extra)
        sequence.prefilled += len(chunk)
        if sequence.prefilled < len(row):
            return
        cache, sequence.partial, self.prefilling = sequence.partial, None, None
        if not sequence.tokens:
            self.emit(ev.RequestStarted(sequence.request_id))
            logits = output.logits[:, -1, :]
            token = self._pick(sequence, logits)
            self._accept(sequence, token, time.perf_counter(), self._logprob(sequence, logits[0], token))
        if sequence.finish_reason:
            self._finish(sequence)
            return
        self._stack([sequence], cache, sequence.cached)

    def _start_alone(self, sequence: Sequence) -> tuple[DynamicCache, torch.Tensor]:
        """A sequence that finds the batch empty runs exactly as `generate` ran it: its prompt
        in one forward, in the cache a lone answer uses (under CUDA graphs the engine's kept
        StaticCache, whose decode steps replay the layers' recordings). A rebuilt one (after a
        device was lost) then replays its tokens so far one decode step at a time, the same
        forward passes in the same shapes as the first time, so its cache is rebuilt exactly.
        Returns its cache and the last step's logits [1, vocab]."""
        device = self.engine.split.input_device
        cache = self.engine.lone_cache()
        if cache is None:
            cache = kv_room.spare_room_cache(self.engine.model.config)
        extra = dict(self._keep_one)
        if self._positions:
            extra["position_ids"] = torch.arange(len(sequence.prompt_ids), device=device)[None]
        input_ids = torch.tensor([sequence.prompt_ids], device=device)
        self.engine.cache = cache  # migrations and telemetry see it from the first forward
        output = self.engine.model(input_ids=input_ids, cache=cache, use_cache=True, **extra)
        for position, token in enumerate(sequence.tokens[:-1], start=len(sequence.prompt_ids)):
            kv_room.make_room(cache, ROOM_COLUMNS)
            extra = dict(self._keep_one)
            if self._positions:
                extra["position_ids"] = torch.tensor([[position]], device=device)
            output = self.engine.model(input_ids=torch.tensor([[token]], device=device), cache=cache,
                                       use_cache=True, **extra)
        return cache, output.logits[:, -1, :]

    def _stack(self, sequences: list[Sequence], cache: DynamicCache, width: int) -> None:
        """Add the rows of `cache` (`width` columns, `sequences` in its row order) under the
        batch's, left-padding whichever side is shorter."""
        if not self.running:
            self.cache = cache
            self.width = width
            self.running = list(sequences)
            self.engine.cache = cache  # migrations and telemetry see the batch's KV
            return
        if not isinstance(self.cache, DynamicCache):
            self._to_batch_cache()
        wider = max(self.width, width)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            for name in ("keys", "values"):
                ours = _left_pad(getattr(mine, name), wider - self.width)
                new = _left_pad(getattr(theirs, name), wider - width).to(ours.device)
                setattr(mine, name, torch.cat([ours, new]))
        self.width = wider
        self.running.extend(sequences)

    def _to_batch_cache(self) -> None:
        """A lone sequence ran in the engine's StaticCache (CUDA graphs): a second one joins, so
        its used columns move into a batch cache, whose rows can be padded and stacked."""
        batch_cache = kv_room.spare_room_cache(self.engine.model.config)
        for mine, static in zip(batch_cache.layers, self.cache.layers):
            mine.lazy_initialization(static.keys, static.values)
            mine.keys = static.keys[:, :, :self.width].clone()
            mine.values = static.values[:, :, :self.width].clone()
        self.cache = batch_cache
        self.engine.cache = batch_cache  # the kept StaticCache and the recordings are let go

    def _decode(self) -> None:
        device = self.engine.split.input_device
        rows = self.running
        input_ids = torch.tensor([[s.tokens[-1]] for s in rows], device=device)
        extra = dict(self._keep_one)
        if any(s.cached != self.width for s in rows):
            mask = torch.zeros(len(rows), self.width + 1, dtype=torch.long)
            for i, sequence in enumerate(rows):
                mask[i, self.width - sequence.cached:] = 1
            extra["attention_mask"] = mask.to(device)
        if self._positions:
            extra["position_ids"] = torch.tensor([[s.cached] for s in rows], device=device)
        # Room for this step's column and, when the cache must grow, the next few: never past
        # the longest final length (the width never exceeds it: see `_leave`), so the KV stays
        # within the budget the batch was admitted to.
        kv_room.make_room(self.cache, max(1, min(ROOM_COLUMNS, max(s.final_length for s in rows) - self.width)))
        output = self.engine.model(input_ids=input_ids, cache=self.cache, use_cache=True, **extra)
        self.width += 1
        self.steps += 1
        now = time.perf_counter()
        logits = output.logits[:, -1, :]
        # Greedy rows with nothing to adjust their scores take one argmax together.
        best = logits.argmax(dim=-1).tolist()
        for i, sequence in enumerate(rows):
            plain = sequence.greedy and not sequence.processors and sequence.constraint is None
            token = best[i] if plain else self._pick(sequence, logits[i:i + 1])
            self._accept(sequence, token, now, self._logprob(sequence, logits[i], token))
        self._stamps.append((now, len(rows)))
        if any(s.finish_reason for s in rows):
            self._leave()

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

    def _leave(self) -> None:
        """Finished sequences leave: their rows go, and columns that are padding for every row
        left are dropped."""
        keep = [i for i, s in enumerate(self.running) if not s.finish_reason]
        for sequence in self.running:
            if sequence.finish_reason:
                self._finish(sequence)
        if not keep:
            self._empty()
            return
        if len(keep) == len(self.running):
            return
        self.running = [self.running[i] for i in keep]
        width = max(s.cached for s in self.running)
        _keep_rows(self.cache, keep, self.width - width)
        self.width = width

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
        prefilling = self.prefilling.prefilled if self.prefilling is not None else 0
        return ev.BatchStatus(len(self.running) + len(self._prefilling()), len(self.waiting), self.tokens_per_s(),
                              len(self.running) * self.width + prefilling, self.context)

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


def _keep_rows(cache: DynamicCache, rows: list[int], drop: int) -> None:
    """Keep only `rows` of every layer's keys and values, without their first `drop` columns."""
    for layer in cache.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name)
            index = torch.tensor(rows, device=tensor.device)
            setattr(layer, name, tensor[:, :, drop:, :].index_select(0, index))


def _left_pad(tensor: torch.Tensor, columns: int) -> torch.Tensor:
    """`tensor` [batch, heads, length, dim] with `columns` zero columns before its first."""
    return F.pad(tensor, (0, 0, columns, 0)) if columns > 0 else tensor


__all__ = ["AnswerText", "Batch", "Sequence", "encode_request", "single_sequence_reason"]
