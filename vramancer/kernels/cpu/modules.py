"""The model's modules rewired onto our CPU kernels (kernels/cpu/build.py) where they run:
float32 activations on the CPU. Anything else (another dtype, a GPU) takes the module's own
path, so a rewired model still runs everywhere the original did.

- `KernelLinear`: an nn.Linear whose quantized weight (int4_blocks / int8_rows) is called
  directly; through the tensor subclass's dispatch (`__torch_function__`) each call cost
  10-20 µs more here, 3-4 ms a token for the bundled model's 211 matmuls.
- RMSNorm modules whose own forward our fused `rms_norm` reproduces (checked on the module
  itself, whatever its class): one call instead of five eager ops, ~40 µs each in a decode
  step here, 61 of them a token.
- attention of a decode step (one query per sequence, no mask) as our `decode_attention`,
  registered with transformers' `AttentionInterface`: torch's SDPA took ~50 µs a layer for
  it here. Everything else (prompts, masks, sliding windows, soft caps) stays with SDPA.
Decoder layers built of these parts then run their whole decode step as two calls
(kernels/cpu/fused_layer.py, after `rewire`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from vramancer.kernels.cpu import build as cpu_kernels
from vramancer.kernels.cpu.rewiring import route_attention, swap_class, swap_forward


class KernelLinear(nn.Linear):
    """nn.Linear with a quantized weight that has a `linear(x, bias)` of our kernels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and x.device.type == "cpu":
            return self.weight.linear(x, self.bias)
        return F.linear(x, self.weight, self.bias)


def _fused_rms_norm(self: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    if hidden.dtype == torch.float32 and hidden.device.type == "cpu" and self.weight.dtype == torch.float32:
        return cpu_kernels.kernels().rms_norm(hidden.contiguous(), self.weight, self.vramancer_eps)
    return type(self).forward(self, hidden)


def _norm_epsilon(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def fuse_rms_norm(module: nn.Module) -> bool:
    """Route `module` through the fused kernel if it is an RMSNorm the kernel reproduces
    (some scale by 1 + weight, some keep no weight: those keep their own forward)."""
    weight, eps = getattr(module, "weight", None), _norm_epsilon(module)
    if not type(module).__name__.endswith("RMSNorm") or eps is None or not isinstance(weight, torch.Tensor) \
            or weight.dim() != 1 or weight.dtype != torch.float32 or weight.device.type != "cpu":
        return False
    ops = cpu_kernels.kernels()
    if ops is None:
        return False
    probe = torch.randn(3, weight.numel(), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = module(probe)
        got = ops.rms_norm(probe, weight, eps)
    if not torch.allclose(got, expected, rtol=1e-5, atol=1e-6):
        return False
    module.vramancer_eps = eps
    swap_forward(module, _fused_rms_norm)
    return True


ATTENTION = "vramancer_cpu"  # the name our attention is registered under in transformers


def one_query_on_kernels(query: torch.Tensor, dropout: float, kwargs: dict) -> bool:
    """Whether our decode-attention kernels compute this call as SDPA would: one float32 query
    per sequence on the CPU, no dropout, and nothing only SDPA knows (soft caps, sliding
    windows, attention sinks)."""
    return (query.shape[2] == 1 and query.dtype == torch.float32 and query.device.type == "cpu" and dropout == 0.0
            and query.shape[-1] % 8 == 0 and not kwargs.get("softcap") and kwargs.get("sliding_window") is None
            and kwargs.get("s_aux") is None)


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    if attention_mask is None and one_query_on_kernels(query, dropout, kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return cpu_kernels.kernels().decode_attention(query, key, value, scale), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def attend_through(model: nn.Module, name: str, attention) -> bool:
    """Register `attention` with transformers as `name` (with SDPA's masks) and run `model`'s
    attention through it, where the model uses SDPA now."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    route_attention(model, name)
    return True


def use_decode_attention(model: nn.Module) -> bool:
    """Run `model`'s attention through `_attention` where it uses SDPA now (the same masks)."""
    return attend_through(model, ATTENTION, _attention)


def rewire(model: nn.Module) -> None:
    """Quantized linears, RMSNorms and decode attention of `model` (on the CPU, float32) onto
    our kernels. Idempotent."""
    use_decode_attention(model)
    for module in model.modules():
        if type(module) is nn.Linear and hasattr(module.weight, "linear"):
            swap_class(module, KernelLinear)
        elif "forward" not in vars(module):
            fuse_rms_norm(module)
