"""What a request asks for and what it gets: sampling settings, the prompt's token ids (the
chat template), the answer's result.

Decoding itself is the scheduler's (scheduling/batching.py), for every request: a dashboard
prompt, Engine.generate, `vramancer generate` and the server's requests. Sampling uses
transformers' own logits processors and warpers, in the order its `generate` applies them, so
a lone request gives exactly the tokens `generate` gives (greedy, and seeded: the same draws).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from transformers import (
    LogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from vramancer.config.errors import VramancerError

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
