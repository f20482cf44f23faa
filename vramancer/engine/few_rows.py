"""Linear layers that read their weight once for a few rows at a time, on the CPU in float32.

A decode step of a batch of B sequences multiplies B rows by every weight. On the CPU, torch's
float32 `linear` (x @ W.T) runs a matrix-vector product for one row but MKL's matrix product
for 2-8 rows, which here costs two to three times one row's time: the weights, too big for
the cache, are read more than once. MKL asked the other way round, W @ x.T, reads them once
but at 4-6 GB/s, and its output must be copied back to row-major rows. Our `few_rows_linear`
kernel (engine/kernels/few_rows.cpp) streams each weight row once through up to 8 rows' worth
of accumulators and writes row-major rows. `python -m benchmarks.few_rows` on the 2-core AMD
EPYC machine, 1 thread, weights out of cache, 12:17 UTC (load 3; ms per layer, 1 / 2 / 4 / 8
rows; GB/s of weights read at 8 rows; reading memory alone: 10-13 GB/s):

    576 x 576     linear 0.13 0.32 0.26 0.43    W @ x.T 0.16 0.20 0.20 0.41 (3.2)    ours 0.12 0.13 0.15 0.20 (6.7)
    1536 x 576    linear 0.44 1.57 0.78 1.03    W @ x.T 0.45 0.93 0.57 0.97 (3.6)    ours 0.33 0.53 0.46 0.56 (6.3)
    576 x 1536    linear 0.61 0.52 0.61 0.76    W @ x.T 0.58 0.47 0.59 1.07 (3.3)    ours 0.64 0.38 0.38 0.54 (6.6)
    49152 x 576   linear 16   44   33   35      W @ x.T 17   22   18   24   (4.7)    ours 13   13   11   14   (8.2)

At 8 rows the kernel is bound by its multiply-adds more than by memory (15 GB/s with the
weights in L2). A row's result does not depend on the others in its batch or on the thread
count (tests/test_few_rows.py). One row keeps `linear` (the matrix-vector product), so a lone
request computes exactly what `generate` does; so do prompts (many rows), other devices and
dtypes, and quantized weights (their own kernels take several rows; engine/quantized.py).
Where our kernels cannot run (`cpu_kernels.kernels()` is None), 2-8 rows take W @ x.T.
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
            if self.bias is None:
                out = torch.mm(weight, flat.t())
            else:
                out = torch.addmm(self.bias.unsqueeze(1), weight, flat.t())
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
