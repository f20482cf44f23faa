"""Linear layers that read their weight once for a few rows at a time, on the CPU in float32.

A decode step of a batch of B sequences multiplies B rows by every weight. On the CPU, torch's
float32 `linear` (x @ W.T) runs a matrix-vector product for one row but MKL's matrix product
for 2-8 rows, which here costs about twice one row's time: the weights, too big for the cache,
are read more than once. Asked the other way round, W @ x.T (with x.T a transposed view of
row-major rows), the same product reads them once. Measured on the 2-core AMD EPYC machine, 1
thread, weights out of cache (ms per layer, 1 / 2 / 4 / 8 rows):

    576 x 576     linear 0.17 0.22 0.27 0.45    W @ x.T 0.17 0.17 0.17 0.26-0.42
    1536 x 576    linear 0.40 0.58 0.76 0.82    W @ x.T 0.35 0.40 0.39 0.61
    576 x 1536    linear 0.26 0.45 0.61 0.66    W @ x.T 0.26 0.44 0.44 0.72
    49152 x 576   linear 12   29   33   34      W @ x.T 12   15   16   21    (the output head)

x.T must be a view of row-major rows: the same product with x.T made contiguous took three
times as long (1.3 ms at 1536 x 576). One row keeps `linear` (the matrix-vector product), so a
lone request computes exactly what `generate` does; so do prompts (many rows), other devices
and dtypes, and quantized weights (their own kernels take several rows; engine/quantized.py).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from vramancer.engine import cpu_kernels

# The server's default --max-batch. Beyond it W @ x.T was no steady gain: slower at 12 and 32
# rows (the head 55 vs 46 ms, 110 vs 88 ms), a little faster at 16 (49 vs 63 ms).
MAX_ROWS = 8

# Whether our kernel runs where it can; benchmarks.batching turns it off to compare with MKL's
# W @ x.T in the same session.
use_kernel = True


class FewRowsLinear(nn.Linear):
    """nn.Linear whose 2..MAX_ROWS-row float32 products on the CPU read each weight once: our
    `few_rows_linear` kernel where it runs, else MKL's W @ x.T."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        rows = x.numel() // x.shape[-1] if x.dim() else 0
        if not (2 <= rows <= MAX_ROWS and x.device.type == "cpu" and x.dtype == torch.float32
                and type(weight.data) is torch.Tensor and weight.dtype == torch.float32):
            return F.linear(x, weight, self.bias)
        flat = x.reshape(rows, x.shape[-1]).contiguous()
        ops = cpu_kernels.kernels() if use_kernel else None
        if ops is not None and weight.is_contiguous() and (self.bias is None or self.bias.dtype == torch.float32):
            out = ops.few_rows_linear(flat, weight, self.bias)  # row-major rows already
        else:
            out = torch.mm(weight, flat.t()) if self.bias is None else torch.addmm(self.bias.unsqueeze(1), weight, flat.t())
            # Back to row-major rows: strided rows would send attention to its slow path, which
            # copies the whole KV cache at every step.
            out = out.t().contiguous()
        return out.reshape(*x.shape[:-1], weight.shape[0])


def use_few_rows_linear(model: nn.Module) -> int:
    """Turn every plain nn.Linear of `model` into a FewRowsLinear (same parameters, same
    hooks); returns how many. Call it on models whose weights are native, not quantized."""
    float32 = False
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = FewRowsLinear
            count += 1
            float32 = float32 or module.weight.dtype == torch.float32
    if float32:  # built (once, about a minute) or loaded now, not in the middle of a batch's step
        cpu_kernels.kernels()
    return count


__all__ = ["FewRowsLinear", "MAX_ROWS", "use_few_rows_linear"]
