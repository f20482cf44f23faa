"""Int8 weights in blocks of 32 with a float16 scale each (GGUF's Q8_0), run by our CPU kernel.

Our q8 (quantization/q8_rows.py) keeps one scale per row; GGUF's Q8_0 keeps one per 32
values, so a Q8_0 tensor turned into q8 rows was dequantized and rounded again. This format
takes a Q8_0 tensor's bytes as they are: int8 values [N, K] and float16 scales [N, K/32],
w = scale * q, the file's numbers to the bit (the bundled model's tied embedding table and
output head are Q8_0). 1.0625 bytes per weight, as in the file.

Its matmul is kernels/cpu/build.py's `q8_blocks_linear` (float32 activations, each block's
int16 dot product scaled by its own scale); a lookup (`F.embedding`) scales only the asked
rows. A torchao tensor subclass like the other formats, so moves, copies, tying and
`stored_bytes` work as for any quantized tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchao.utils import TorchAOBaseTensor

from vramancer.kernels.cpu import build as cpu_kernels

BLOCK = 32  # values per scale, as GGUF's Q8_0
GGUF_BLOCK_BYTES = 34  # a Q8_0 block in the file: float16 scale, then 32 int8 values


class BlockInt8Tensor(TorchAOBaseTensor):
    """A [N, K] weight as int8 values [N, K] and one float16 scale per block of 32 [N, K/32]."""

    tensor_data_names = ["qdata", "scale"]
    tensor_attribute_names = ["shape", "dtype"]

    def __new__(cls, qdata: torch.Tensor, scale: torch.Tensor, shape, dtype: torch.dtype):
        return torch.Tensor._make_wrapper_subclass(cls, shape, device=qdata.device, dtype=dtype, requires_grad=False)

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, shape, dtype: torch.dtype):
        super().__init__()
        self.qdata = qdata
        self.scale = scale

    def _quantization_type(self) -> str:
        return f"q8 blocks of {BLOCK}, shape={tuple(self.shape)}, device={self.device}"

    @classmethod
    def from_gguf_blocks(cls, raw: torch.Tensor, shape, dtype: torch.dtype) -> "BlockInt8Tensor":
        """A GGUF Q8_0 weight, `raw` its bytes as [N, K/32 * 34] uint8, taken as stored."""
        rows, columns = shape
        if columns % BLOCK or raw.numel() != rows * columns // BLOCK * GGUF_BLOCK_BYTES:
            raise ValueError(f"a Q8_0 tensor of shape {tuple(shape)} must hold {columns // BLOCK} blocks a row")
        cells = raw.reshape(rows, columns // BLOCK, GGUF_BLOCK_BYTES)
        scale = cells[..., 0:2].contiguous().view(torch.float16).reshape(rows, columns // BLOCK)
        values = cells[..., 2:].contiguous().view(torch.int8).reshape(rows, columns)
        return cls(values, scale, torch.Size(shape), dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ self.T (+ bias) on our kernel; x on the CPU, any float dtype (float32 runs as is)."""
        rows = x.reshape(-1, x.shape[-1])
        if rows.dtype != torch.float32 or not rows.is_contiguous():
            rows = rows.to(torch.float32).contiguous()
        ops = cpu_kernels.kernels()
        if ops is not None:
            out = ops.q8_blocks_linear(rows, self.qdata, self.scale)
        else:  # our kernels are off: the same weights, dequantized for this call
            out = rows @ self.dequantize(torch.float32).T
        if bias is not None:
            out += bias
        out = out.view(*x.shape[:-1], out.shape[-1])
        return out if x.dtype == torch.float32 else out.to(x.dtype)

    def dequantize(self, output_dtype: torch.dtype | None = None) -> torch.Tensor:
        rows, columns = self.shape
        values = self.qdata.reshape(rows, columns // BLOCK, BLOCK).to(torch.float32)
        return (values * self.scale.to(torch.float32).unsqueeze(-1)).reshape(rows, columns).to(output_dtype or self.dtype)


@BlockInt8Tensor.implements(torch.ops.aten.linear.default)
@BlockInt8Tensor.implements_torch_function(F.linear)
def _linear(func, types, args, kwargs):
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if x.device.type != "cpu":  # our kernel is the CPU's: elsewhere the weight is dequantized for the call
        return F.linear(x, weight.dequantize(x.dtype), bias)
    return weight.linear(x, bias)


@BlockInt8Tensor.implements_torch_function(F.embedding)
def _embedding(func, types, args, kwargs):
    ids, weight = args[0], args[1]
    rows, columns = weight.shape
    values = weight.qdata[ids].reshape(*ids.shape, columns // BLOCK, BLOCK).to(torch.float32)
    scale = weight.scale[ids].to(torch.float32).unsqueeze(-1)
    return (values * scale).reshape(*ids.shape, columns).to(weight.dtype)
