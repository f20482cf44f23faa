"""Streaming generation on a split model with transformers' own `generate`.

VRAMancer owns placement, not decoding: sampling, stopping and streaming are transformers'.
Two small adapters connect them to us: a streamer that hands decoded text to a callback, and
a stopping criterion that runs between two decode steps — where cancellation is checked and
pending migrations are applied.

There is one generate loop. A device lost mid-answer (DeviceLost) is handled by a guard the
caller passes (`on_lost`): it re-places the lost layers and hands back a fresh cache; the loop
then replays the prompt and the tokens so far, forced, one decode step at a time — the same
forward passes, in the same shapes, as the first time — so every layer's cache is rebuilt
exactly and the greedy answer goes on as if nothing happened. Text already streamed is not
streamed again.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TextStreamer,
)

from vramancer.config.errors import VramancerError
from vramancer.platforms.devices import DeviceLost

Messages = list[dict[str, str]]


@dataclass
class SamplingSettings:
    """How to pick tokens. temperature 0 means greedy, as in llama.cpp and the OpenAI API."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    # OpenAI's penalties on the answer's own tokens: each token already in the answer loses
    # `presence_penalty` once and `frequency_penalty` per time it appears.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float | None = None  # sampling keeps tokens at least this fraction of the likeliest one
    logit_bias: dict[int, float] | None = None  # token id -> added to its score, every step

    def check(self) -> None:
        """Refuse any value generate could not use, nan and infinities included."""
        from vramancer.config.validation import check_adjustments, check_sampling

        check_sampling(self.max_new_tokens, self.temperature, self.top_p, self.top_k, self.seed,
                       self.repetition_penalty)
        check_adjustments(self.presence_penalty, self.frequency_penalty, self.min_p, self.logit_bias)

    def adjusting_processors(self, prompt_length: int) -> list[LogitsProcessor]:
        """What changes the scores before any warper, in generate's order for the built-in ones:
        the repetition penalty, then the answer's own penalties, then the bias."""
        processors: list[LogitsProcessor] = []
        if self.repetition_penalty is not None and self.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.presence_penalty or self.frequency_penalty:
            processors.append(OccurrencePenalty(prompt_length, self.presence_penalty, self.frequency_penalty))
        if self.logit_bias:
            processors.append(SequenceBiasLogitsProcessor([[[token], bias] for token, bias in self.logit_bias.items()]))
        return processors

    def generate_kwargs(self) -> dict:
        kwargs: dict = {"max_new_tokens": self.max_new_tokens}
        if self.temperature == 0:
            kwargs["do_sample"] = False
            # Say so explicitly, so a model's own sampling defaults don't leak into greedy.
            kwargs.update(temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=self.temperature)
            kwargs["top_p"] = self.top_p if self.top_p is not None else 1.0
            kwargs["top_k"] = self.top_k if self.top_k is not None else 0
        if self.repetition_penalty is not None:
            kwargs["repetition_penalty"] = self.repetition_penalty
        if self.min_p is not None and self.temperature > 0:
            kwargs["min_p"] = self.min_p
        return kwargs


class OccurrencePenalty(LogitsProcessor):
    """OpenAI's presence and frequency penalties (transformers has none): counted over the
    answer only, not the prompt, as OpenAI and vLLM count them."""

    def __init__(self, prompt_length: int, presence: float, frequency: float):
        self.prompt_length = prompt_length
        self.presence = presence
        self.frequency = frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        answer = input_ids[:, self.prompt_length:]
        if answer.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, answer, torch.ones_like(answer, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    new_tokens: int
    ttft_s: float | None
    decode_tokens_per_s: float | None
    total_s: float
    cancelled: bool = False
    stats: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("stats")
        return data


class CallbackStreamer(TextStreamer):
    """transformers' TextStreamer, handing the text of each token to a callback as soon as it
    is decoded. TextStreamer itself releases text only at a space, a newline or a CJK
    character, so an answer without spaces (emoji, code, most scripts) arrived all at once at
    the end. Here only an incomplete character is held back: a byte-level token that ends
    part-way through a character's UTF-8 bytes decodes to U+FFFD until the rest arrives.

    It can start over: after `resume(n)` it skips the prompt and the n tokens already shown."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text
        self.token_times: list[float] = []
        self.skip = 0

    def put(self, value: torch.Tensor) -> None:
        if self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        if self.skip > 0:
            self.skip -= 1
            return
        self.token_times.append(time.perf_counter())
        self.token_cache.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        complete = len(text.rstrip("\ufffd"))
        piece = text[self.print_len:complete]
        if complete == len(text) and text.endswith("\n"):
            # Decoding starts afresh after a line, as TextStreamer's does, so each token
            # decodes the current line only, not the whole answer again.
            self.token_cache = []
            self.print_len = 0
        else:
            self.print_len = max(self.print_len, complete)
        self.on_finalized_text(piece)

    def resume(self, skip: int) -> None:
        self.next_tokens_are_prompt = True
        self.skip = skip

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text and self.on_text is not None:
            self.on_text(text)


class BetweenSteps(StoppingCriteria):
    """Called by generate after each new token and before the next forward pass.

    `on_step(n)` gets the number of new tokens so far; it may change the model's placement
    (a migration), which is safe here because no forward pass is running."""

    def __init__(self, prompt_length: int, cancel: threading.Event, on_step: Callable[[int], None] | None):
        self.prompt_length = prompt_length
        self.cancel = cancel
        self.on_step = on_step
        self.reported = 0  # steps told to on_step: a replayed step is not told twice
        self._ids: torch.LongTensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self._ids = input_ids
        step = input_ids.shape[1] - self.prompt_length
        if self.on_step is not None and step > self.reported:
            self.reported = step
            self.on_step(step)
        stop = self.cancel.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    def tokens(self) -> list[int]:
        """The new tokens produced so far."""
        return [] if self._ids is None else self._ids[0, self.prompt_length:].tolist()


class ForcedPrefix(LogitsProcessor):
    """Makes the first tokens of a generation the ones given, whatever the model prefers."""

    def __init__(self, prompt_length: int, tokens: list[int]):
        self.prompt_length = prompt_length
        self.tokens = tokens

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        if step < len(self.tokens):
            forced = torch.full_like(scores, float("-inf"))
            forced[:, self.tokens[step]] = 0.0
            return forced
        return scores


def _not_empty(encoded: dict) -> dict:
    if encoded["input_ids"].shape[-1] == 0:
        # transformers hands an empty tokenizer for a folder that holds none: every prompt
        # then encodes to nothing, and the model would fail deep inside its first layer.
        raise VramancerError("the prompt encodes to no tokens: this model's tokenizer has no vocabulary "
                             "(does the model's folder hold its tokenizer files?).")
    return encoded


def encode_prompt(tokenizer, prompt: str | Messages, raw: bool, tools: list[dict] | None = None) -> dict:
    """Token ids for a prompt: the chat template for instruct models unless `raw`, showing the
    model `tools` (OpenAI's function definitions) where its template takes them."""
    from vramancer.config.validation import check_prompt

    check_prompt(prompt, raw)
    if isinstance(prompt, str):
        if raw or not getattr(tokenizer, "chat_template", None):
            return _not_empty(dict(tokenizer(prompt, return_tensors="pt")))
        prompt = [{"role": "user", "content": prompt}]
    if not getattr(tokenizer, "chat_template", None):
        raise VramancerError("this model has no chat template, so a conversation cannot be encoded; use --raw.")
    # A conversation that ends with the assistant's words is a prefill: the answer goes on from
    # them, in the same turn, rather than the template closing that turn and opening another.
    last = prompt[-1]
    prefill = last.get("role") == "assistant" and bool(str(last.get("content") or "").strip())
    if tools and "tools" not in tokenizer.chat_template:
        raise VramancerError("this model's chat template takes no tools, so tool calling cannot be served for it.")
    encoded = tokenizer.apply_chat_template(prompt, tools=tools or None, add_generation_prompt=not prefill,
                                            continue_final_message=prefill, return_tensors="pt", return_dict=True)
    return _not_empty(dict(encoded))


def run_generate(
    model,
    tokenizer,
    inputs: dict,
    settings: SamplingSettings,
    cache,
    *,
    on_text: Callable[[str], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
    on_lost: Callable[[DeviceLost, int], object] | None = None,
) -> GenerationResult:
    """One generation; `inputs` are already on the embedding device.

    `on_lost(lost, tokens so far)` is the guard for a device lost mid-answer: it re-places
    what was lost and returns a fresh cache to replay into. Without it, DeviceLost is raised."""
    settings.check()
    cancel = cancel or threading.Event()
    prompt_length = inputs["input_ids"].shape[1]
    streamer = CallbackStreamer(tokenizer, on_text)
    between = BetweenSteps(prompt_length, cancel, on_step)
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    start = time.perf_counter()
    forced: list[int] = []
    losses: list[str] = []
    if settings.max_new_tokens == 0:
        output = inputs["input_ids"]
    else:
        while True:
            processors = LogitsProcessorList([ForcedPrefix(prompt_length, forced)] if forced else [])
            # generate takes the repetition penalty itself; the rest of the adjustments as processors
            processors.extend(p for p in settings.adjusting_processors(prompt_length)
                              if not isinstance(p, RepetitionPenaltyLogitsProcessor))
            try:
                with torch.inference_mode():
                    output = model.generate(
                        **inputs,
                        **settings.generate_kwargs(),
                        cache=cache,
                        use_cache=True,  # the cache we budget and migrate, even where a config says otherwise (MPT)
                        disable_compile=True,  # a StaticCache would have transformers compile the model on GPUs
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([between]),
                        logits_processor=processors,
                        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                    )
                break
            except DeviceLost as lost:
                if on_lost is None:
                    raise
                losses.append(str(lost))
                forced = between.tokens()
                cache = on_lost(lost, len(forced))
                streamer.resume(len(forced))
    total = time.perf_counter() - start
    new_ids = output[0, prompt_length:].tolist()
    times = streamer.token_times
    ttft = times[0] - start if times else None
    decode_rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None
    return GenerationResult(
        text=tokenizer.decode(new_ids, skip_special_tokens=True),
        token_ids=new_ids,
        prompt_tokens=prompt_length,
        new_tokens=len(new_ids),
        ttft_s=ttft,
        decode_tokens_per_s=decode_rate,
        total_s=total,
        cancelled=cancel.is_set(),
        stats={"node_losses": losses} if losses else {},
    )
