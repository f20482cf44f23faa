"""The memory model's plain facts: what a layer caches per token, and what a GPU keeps back.

A device's need is the stored bytes of its parts' weights, plus each of its layers' cache for
the context (as that layer really caches: full attention for every token, a sliding window at
most the window, a recurrent state its own size), plus a reserve (docs/design/memory-model.md).
Plain data: no torch, so a plan is checked and explained without loading any.
"""

from __future__ import annotations

from dataclasses import dataclass

from vramancer.config.units import MiB

# Room kept free on a CUDA device for its context and allocator slack, which no tensor of
# ours accounts for (accelerate's users lose this to OOMs; llama.cpp's see it as "uneven").
# Measured on an H100 (CUDA 13, torch 2.11): 694 MiB beside torch's own memory once cuBLAS
# had loaded; 384 MiB, the figure before, left the memory model 30 % short.
CUDA_RESERVE = 768 * MiB


@dataclass(frozen=True)
class LayerCache:
    """What one decoder layer keeps in the KV cache."""

    kind: str  # transformers' layer type: full_attention, sliding_attention, linear_attention, …
    bytes_per_token: int  # keys + values of one token
    window: int | None = None  # sliding and chunked layers hold at most this many tokens
    state_bytes: int = 0  # a recurrent or convolution state, the same size whatever the length

    def tokens_held(self, context: int) -> int:
        if self.window is None:
            return context
        return min(context, max(self.window - 1, 1))  # transformers keeps the last window − 1 tokens

    def bytes_for(self, context: int) -> int:
        return self.bytes_per_token * self.tokens_held(context) + self.state_bytes
