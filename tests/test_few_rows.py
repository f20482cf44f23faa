"""The batch's CPU linear layers (engine/few_rows.py): the same products as torch's, one row
bit for bit, and only where they apply."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from vramancer.engine.few_rows import MAX_ROWS, FewRowsLinear, use_few_rows_linear


@pytest.fixture
def layer() -> FewRowsLinear:
    torch.manual_seed(0)
    plain = nn.Linear(96, 160, bias=True)
    assert use_few_rows_linear(plain) == 1 and isinstance(plain, FewRowsLinear)
    return plain


def test_one_row_is_exactly_torchs_linear_and_a_few_rows_match_it(layer):
    with torch.inference_mode():
        one = torch.randn(1, 1, 96)
        assert torch.equal(layer(one), F.linear(one, layer.weight, layer.bias))
        for rows in range(2, MAX_ROWS + 1):
            x = torch.randn(rows, 1, 96)
            out = layer(x)
            assert out.shape == (rows, 1, 160) and out.is_contiguous()
            torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias))


def test_many_rows_and_other_dtypes_keep_torchs_linear(layer):
    with torch.inference_mode():
        prompt = torch.randn(1, MAX_ROWS + 1, 96)  # a prefill: many rows
        assert torch.equal(layer(prompt), F.linear(prompt, layer.weight, layer.bias))
        half = layer.to(torch.bfloat16)
        x = torch.randn(4, 1, 96, dtype=torch.bfloat16)
        assert torch.equal(half(x), F.linear(x, half.weight, half.bias))


def test_only_plain_linear_layers_are_turned(tiny_model_dir):
    from vramancer.engine.models import load_weights, resolve_model

    native = load_weights(resolve_model(tiny_model_dir), torch.float32)
    linears = [m for m in native.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is FewRowsLinear for m in linears)
    quantized = load_weights(resolve_model(tiny_model_dir), torch.bfloat16, "q8")
    assert not any(isinstance(m, FewRowsLinear) for m in quantized.modules())
