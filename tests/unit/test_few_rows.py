"""A batch's rows on the CPU (kernels/cpu/few_rows.py): linear layers and RMSNorms compute what
torch's do, one row bit for bit, a row's bits whoever shares its batch, and only where they apply."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from vramancer.kernels.cpu.build import kernels, unavailable_reason
from vramancer.kernels.cpu.few_rows import MAX_ROWS, FewRowsLinear, use_few_rows_linear


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
    from vramancer.model.loading import load_weights
    from vramancer.model.source import resolve_model

    native = load_weights(resolve_model(tiny_model_dir), torch.float32)
    linears = [m for m in native.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is FewRowsLinear for m in linears)
    quantized = load_weights(resolve_model(tiny_model_dir), torch.bfloat16, "q8")
    assert not any(isinstance(m, FewRowsLinear) for m in quantized.modules())


ops = kernels()
needs_kernels = pytest.mark.skipif(ops is None, reason=f"kernels unavailable: {unavailable_reason()}")


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 11])
@pytest.mark.parametrize("out_features,in_features,bias", [(160, 96, True), (37, 577, False), (5, 7, True)])
def test_our_kernel_computes_torchs_product(rows, out_features, in_features, bias):
    torch.manual_seed(rows + in_features)
    weight, x = torch.randn(out_features, in_features), torch.randn(rows, in_features)
    b = torch.randn(out_features) if bias else None
    got = ops.few_rows_linear(x, weight, b)
    assert got.shape == (rows, out_features) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_a_rows_result_does_not_depend_on_its_batch_or_the_thread_count():
    torch.manual_seed(1)
    weight, bias, x = torch.randn(203, 579), torch.randn(203), torch.randn(MAX_ROWS, 579)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.cat([ops.few_rows_linear(x[i:i + 1], weight, bias) for i in range(MAX_ROWS)])
        torch.set_num_threads(2)
        for rows in range(2, MAX_ROWS + 1):
            assert torch.equal(ops.few_rows_linear(x[:rows], weight, bias), alone[:rows])
    finally:
        torch.set_num_threads(threads)


@needs_kernels
def test_a_sequence_gets_the_same_bits_whoever_shares_its_batch(layer):
    with torch.inference_mode():
        mine, others = torch.randn(1, 96), torch.randn(7, 96)
        beside_one = layer(torch.cat([mine, others[:1]]).unsqueeze(1))[0]
        beside_seven = layer(torch.cat([mine, others]).unsqueeze(1))[0]
        assert torch.equal(beside_one, beside_seven)


@needs_kernels
def test_a_batchs_rms_norms_run_fused_and_one_row_keeps_torchs(tiny_model_dir):
    from vramancer.model.loading import load_weights
    from vramancer.model.source import resolve_model

    model = load_weights(resolve_model(tiny_model_dir), torch.float32)
    norm = model.get_decoder().norm
    assert "forward" in vars(norm)  # rerouted on this instance
    torch.manual_seed(2)
    with torch.inference_mode():
        one, batch = torch.randn(1, 1, norm.weight.numel()), torch.randn(4, 1, norm.weight.numel())
        assert torch.equal(norm(one), type(norm).forward(norm, one))
        assert torch.equal(norm(batch), ops.rms_norm(batch, norm.weight, norm.vramancer_eps))
        torch.testing.assert_close(norm(batch), type(norm).forward(norm, batch))
