"""Int8 weights with one scale per row, run by torch's own int8 CPU kernel.

torchao's `Int8Tensor` holds the values; in eager mode its matmul converts the whole int8
matrix back to floats on every call (its speed is meant to come from torch.compile), which
made `--weights q8` decode at 2.1 tok/s where float32 ran 10. This subclass keeps torchao's
storage, quantization and tensor plumbing (copies, moves, slicing) and runs:

- a matmul (`F.linear`) on the CPU with float32 activations as our AVX2 kernel
  (kernels/cpu/build.py's `q8_linear`), else as `torch._weight_int8pack_mm`, the kernel
  torch ships for weight-only int8 (fast with bfloat16 activations): either way one pass
  over the int8 rows, no float copy of the matrix;
- a lookup (`F.embedding`) as a gather of the asked rows, each scaled: an embedding table
  in int8 costs a quarter of float32 and reads one row per token.

So a tied embedding table and output head stay one int8 tensor. Imported only when weights
are quantized (torchao's import takes seconds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization import Int8Tensor, PerRow

from vramancer.kernels.cpu import build as cpu_kernels


class RowInt8Tensor(Int8Tensor):
    """torchao's per-row int8 tensor, with a CPU matmul and a lookup that never dequantize
    the whole matrix."""

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ self.T (+ bias) on our kernel; x float32 on the CPU."""
        rows = x.reshape(-1, x.shape[-1])
        if not rows.is_contiguous():
            rows = rows.contiguous()
        out = cpu_kernels.kernels().q8_linear(rows, self.qdata, self.scale.view(-1))
        if bias is not None:
            out += bias
        return out.view(*x.shape[:-1], out.shape[-1])


def quantize_rows(weight: torch.Tensor) -> nn.Parameter:
    """`weight` (rows × columns, floats) as symmetric int8 with one float32 scale per row."""
    return nn.Parameter(RowInt8Tensor.from_hp(weight.detach(), PerRow()), requires_grad=False)


_parent_linear = Int8Tensor._TORCH_FN_TABLE[Int8Tensor][F.linear]


@RowInt8Tensor.implements_torch_function(F.linear)
def _linear(func, types, args, kwargs):
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if x.device.type != "cpu" or weight.act_quant_kwargs is not None:
        return _parent_linear(func, types, args, kwargs)  # torchao's own path elsewhere
    if x.dtype == torch.float32 and cpu_kernels.kernels() is not None:
        return weight.linear(x, bias)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch._weight_int8pack_mm(rows, weight.qdata, weight.scale.reshape(-1).to(x.dtype))
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], out.shape[-1])


@RowInt8Tensor.implements_torch_function(F.embedding)
def _embedding(func, types, args, kwargs):
    ids, weight = args[0], args[1]
    scale = weight.scale.reshape(-1)[ids].unsqueeze(-1)
    return (weight.qdata[ids].to(torch.float32) * scale).to(weight.dtype)
