"""4-bit weights in blocks of 32 with a float16 scale and minimum each, run by our CPU kernel.

The layout is GGUF's Q4_1: along each row, blocks of 32 weights, 16 bytes of nibbles (byte j
holds weight j low and weight j + 16 high), w = scale * q + minimum with q in 0..15. A Q4_1
file's values, dequantized by transformers and quantized again here, come back exactly (the
block's smallest and largest weights are q = 0 and q = 15 in Q4_1 too). 0.625 bytes per
weight, as in the file.

The bytes are one uint8 tensor [N, K/32 * 20], rows in tiles of 4 (the last holds the rows
left over): per tile, its rows' scales, then its nibbles block by block with its rows' 16
bytes in turn, then its rows' minimums. Our kernel reads a row and its 3 neighbours together:
as one stream, the MLP's down_proj (long rows) ran 1.7-2.2x faster out of cache than from
three arrays (figures in kernels/cpu/src/quant_linear.cpp, at `q4_linear`).

A torchao tensor subclass, like quantization/q8_rows.py, so moves, copies, tying and
`stored_bytes` work as for any quantized tensor; its matmul is kernels/cpu/build.py's
`q4_linear` (float32 activations; other dtypes are converted around it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchao.utils import TorchAOBaseTensor

from vramancer.kernels.cpu import build as cpu_kernels

BLOCK = 32  # weights per scale/minimum pair, as GGUF's Q4_0/Q4_1
TILE = 4  # rows stored together, as our kernel reads them
BLOCK_BYTES = 20  # a block of one row: 16 bytes of nibbles, a float16 scale and minimum


def to_tiles(nibbles: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """nibbles [N, K/2] uint8, scale and minimum [N, K/32] float16 → our kernel's tiles [N, K/32 * 20]."""
    rows, blocks = scale.shape
    tiles = []
    for first, end, size in _tile_groups(rows):
        count = (end - first) // size
        tiles.append(torch.cat([
            scale[first:end].contiguous().view(torch.uint8).reshape(count, -1),
            nibbles[first:end].reshape(count, size, blocks, BLOCK // 2).transpose(1, 2).reshape(count, -1),
            minimum[first:end].contiguous().view(torch.uint8).reshape(count, -1)], dim=1).reshape(-1))
    return torch.cat(tiles).reshape(rows, blocks * BLOCK_BYTES)


def from_tiles(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of `to_tiles`: (nibbles, scale, minimum)."""
    rows, blocks = tiles.shape[0], tiles.shape[1] // BLOCK_BYTES
    flat = tiles.reshape(-1)
    nibbles, scale, minimum = [], [], []
    for first, end, size in _tile_groups(rows):
        count = (end - first) // size
        group = flat[first * blocks * BLOCK_BYTES:end * blocks * BLOCK_BYTES].reshape(count, -1)
        halves, packed = size * blocks * 2, size * blocks * BLOCK // 2
        scale.append(group[:, :halves].reshape(-1, blocks * 2))
        nibbles.append(group[:, halves:halves + packed].reshape(count, blocks, size, BLOCK // 2).transpose(1, 2)
                       .reshape(-1, blocks * BLOCK // 2))
        minimum.append(group[:, halves + packed:].reshape(-1, blocks * 2))
    return (torch.cat(nibbles), torch.cat(scale).view(torch.float16), torch.cat(minimum).view(torch.float16))


def _tile_groups(rows: int) -> list[tuple[int, int, int]]:
    """(first row, end row, rows per tile): the whole tiles, then the one with the rows left over."""
    whole = rows // TILE * TILE
    return [(first, end, size) for first, end, size in ((0, whole, TILE), (whole, rows, rows - whole)) if end > first]


class BlockInt4Tensor(TorchAOBaseTensor):
    """A [N, K] weight as its blocks in tiles of 4 rows (`to_tiles`): uint8 [N, K/32 * 20]."""

    tensor_data_names = ["qdata"]
    tensor_attribute_names = ["shape", "dtype"]

    def __new__(cls, qdata: torch.Tensor, shape, dtype: torch.dtype):
        return torch.Tensor._make_wrapper_subclass(cls, shape, device=qdata.device, dtype=dtype, requires_grad=False)

    def __init__(self, qdata: torch.Tensor, shape, dtype: torch.dtype):
        super().__init__()
        self.qdata = qdata

    def _quantization_type(self) -> str:
        return f"q4 blocks of {BLOCK}, shape={tuple(self.shape)}, device={self.device}"

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> "BlockInt4Tensor":
        """Quantize a [N, K] float weight (K a multiple of 32): per block, scale = (max - min) / 15
        and minimum = min, both rounded to float16 first so the nibbles fit the stored pair."""
        rows, columns = weight.shape
        blocks = weight.detach().to(torch.float32).reshape(rows, columns // BLOCK, BLOCK)
        low, high = blocks.amin(-1), blocks.amax(-1)
        scale = ((high - low) / 15).to(torch.float16)
        minimum = low.to(torch.float16)
        step = scale.to(torch.float32).unsqueeze(-1)
        levels = (blocks - minimum.to(torch.float32).unsqueeze(-1)) / torch.where(step > 0, step, 1)
        q = levels.round().clamp(0, 15).to(torch.uint8)
        nibbles = q[..., : BLOCK // 2] | (q[..., BLOCK // 2:] << 4)
        return cls(to_tiles(nibbles.reshape(rows, columns // 2), scale, minimum), weight.shape, weight.dtype)

    @classmethod
    def from_gguf_blocks(cls, raw: torch.Tensor, block_type: str, shape, dtype: torch.dtype) -> "BlockInt4Tensor":
        """A GGUF Q4_0 or Q4_1 weight, `raw` its bytes as [N, K/32 * block bytes] uint8, taken
        as it is stored: no dequantizing, so no rounding. Q4_1 blocks are (scale, minimum,
        16 bytes of nibbles), our layout already; a Q4_0 block (scale, nibbles) means
        w = scale * (q - 8), which is minimum = -8 * scale, exact in float16."""
        rows, columns = shape
        blocks = columns // BLOCK
        if block_type == "Q4_1":
            cells = raw.reshape(rows, blocks, 20)
            scale = cells[..., 0:2].contiguous().view(torch.float16).reshape(rows, blocks)
            minimum = cells[..., 2:4].contiguous().view(torch.float16).reshape(rows, blocks)
            nibbles = cells[..., 4:20]
        elif block_type == "Q4_0":
            cells = raw.reshape(rows, blocks, 18)
            scale = cells[..., 0:2].contiguous().view(torch.float16).reshape(rows, blocks)
            minimum = scale * -8
            nibbles = cells[..., 2:18]
        else:
            raise ValueError(f"{block_type} blocks are not q4 blocks")
        return cls(to_tiles(nibbles.reshape(rows, columns // 2), scale, minimum), torch.Size(shape), dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ self.T (+ bias) on our kernel; x on the CPU, any float dtype (float32 runs as is)."""
        rows = x.reshape(-1, x.shape[-1])
        if rows.dtype != torch.float32 or not rows.is_contiguous():
            rows = rows.to(torch.float32).contiguous()
        out = cpu_kernels.kernels().q4_linear(rows, self.qdata)
        if bias is not None:
            out += bias
        out = out.view(*x.shape[:-1], out.shape[-1])
        return out if x.dtype == torch.float32 else out.to(x.dtype)

    def dequantize(self, output_dtype: torch.dtype | None = None) -> torch.Tensor:
        rows, columns = self.shape
        nibbles, scale, minimum = from_tiles(self.qdata)
        packed = nibbles.reshape(rows, columns // BLOCK, BLOCK // 2)
        q = torch.cat([packed & 0x0F, packed >> 4], dim=-1).to(torch.float32)
        values = q * scale.to(torch.float32).unsqueeze(-1) + minimum.to(torch.float32).unsqueeze(-1)
        return values.reshape(rows, columns).to(output_dtype or self.dtype)


def quantize_blocks(weight: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(BlockInt4Tensor.from_float(weight), requires_grad=False)


@BlockInt4Tensor.implements(torch.ops.aten.linear.default)
@BlockInt4Tensor.implements_torch_function(F.linear)
def _linear(func, types, args, kwargs):
    x, weight = args[0], args[1]
    if x.device.type != "cpu":
        raise RuntimeError("q4 weights run on the CPU only")
    return weight.linear(x, args[2] if len(args) > 2 else kwargs.get("bias"))
