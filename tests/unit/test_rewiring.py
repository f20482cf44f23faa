"""Rewiring onto our CPU kernels is named and removable: `restore` gives back the modules
transformers built (kernels/cpu/rewiring.py)."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from vramancer.kernels.cpu.build import kernels
from vramancer.kernels.cpu.few_rows import use_few_rows_linear, use_few_rows_norm
from vramancer.kernels.cpu.modules import use_decode_attention
from vramancer.kernels.cpu.rewiring import is_rewired, restore

pytestmark = pytest.mark.skipif(kernels() is None, reason="our CPU kernels are unavailable here")


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def shape_of(model: nn.Module) -> list:
    return [(name, type(m), "forward" in vars(m)) for name, m in model.named_modules()]


def test_restore_gives_back_the_modules_transformers_built():
    model = tiny_llama()
    before, attention = shape_of(model), model.config._attn_implementation
    ids = torch.tensor([[1, 5, 9, 2], [3, 4, 8, 7]])
    with torch.inference_mode():
        expected = model(ids).logits

    assert use_few_rows_linear(model) > 0 and use_few_rows_norm(model) > 0 and use_decode_attention(model)
    assert shape_of(model) != before and model.config._attn_implementation != attention
    assert any(is_rewired(m) for m in model.modules())

    assert restore(model) > 0
    assert shape_of(model) == before
    assert model.config._attn_implementation == attention
    assert not any(is_rewired(m) or any(k.startswith("vramancer_") for k in vars(m)) for m in model.modules())
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, expected)
    assert restore(model) == 0  # nothing left to undo
