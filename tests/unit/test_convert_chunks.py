"""A weight converted a chunk of rows at a time (quantization/weights.py's `convert_weight`)
holds the same bytes as the weight converted whole: the chunks are stitched into one tensor
allocated once, in order, whatever the chunk size."""

import pytest
import torch

from vramancer.quantization import weights
from vramancer.quantization.q4_blocks import BlockInt4Tensor
from vramancer.quantization.q8_rows import RowInt8Tensor


@pytest.mark.parametrize("fmt", ["q8", "q4", "native"])
def test_chunked_conversion_equals_the_whole(fmt, monkeypatch):
    torch.manual_seed(0)
    table = torch.randn(1000, 64).to(torch.bfloat16)  # 1000 rows: the last chunk is a short one
    read = lambda first, end: table[first:end]  # noqa: E731
    whole = weights.convert_weight(read, tuple(table.shape), fmt, torch.float32)
    monkeypatch.setattr(weights, "CHUNK_BYTES", 64 * 4 * 24)  # 24 rows of float32 a chunk: 42 chunks
    chunked = weights.convert_weight(read, tuple(table.shape), fmt, torch.float32)
    assert type(chunked) is type(whole) and chunked.shape == whole.shape
    if isinstance(whole, RowInt8Tensor):
        for part in ("qdata", "scale", "zero_point"):
            assert torch.equal(getattr(chunked, part), getattr(whole, part)), part
    elif isinstance(whole, BlockInt4Tensor):
        assert torch.equal(chunked.qdata, whole.qdata)
    else:
        assert torch.equal(chunked, whole) and whole.dtype == torch.float32
