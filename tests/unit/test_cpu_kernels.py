"""Our AVX2 kernels for quantized weights (kernels/cpu/build.py) against torch doing the
same sums: each activation row quantized to int16 per block of 32 as the kernels do, times the
dequantized weights. Within float rounding of that for any batch and shape, within 1e-4 of the
plain float32 matmul, and the same bits for a row whatever batch or thread count it runs in;
q8 blocks keep a GGUF Q8_0 tensor's values exactly."""

import numpy as np
import pytest
import torch

from vramancer.kernels.cpu.build import kernels, unavailable_reason
from vramancer.quantization.q4_blocks import BlockInt4Tensor
from vramancer.quantization.q8_blocks import BlockInt8Tensor

ops = kernels()
pytestmark = pytest.mark.skipif(ops is None, reason=f"kernels unavailable: {unavailable_reason()}")


def q8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scale = weight.abs().amax(1) / 127
    values = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return values, scale.contiguous(), values.float() * scale[:, None]


def as_the_kernels_see_it(x: torch.Tensor) -> torch.Tensor:
    """x with each row's whole blocks of 32 quantized as the kernels do (round-half-even of
    x / (max|x| / 32767), the same float32 steps), in float64; the columns past them as they are."""
    rows, columns = x.shape
    whole = columns // 32 * 32
    blocks = x[:, :whole].reshape(rows, -1, 32)
    step = blocks.abs().amax(-1, keepdim=True) / 32767
    q = (blocks * torch.where(step > 0, 1 / step, torch.zeros_like(step))).round()
    return torch.cat([(q.double() * step.double()).reshape(rows, whole), x[:, whole:].double()], 1)


def assert_close_to(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    expected = as_the_kernels_see_it(x) @ weight.double().T
    assert got.shape == expected.shape
    scale = expected.abs().max().item()
    assert (got.double() - expected).abs().max().item() < 2e-6 * scale + 1e-6  # float32 rounding
    plain = x.double() @ weight.double().T
    assert (got.double() - plain).abs().max().item() < 1e-4 * scale + 1e-5  # what quantizing x costs


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9])
@pytest.mark.parametrize("out_features,in_features", [(37, 32), (100, 800), (1536, 576), (5, 1056)])
def test_q4_matches_torch_on_the_same_quantized_activations(rows, out_features, in_features):
    torch.manual_seed(rows * 7 + in_features)
    weight = BlockInt4Tensor.from_float(torch.randn(out_features, in_features))
    x = torch.randn(rows, in_features)
    x[0, 32:64] = 0  # a block of zeros quantizes to zeros
    x[-1, 5] = 300.0  # an outlier takes its block's range, not the row's
    got = ops.q4_linear(x, weight.qdata)
    assert_close_to(got, x, weight.dequantize(torch.float32))


@pytest.mark.parametrize("rows", [1, 3, 4, 8, 11])
@pytest.mark.parametrize("out_features,in_features", [(37, 70), (100, 576), (3, 577), (257, 33), (9, 5)])
def test_q8_matches_torch_on_the_same_quantized_activations(rows, out_features, in_features):
    torch.manual_seed(rows * 5 + in_features)
    values, scale, dequantized = q8_rows(torch.randn(out_features, in_features))
    values[0, 0] = -128  # the one int8 value whose magnitude does not fit in int8
    dequantized[0, 0] = -128 * scale[0]
    x = torch.randn(rows, in_features)
    got = ops.q8_linear(x, values, scale)
    assert_close_to(got, x, dequantized)


def q8_0_bytes(weight: torch.Tensor) -> bytes:
    """`weight` as a GGUF file's Q8_0 tensor, quantized by the gguf package (llama.cpp's rules)."""
    from gguf import GGMLQuantizationType, quantize

    return quantize(weight.numpy(), GGMLQuantizationType.Q8_0).tobytes()


def q8_blocks(weight: torch.Tensor) -> BlockInt8Tensor:
    raw = torch.frombuffer(bytearray(q8_0_bytes(weight)), dtype=torch.uint8)
    return BlockInt8Tensor.from_gguf_blocks(raw, weight.shape, torch.float32)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9])
@pytest.mark.parametrize("out_features,in_features", [(37, 32), (100, 800), (5, 1056)])
def test_q8_blocks_match_torch_on_the_same_quantized_activations(rows, out_features, in_features):
    torch.manual_seed(rows * 3 + in_features)
    weight = q8_blocks(torch.randn(out_features, in_features))
    x = torch.randn(rows, in_features)
    x[-1, 7] = -250.0  # an outlier takes its block's range
    assert_close_to(ops.q8_blocks_linear(x, weight.qdata, weight.scale), x, weight.dequantize(torch.float32))


def matmuls() -> dict:
    """Each format's kernel call on a weight of 203 rows (50 tiles of 4 and one of 3)."""
    torch.manual_seed(0)
    q4 = BlockInt4Tensor.from_float(torch.randn(203, 576))
    values, scale, _ = q8_rows(torch.randn(203, 577))
    blocks = q8_blocks(torch.randn(203, 576))
    return {"q4": (576, lambda x: ops.q4_linear(x, q4.qdata)),
            "q8 rows": (577, lambda x: ops.q8_linear(x, values, scale)),
            "q8 blocks": (576, lambda x: ops.q8_blocks_linear(x, blocks.qdata, blocks.scale))}


@pytest.mark.parametrize("fmt", ["q4", "q8 rows", "q8 blocks"])
def test_a_rows_result_does_not_depend_on_its_batch_or_the_thread_count(fmt):
    columns, matmul = matmuls()[fmt]
    x = torch.randn(11, columns, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.cat([matmul(x[i:i + 1].contiguous()) for i in range(11)])
        for count in (2, 3):
            torch.set_num_threads(count)
            for rows in range(2, 12):  # every pass shape: 2-8 rows in one pass, 9-11 in two
                assert torch.equal(matmul(x[:rows].contiguous()), alone[:rows]), (rows, count)
            assert torch.equal(matmul(x[5:6].contiguous()), alone[5:6])
    finally:
        torch.set_num_threads(threads)


def test_q8_blocks_keep_a_q8_0_files_values_exactly():
    from gguf import GGMLQuantizationType, dequantize

    from vramancer.quantization.weights import stored_bytes

    torch.manual_seed(2)
    weight = torch.randn(70, 96)
    raw = q8_0_bytes(weight)
    kept = q8_blocks(weight)
    as_the_file_says = torch.from_numpy(dequantize(np.frombuffer(raw, dtype=np.uint8), GGMLQuantizationType.Q8_0)
                                        .reshape(70, 96).copy())
    assert torch.equal(kept.dequantize(torch.float32), as_the_file_says)
    assert stored_bytes(kept) == len(raw)  # the file's 34 bytes a block, no more
    ids = torch.tensor([[3, 69, 0]])
    assert torch.equal(torch.nn.functional.embedding(ids, kept), as_the_file_says[ids])
    copy = kept.clone()
    assert type(copy) is BlockInt8Tensor and torch.equal(copy.dequantize(), kept.dequantize())


def test_q8_blocks_refuse_bytes_of_another_shape():
    with pytest.raises(ValueError, match="must hold 3 blocks a row"):
        BlockInt8Tensor.from_gguf_blocks(torch.zeros(34 * 5, dtype=torch.uint8), (2, 96), torch.float32)


def test_q4_keeps_a_q4_1_files_values_exactly():
    # Q4_1 blocks as a GGUF file holds them (float16 scale and minimum, nibbles 0..15 with the
    # block's extremes at 0 and 15), dequantized as transformers does: quantizing again
    # gives back the very same weights.
    torch.manual_seed(1)
    rows, blocks = 66, 18  # 16 tiles of 4 rows and one of 2
    scale = (torch.rand(rows, blocks, 1) * 0.05 + 1e-3).half().float()
    minimum = (-torch.rand(rows, blocks, 1) * 0.4).half().float()
    q = torch.randint(0, 16, (rows, blocks, 32))
    q[..., 0], q[..., 1] = 0, 15
    weight = (q * scale + minimum).reshape(rows, blocks * 32)
    assert torch.equal(BlockInt4Tensor.from_float(weight).dequantize(torch.float32), weight)


def test_q4_weights_move_and_count_their_real_bytes():
    from vramancer.quantization.weights import quantized_weight_bytes, stored_bytes

    weight = BlockInt4Tensor.from_float(torch.randn(96, 320))
    assert stored_bytes(weight) == 96 * 320 // 2 + 96 * 10 * 4 == quantized_weight_bytes(96, 320, "q4", torch.float32)
    copy = weight.clone()
    assert type(copy) is BlockInt4Tensor and copy.qdata.data_ptr() != weight.qdata.data_ptr()
    assert torch.equal(copy.dequantize(), weight.dequantize())


@pytest.mark.parametrize("heads,kv_heads,positions", [(9, 3, 1), (9, 3, 57), (4, 4, 130), (8, 2, 7)])
def test_decode_attention_matches_sdpa(heads, kv_heads, positions):
    torch.manual_seed(positions)
    q = torch.randn(2, heads, 1, 64)
    k, v = torch.randn(2, kv_heads, positions, 64), torch.randn(2, kv_heads, positions, 64)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True).transpose(1, 2)
    assert (ops.decode_attention(q, k, v, 64 ** -0.5) - expected).abs().max().item() < 1e-5


def test_ragged_attention_gives_each_sequence_the_bits_it_gets_alone_and_writes_its_own_column():
    torch.manual_seed(5)
    heads, kv_heads, lengths = 8, 2, [3, 17, 1]
    q = torch.randn(3, heads, 1, 64)
    # Each sequence's own buffer, longer than what it attends (the spare columns hold garbage).
    keys = [torch.randn(1, kv_heads, length + 16, 64) for length in lengths]
    values = [torch.randn(1, kv_heads, length + 16, 64) for length in lengths]
    new_keys, new_values = torch.randn(3, kv_heads, 1, 64), torch.randn(3, kv_heads, 1, 64)
    before = [k.clone() for k in keys]
    ops.write_columns(keys, [n - 1 for n in lengths], new_keys)
    ops.write_columns(values, [n - 1 for n in lengths], new_values)
    for row, n in enumerate(lengths):
        assert torch.equal(keys[row][:, :, n - 1], new_keys[row:row + 1, :, 0])
        assert torch.equal(values[row][:, :, n - 1], new_values[row:row + 1, :, 0])
        assert torch.equal(keys[row][:, :, :n - 1], before[row][:, :, :n - 1])  # nothing else written
        assert torch.equal(keys[row][:, :, n:], before[row][:, :, n:])
    got = ops.ragged_decode_attention(q, keys, values, lengths, 64 ** -0.5)
    for row, n in enumerate(lengths):
        alone = ops.decode_attention(q[row:row + 1], keys[row][:, :, :n], values[row][:, :, :n], 64 ** -0.5)
        assert torch.equal(got[row:row + 1], alone), row
    with pytest.raises(RuntimeError, match="hold every attended position"):
        ops.ragged_decode_attention(q, keys, values, [3, 17, 18], 64 ** -0.5)
