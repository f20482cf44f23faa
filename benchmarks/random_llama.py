"""A random-weight Llama saved as a Hugging Face folder, built with no download at all.

The GPU checks run where there is no network and the bundled GGUF (93 MB) cannot travel, so
they make their own model: a Llama-architecture config, seeded random weights, and a
word-level tokenizer whose vocabulary is the benchmark prompt's words plus numbered filler
words. Timing and placement do not depend on what the weights say.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

SPECIALS = ["<unk>", "<s>", "</s>"]


@dataclass(frozen=True)
class Shape:
    """The sizes that decide a Llama's cost."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = True

    def params(self) -> int:
        head_dim = self.hidden // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        layer = attention + 3 * self.hidden * self.intermediate + 2 * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * layer + embeddings + self.hidden


# TinyLlama-1.1B's shape: about 1.1 B parameters, 2.2 GB in bfloat16.
ONE_B = Shape(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000, tied=False)
# About 170 M parameters: big enough that a decode step is not all launch overhead.
MEDIUM = Shape(hidden=1024, intermediate=2816, layers=12, heads=16, kv_heads=4, vocab=32000)
# A few MB: for token-for-token comparisons, where only correctness matters.
TINY = Shape(hidden=256, intermediate=512, layers=8, heads=8, kv_heads=2, vocab=2000)


def make_tokenizer(vocab: int, text: str):
    """A word-level tokenizer of exactly `vocab` entries that knows every word of `text`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys(re.findall(r"\w+|[^\w\s]", text)))
    entries = SPECIALS + words
    entries += [f"w{i}" for i in range(vocab - len(entries))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(entries[:vocab])}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    # No token_type_ids: a Llama takes none, and older transformers refuse them in generate.
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   model_input_names=["input_ids", "attention_mask"])


def build(shape: Shape, dtype: torch.dtype, device: str = "cpu", seed: int = 0, init_range: float = 0.02):
    """(model, tokenizer): seeded random weights, no end-of-sequence token, so generation
    always runs the full number of new tokens."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from benchmarks.common import PROMPT

    tokenizer = make_tokenizer(shape.vocab, PROMPT)
    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=shape.tied,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=None,
        initializer_range=init_range,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        # Built in `dtype` from the start, as from_pretrained would: a float32 model cast
        # afterwards would also cast the rotary inverse frequencies, which loaded models keep
        # in float32, and so decode other tokens.
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model.requires_grad_(False)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model, tokenizer


def save(model, tokenizer, folder: str | Path) -> float:
    """Save as a Hugging Face folder (safetensors); returns the seconds it took."""
    start = time.perf_counter()
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return time.perf_counter() - start
