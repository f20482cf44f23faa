"""Structured output: an answer held to a JSON schema by masking, at every step, the tokens
that could not continue a valid document (llguidance's matcher over the model's tokenizer).

Why llguidance: of the maintained libraries made for this (xgrammar, llguidance,
outlines-core, lm-format-enforcer), it installs as one wheel with no dependency (xgrammar
brings its own torch requirement, which must never move ours), computes a token mask in a few
milliseconds from a lazily built automaton rather than precompiling the whole vocabulary per
schema, and takes JSON schemas as they come. Its per-token cost on our batch path is measured
in README (Serving).
"""

from __future__ import annotations

import json
import threading

import torch

from vramancer.config.errors import VramancerError

_lock = threading.Lock()
_tokenizers: dict[int, tuple[object, object]] = {}  # id(hf tokenizer) -> (it, its LLTokenizer)


def _ll_tokenizer(tokenizer, vocabulary: int, eos: list[int]):
    """llguidance's view of `tokenizer`, built once (about half a second) and kept."""
    import llguidance.hf

    with _lock:
        known = _tokenizers.get(id(tokenizer))
        if known is None or known[0] is not tokenizer:
            known = (tokenizer, llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocabulary, eos_token=eos))
            _tokenizers[id(tokenizer)] = known
        return known[1]


def grammar_for(form: str, text: str) -> str:
    """llguidance's grammar for a constraint given as ("json_schema", schema as JSON text) or
    ("lark", a Lark grammar, which may embed JSON schemas with %json)."""
    import llguidance

    if form == "lark":
        return llguidance.LLMatcher.grammar_from_lark(text)
    if form != "json_schema":
        raise VramancerError(f"a constraint is a json_schema or a lark grammar, not {form!r}.")
    try:
        schema = json.loads(text)
    except ValueError:
        raise VramancerError("the JSON schema is not valid JSON.") from None
    # Compact JSON: with whitespace allowed anywhere a model may fill its budget with it.
    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})


class Constraint:
    """One answer's constraint: which tokens may come next, and the tokens taken so far."""

    def __init__(self, kind: str, text: str, tokenizer, vocabulary: int, eos: list[int]):
        import llguidance

        grammar = grammar_for(kind, text)
        self.tokenizer = _ll_tokenizer(tokenizer, vocabulary, eos)
        self.matcher = llguidance.LLMatcher(self.tokenizer, grammar)
        if self.matcher.is_error():
            reason = self.matcher.get_error().strip().rstrip(".")
            raise VramancerError(f"the answer's required format cannot be followed: {reason}.")
        self.vocabulary = vocabulary
        self._mask = None

    def restrict(self, scores: torch.Tensor) -> torch.Tensor:
        """`scores` [1, vocab] with every token that cannot come next set to -inf."""
        import llguidance.torch as lt

        if self._mask is None:
            self._mask = lt.allocate_token_bitmask(1, self.tokenizer.vocab_size)
        lt.fill_next_token_bitmask(self.matcher, self._mask, 0)
        scores = scores.to(torch.float32).cpu().contiguous()
        lt.apply_token_bitmask_inplace(scores, self._mask)
        return scores

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise VramancerError(f"the constrained answer took token {token}, which its grammar refuses.")

    @property
    def done(self) -> bool:
        """The document is complete: nothing but its end may follow."""
        return self.matcher.is_stopped()
