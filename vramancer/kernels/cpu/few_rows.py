"""A decode batch's few rows on the CPU in float32: linear layers that read each weight once.

A decode step of a batch of B sequences multiplies B rows by every weight. On the CPU, torch's
float32 `linear` (x @ W.T) runs a matrix-vector product for one row but MKL's matrix product
for 2-8 rows, which here costs two to three times one row's time: the weights, too big for
the cache, are read more than once. MKL asked the other way round, W @ x.T, reads them once
but at 4-6 GB/s, and its output must be copied back to row-major rows. Our `few_rows_linear`
kernel (kernels/cpu/src/few_rows.cpp) streams each weight row once through up to 8 rows' worth
of accumulators and writes row-major rows: at 8 rows it read the weights 1.5-2x as fast as
W @ x.T, in about half of `linear`'s time (`python -m benchmarks.few_rows` times the three per
layer shape; the figures are in docs/benchmarks.md).

At 8 rows the kernel is bound by its multiply-adds more than by memory (15 GB/s with the
weights in L2). A row's result does not depend on the others in its batch or on the thread
count (tests/unit/test_few_rows.py). A lone sequence (one new token, or its whole prompt) keeps
`linear`, so a lone request computes exactly what `generate` does; so do longer prompts, other
devices and dtypes, and quantized weights (their own kernels take several rows;
quantization/weights.py). The wrappers test for a lone sequence first, as cheaply as they can:
they run for every projection of every step, and a fuller check before it cost float32
decode 1-2 % (steps alternating with and without the wrappers, 1 thread).
Where our kernels cannot run (`cpu_kernels.kernels()` is None), 2-8 rows take W @ x.T.

The same step's RMSNorms (six eager ops each) run through our fused `rms_norm` for 2-8 rows;
one row keeps torch's own. Its attention is the ragged batch's (scheduling/ragged.py: one call
of our kernels over every sequence's own keys), which `enabled` turns off too.
`python -m benchmarks.batching --compare 1` times a batch step with all three, with the linear
kernel alone, and on torch's paths.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from vramancer.kernels.cpu import build as cpu_kernels
from vramancer.kernels.cpu.modules import fuse_rms_norm
from vramancer.kernels.cpu.rewiring import swap_class, swap_forward

# The server's default --max-batch. Beyond it W @ x.T was no steady gain: slower at 12 and 32
# rows (the head 55 vs 46 ms, 110 vs 88 ms), a little faster at 16 (49 vs 63 ms).
MAX_ROWS = 8

# Which of our kernels a batch's rows run through where they can; benchmarks.batching takes
# them out to compare with torch's own paths in the same session.
KERNELS = ("linear", "rms_norm", "attention")
enabled: set[str] = set(KERNELS)


class FewRowsLinear(nn.Linear):
    """nn.Linear whose 2..MAX_ROWS-row float32 products on the CPU read each weight once: our
    `few_rows_linear` kernel where it runs, else MKL's W @ x.T."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        # First the cheapest test that lets a lone sequence through (one token, or a prompt):
        # this runs for every projection of every decode step.
        if x.dim() < 2 or x.shape[0] < 2:
            return F.linear(x, weight, self.bias)
        rows = x.numel() // x.shape[-1]
        if not (rows <= MAX_ROWS and x.device.type == "cpu" and x.dtype == torch.float32
                and type(weight.data) is torch.Tensor and weight.dtype == torch.float32):
            return F.linear(x, weight, self.bias)
        flat = x.reshape(rows, x.shape[-1]).contiguous()
        ops = cpu_kernels.kernels() if "linear" in enabled else None
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
            swap_class(module, FewRowsLinear)
            count += 1
            float32 = float32 or module.weight.dtype == torch.float32
    if float32:  # built (once, two to three minutes here) or loaded now, not in the middle of a batch's step
        cpu_kernels.kernels()
    return count


def _rms_norm_for_few_rows(self: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    if hidden.dim() < 2 or hidden.shape[0] < 2:  # a lone sequence: the module's own forward, at once
        return type(self).forward(self, hidden)
    rows = hidden.numel() // hidden.shape[-1]
    ops = cpu_kernels.kernels() if "rms_norm" in enabled else None
    if (ops is not None and rows <= MAX_ROWS and hidden.dtype == torch.float32 and hidden.device.type == "cpu"
            and self.weight.dtype == torch.float32 and self.weight.device.type == "cpu"):
        return ops.rms_norm(hidden.contiguous(), self.weight, self.vramancer_eps)
    return type(self).forward(self, hidden)


def use_few_rows_norm(model: nn.Module) -> int:
    """Route `model`'s RMSNorms through our fused `rms_norm` kernel for 2..MAX_ROWS rows, where
    the kernel reproduces them (kernels/cpu/modules.py checks each): one call instead of six
    eager ops in a batch's step. A lone sequence keeps the module's own forward, so a lone
    request computes exactly what `generate` does. Returns how many."""
    if cpu_kernels.kernels() is None:
        return 0
    count = 0
    for module in model.modules():
        if fuse_rms_norm(module):  # checked, and its epsilon kept; then only for a batch's rows
            swap_forward(module, _rms_norm_for_few_rows)
            count += 1
    return count


__all__ = ["FewRowsLinear", "MAX_ROWS", "use_few_rows_linear", "use_few_rows_norm"]
