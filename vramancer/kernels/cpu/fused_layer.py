"""A decoder layer's decode step as two calls of our CPU kernels (kernels/cpu/src/decode_layer.cpp).

Under quantized weights on the CPU, a decode step through transformers' decoder layer is ~25
module calls and eager ops (norms, projections, views, rotary, attention, MLP): about 0.7 ms
of Python a layer here, as much as the layer's matmuls. `install` gives a layer a forward that
runs such a step as `DecodeLayer.project` (norm, q/k/v, rotary), the cache's own `update`,
and `DecodeLayer.finish` (attention, o_proj, MLP, residuals); the KV cache stays transformers'
object, which migration moves and telemetry counts.

Only where the result is the layer's own: one new token per sequence, no attention mask,
float32 on the CPU, every projection a KernelLinear on our q4/q8 kernels, fused RMSNorms, SiLU,
no per-head norms or sliding window. Anything else (prompts, masks, other dtypes, GPUs) runs
the layer's own forward. In a ragged batch's decode step (scheduling/ragged.py: several
sequences as rows, each with keys of its own) the cache's `attended_rows` hands over each
row's buffers and length after its `update`, and each row attends to its own positions, as alone. The module's `__call__` and its hooks (the split's hand-overs) stay.
Install checks the fused step against the layer's own forward on a probe; the weights are
gathered once per layer and gathered again by `refresh` when they may have moved.
"""

from __future__ import annotations

import torch
from torch import nn

from vramancer.kernels.cpu import build as cpu_kernels
from vramancer.kernels.cpu.rewiring import swap_forward

ATTENTION_PARTS = {"q_proj", "k_proj", "v_proj", "o_proj"}
MLP_PARTS = {"gate_proj", "up_proj", "down_proj", "act_fn"}
LAYER_PARTS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}


def _forward(self: nn.Module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    fused = self.vramancer_fused
    cache = kwargs.get("cache")
    if (fused is None or args or cache is None or hidden_states.shape[1] != 1 or self.training
            or kwargs.get("position_embeddings") is None or kwargs.get("attention_mask") is not None
            or hidden_states.dtype != torch.float32 or hidden_states.device.type != "cpu"):
        return type(self).forward(self, hidden_states, *args, **kwargs)
    cos, sin = kwargs["position_embeddings"]
    query, key, value = fused.project(hidden_states, cos, sin)
    # What the attention module hands the cache (its own keyword arguments), as it would.
    extra = {"position_ids": None, "use_cache": False, **kwargs}
    for name in ("attention_mask", "cache", "position_embeddings"):
        extra.pop(name, None)
    keys, values = cache.update(key, value, self.vramancer_layer_idx, kwargs=extra)
    per_sequence = getattr(cache, "attended_rows", None)  # a ragged batch's cache (scheduling/ragged.py)
    rows = per_sequence(self.vramancer_layer_idx) if per_sequence is not None else None
    if rows is not None:  # each row over its own sequence's keys and values
        return fused.finish_rows(hidden_states, query, *rows)
    return fused.finish(hidden_states, query, keys, values)


def _kernel_weight(weight: torch.Tensor) -> list[torch.Tensor] | None:
    """The plain tensors our kernels take for a quantized weight on the CPU, else None."""
    from vramancer.quantization.q4_blocks import BlockInt4Tensor
    from vramancer.quantization.q8_blocks import BlockInt8Tensor
    from vramancer.quantization.q8_rows import RowInt8Tensor

    if weight.device.type != "cpu":
        return None
    if isinstance(weight, BlockInt4Tensor):
        return [weight.qdata]
    if isinstance(weight, BlockInt8Tensor):
        return [weight.qdata, weight.scale]  # float16 scales per block tell it from q8 rows
    if isinstance(weight, RowInt8Tensor) and weight.act_quant_kwargs is None:
        return [weight.qdata, weight.scale.reshape(-1)]
    return None


def _children(module: nn.Module) -> set[str]:
    return {name for name, _ in module.named_children()}


def _prepare(layer: nn.Module):
    """The layer's DecodeLayer, or None when its decode step is not what DecodeLayer runs."""
    from transformers.activations import SiLUActivation

    from vramancer.kernels.cpu.modules import ATTENTION, KernelLinear

    ops = cpu_kernels.kernels()
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if ops is None or attn is None or mlp is None or _children(layer) != LAYER_PARTS \
            or _children(attn) != ATTENTION_PARTS or _children(mlp) != MLP_PARTS:
        return None  # other parts (per-head norms, extra norms) do what DecodeLayer does not
    config = getattr(attn, "config", None)
    head_dim = getattr(attn, "head_dim", None)
    if (getattr(config, "_attn_implementation", None) != ATTENTION or not isinstance(head_dim, int) or head_dim % 16
            or getattr(attn, "sliding_window", None) is not None or getattr(config, "attn_logit_softcapping", None)
            or not isinstance(getattr(attn, "layer_idx", None), int) or not isinstance(mlp.act_fn, (nn.SiLU, SiLUActivation))):
        return None
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    if any(getattr(norm, "vramancer_eps", None) is None or norm.weight.device.type != "cpu" for norm in norms):
        return None
    projections = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    if not all(isinstance(p, KernelLinear) for p in projections):
        return None
    weights = [_kernel_weight(p.weight) for p in projections]
    biases = [p.bias for p in projections]
    if any(w is None for w in weights) or any(b is not None and (b.dtype != torch.float32 or b.device.type != "cpu")
                                             for b in biases):
        return None
    heads, kv_heads = attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim
    if heads * head_dim != attn.q_proj.out_features or kv_heads * head_dim != attn.k_proj.out_features \
            or not kv_heads or heads % kv_heads:
        return None
    return ops.DecodeLayer(weights, biases, layer.input_layernorm.weight, layer.input_layernorm.vramancer_eps,
                           layer.post_attention_layernorm.weight, layer.post_attention_layernorm.vramancer_eps,
                           heads, kv_heads, head_dim, float(attn.scaling))


def _matches_own_forward(layer: nn.Module, fused) -> bool:
    """One decode step over a short cache, fused and by the layer's own forward: the same?"""
    from transformers import DynamicCache

    attn = layer.self_attn
    hidden_size, head_dim, kv_heads = attn.q_proj.in_features, attn.head_dim, attn.k_proj.out_features // attn.head_dim
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 1, hidden_size, generator=gen)
    angles = torch.rand(1, 1, head_dim // 2, generator=gen) * 6.3
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    past = torch.randn(2, 1, kv_heads, 3, head_dim, generator=gen)
    caches = [DynamicCache(), DynamicCache()]
    for cache in caches:
        cache.update(past[0].clone(), past[1].clone(), attn.layer_idx)
    kwargs = {"attention_mask": None, "position_ids": torch.tensor([[3]]), "use_cache": True,
              "position_embeddings": (cos, sin)}
    try:
        with torch.inference_mode():
            expected = type(layer).forward(layer, hidden, cache=caches[0], **kwargs)
            query, key, value = fused.project(hidden, cos, sin)
            keys, values = caches[1].update(key, value, attn.layer_idx)
            got = fused.finish(hidden, query, keys, values)
    except Exception:  # a layer that wants more than a plain decode step: it keeps its own forward
        return False
    own = caches[0].layers[attn.layer_idx]
    return (got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
            and torch.allclose(keys, own.keys, rtol=1e-5, atol=1e-5)
            and torch.allclose(values, own.values, rtol=1e-5, atol=1e-5))


# Per layer structure (classes, shapes, weight kinds, biases), whether its probe step matched:
# layers alike compute alike, so one probe serves them all (~6 ms each for 30 layers at load).
_probed: dict[tuple, bool] = {}


def _structure(layer: nn.Module) -> tuple:
    """What decides how a layer computes its decode step, besides the values of its weights."""
    attn, mlp = layer.self_attn, layer.mlp
    projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    return (type(layer), type(attn), type(mlp), type(mlp.act_fn), attn.head_dim, float(attn.scaling),
            tuple((p.in_features, p.out_features, type(p.weight), p.bias is not None) for p in projections))


def _is_ours(layer: nn.Module) -> bool:
    return getattr(vars(layer).get("forward"), "__func__", None) is _forward


def install(layer: nn.Module) -> bool:
    """Give `layer` the fused decode step if it runs its decode step the same (checked on a
    probe); True if it now has it. Installing again only gathers the weights again."""
    if _is_ours(layer):
        return refresh(layer)
    if "forward" in vars(layer):
        return False  # something else already wraps this layer's forward: leave it as it is
    fused = _prepare(layer)
    if fused is None:
        return False
    key = _structure(layer)
    if key not in _probed:
        _probed[key] = _matches_own_forward(layer, fused)
    if not _probed[key]:
        return False
    layer.vramancer_fused = fused
    layer.vramancer_layer_idx = layer.self_attn.layer_idx  # its cache entry (read each step: no module lookup)
    swap_forward(layer, _forward)
    return True


def fuse_decoder_layers(model: nn.Module) -> int:
    """`install` on every module of a model that `kernel_modules.rewire` rewired (the ones
    that are not decoder layers are passed over at once). Returns how many are fused."""
    return sum(install(module) for module in model.modules())


def refresh(layer: nn.Module) -> bool:
    """Gather a fused layer's weights again (after a move: its tensors may be new ones, on
    another device); a layer that no longer qualifies runs its own forward. True if fused."""
    if not _is_ours(layer):
        return False
    layer.vramancer_fused = _prepare(layer)
    return layer.vramancer_fused is not None


def is_fused(layer: nn.Module) -> bool:
    """Whether `layer` takes the fused decode step where it can."""
    return _is_ours(layer) and layer.vramancer_fused is not None
