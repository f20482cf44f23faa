"""What a decoder architecture looks like, read from the model itself.

Every other part of the engine asks this module, never a model's attribute names: which
`ModuleList` is the decoder stack (the one whose layers are of the class the model names in
`_no_split_modules`, as accelerate finds it), which modules run before it (token and position
embeddings, rotary tables, embedding norms) and after it (final norm, output head), whether the
head shares its weight with the embeddings, and what each layer keeps in the cache (keys and
values of all tokens or of a sliding window, a recurrent state, both, or nothing) and how many bytes.

What cannot be split this way is refused with one sentence (`UnsupportedArchitecture`),
before any weights are read: `describe` works on a model built on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator

import torch
from torch import nn

from vramancer.config.errors import VramancerError
from vramancer.planning.memory import LayerCache

SUPPORTED = ("decoder-only language models whose layers cache keys and values (full, sliding-window or "
             "compressed attention, as Llama, Qwen, Gemma, Phi, GPT-2, Falcon, Bloom, OLMo and DeepSeek have) "
             "or a recurrent state (as Mamba and linear attention have)")
# The cache layer kinds of transformers' DynamicCache (`layer_types`) that hold keys and values.
FULL_KINDS = ("full_attention",)
WINDOW_KINDS = ("sliding_attention", "chunked_attention")
# Kinds that keep a recurrent or convolution state (Mamba, linear attention), alone or beside
# keys and values: their size is read from a pass of the model on the meta device.
STATE_KINDS = ("linear_attention", "conv", "hybrid", "hybrid_sliding")
# Layers that keep nothing: transformers' `dummy`, which it gives the MLP and expert layers of
# Nemotron-H (and, below, layers that read another layer's cache, which are refused).
NONE_KINDS = ("dummy",)
PROBE_TOKENS = (2, 4)  # the two prompt lengths of that pass: what grows with them is per token
# Module names that run after the final norm (OPT's projection back to the embedding width).
AFTER_NORM_NAMES = ("project_out",)


class UnsupportedArchitecture(VramancerError):
    """The model is not a decoder stack VRAMancer can split."""


@dataclass(frozen=True)
class PartNames:
    """The module names of an Architecture's parts (\"\" is the model itself)."""

    base: str
    layers: str
    before: tuple[str, ...]
    holders: tuple[str, ...]
    after: tuple[str, ...]


@dataclass
class Architecture:
    """The parts of one loaded (or meta) causal LM, in the order they run."""

    model_type: str
    base: nn.Module  # the module that runs the stack (LlamaModel, GPT2Model, OPTDecoder, …)
    layers: nn.ModuleList  # the decoder stack
    before: list[nn.Module]  # what runs before the stack: embeddings, positions, rotary tables
    # Modules whose own tensors (not their children's) run before the stack too: the base and
    # the wrappers above it (GPTBigCode keeps its causal-mask table on the base itself).
    holders: list[nn.Module]
    after: list[nn.Module]  # what runs after it, in order: final norm(s), then the output head
    caches: tuple[LayerCache, ...]  # per layer
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    head_dim: int  # of one attention head: the size of the rotary tables handed across boundaries
    # Where each part sits in the module tree, so that `bind` finds the same parts in another
    # copy of the model without reading it again.
    names: "PartNames | None" = None

    def bind(self, model: nn.Module) -> "Architecture":
        """This architecture on another copy of the same model (the loaded one, one cut to its
        first layers, a node's copy), its parts found by their module names: the model is not
        described again. UnsupportedArchitecture if the copy lacks one of them."""
        names = self.names
        try:
            layers = model.get_submodule(names.layers)
            parts = {key: [model.get_submodule(n) for n in getattr(names, key)] for key in ("before", "holders", "after")}
            base = model.get_submodule(names.base)
        except AttributeError:
            raise UnsupportedArchitecture(
                f"{self.model_type} as loaded lacks a part it had when it was described; it splits {SUPPORTED}.") from None
        if not isinstance(layers, nn.ModuleList) or len(layers) > len(self.caches):
            raise UnsupportedArchitecture(
                f"{self.model_type} as loaded has another decoder stack than it was described with; it splits {SUPPORTED}.")
        return replace(self, base=base, layers=layers, caches=self.caches[:len(layers)], **parts)

    @property
    def input_embeddings(self) -> nn.Module:
        return self.base.get_input_embeddings()

    @property
    def output_embeddings(self) -> nn.Module:
        return self.after[-1]

    @property
    def head_entry(self) -> nn.Module:
        """The first module after the stack: the hand-over into the head part hooks here."""
        return self.after[0]

    def tied(self) -> bool:
        """True while the output head uses the very tensor of the input embeddings."""
        return self.output_embeddings.weight is self.input_embeddings.weight


def describe(model: nn.Module, dtype: torch.dtype | None = None) -> Architecture:
    """The architecture of `model` (real or on the meta device), or UnsupportedArchitecture.
    Cache sizes are for `dtype` (default: the model's own)."""
    config = model.config
    name = getattr(config, "model_type", type(model).__name__)
    refuse_config(config)
    found = _find_stack(model)
    if found is None:
        raise UnsupportedArchitecture(
            f"{name} has no decoder layer stack VRAMancer can find; it splits {SUPPORTED}.")
    base_name, layers = found
    base = model.get_submodule(base_name) if base_name else model
    if type(base).__name__.endswith("Encoder"):
        # BERT and its kin: encoders that transformers can be asked to run as decoders
        raise UnsupportedArchitecture(f"{name} is an encoder model; VRAMancer splits {SUPPORTED}.")
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight") or not hasattr(base, "get_input_embeddings"):
        raise UnsupportedArchitecture(f"{name} has no output head over a token vocabulary; it splits {SUPPORTED}.")
    before, after = _sides(model, base, layers, head)
    holders = [model] + [model.get_submodule(".".join(base_name.split(".")[:i + 1]))
                         for i in range(len(base_name.split("."))) if base_name]
    caches = layer_caches(config, len(layers), torch.empty((), dtype=dtype or _dtype_of(model)).element_size())
    text = _text_config(config)
    hidden = text.hidden_size
    named = {id(module): name for name, module in model.named_modules()}
    names = PartNames(base_name, named[id(layers)], tuple(named[id(m)] for m in before),
                      tuple(named[id(m)] for m in holders), tuple(named[id(m)] for m in after))
    return Architecture(
        model_type=name,
        base=base,
        layers=layers,
        before=before,
        holders=holders,
        after=after,
        caches=caches,
        hidden_size=hidden,
        intermediate_size=getattr(text, "intermediate_size", None) or 4 * hidden,
        vocab_size=text.vocab_size,
        head_dim=attention_head_dim(text),
        names=names,
    )


def refuse_config(config) -> None:
    """Refuse from the config alone what cannot be split: encoder-decoders, and layers whose
    cache is of a kind VRAMancer does not know (shared between layers, indexed)."""
    name = getattr(config, "model_type", "this model")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedArchitecture(f"{name} is an encoder-decoder model; VRAMancer splits {SUPPORTED}.")
    kinds = sorted(set(_layer_types(config)[0]) - set(FULL_KINDS + WINDOW_KINDS + STATE_KINDS + NONE_KINDS))
    if "reuse" in (getattr(_text_config(config), "kv_sharing_modes", None) or ()):
        kinds.append("shared-cache")  # a `dummy` layer that reads another layer's keys and values (Gemma 4)
    if kinds:
        raise UnsupportedArchitecture(
            f"{name} has {', '.join(kinds)} layers, whose cache VRAMancer cannot place layer by layer; "
            f"it splits {SUPPORTED}.")


def layer_caches(config, count: int, dtype_bytes: int) -> tuple[LayerCache, ...]:
    """Each layer's cache as transformers' DynamicCache will hold it (`get_layer_types_and_kwargs`)."""
    kinds, kwargs = _layer_types(config)
    if len(kinds) != count:
        raise UnsupportedArchitecture(
            f"{getattr(config, 'model_type', 'this model')} declares {len(kinds)} layer types for {count} "
            f"layers; VRAMancer splits {SUPPORTED}.")
    # Keys and values are priced from the config only where some layer holds them, and only
    # if the config names its heads the usual way; anything else is measured on the meta model.
    attention = set(kinds) & set(FULL_KINDS + WINDOW_KINDS)
    per_token = attention_bytes_per_token(_text_config(config), dtype_bytes) if attention else 0
    probe = bool(set(kinds) & set(STATE_KINDS)) or (bool(attention) and per_token is None)
    probed = _probe_states(config, dtype_bytes) if probe else None
    caches = []
    for index, (kind, extra) in enumerate(zip(kinds, kwargs)):
        window = extra.get("sliding_window")
        if kind in NONE_KINDS:
            caches.append(LayerCache(kind, 0))
        elif kind in STATE_KINDS or per_token is None:
            caches.append(LayerCache(kind, probed[index][0], window, probed[index][1]))
        else:
            caches.append(LayerCache(kind, per_token, window if kind in WINDOW_KINDS else None))
    return tuple(caches)


def _probe_states(config, dtype_bytes: int) -> list[tuple[int, int]]:
    """(bytes per token, constant bytes) of each layer's cache, read from two passes of the
    model on the meta device (shapes only, no memory). They run in bfloat16, which transformers'
    grouped expert kernels need on any device; a tensor in that type is counted at
    `dtype_bytes`, one a model keeps in float32 whatever its type (recurrent states) at 4."""
    from transformers import AutoModelForCausalLM, DynamicCache

    name = getattr(config, "model_type", "this model")
    sizes = []
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        for tokens in PROBE_TOKENS:
            cache = DynamicCache(config=model.config)
            with torch.inference_mode():
                model(torch.zeros(1, tokens, dtype=torch.long, device="meta"), cache=cache, use_cache=True,
                      logits_to_keep=1)
            sizes.append([sum(t.numel() * (dtype_bytes if t.dtype == torch.bfloat16 else t.element_size())
                              for _, _, t in cache_tensors(entry) if t.dim() > 0) for entry in cache.layers])
    except Exception as exc:  # noqa: BLE001 - whatever stops the pass, the state cannot be sized
        raise UnsupportedArchitecture(
            f"{name} keeps a recurrent state whose size VRAMancer could not read from the model "
            f"({type(exc).__name__}); it splits {SUPPORTED}.") from None
    short, long = sizes
    steps = PROBE_TOKENS[1] - PROBE_TOKENS[0]
    per_token = [(b - a) // steps for a, b in zip(short, long)]
    return [(grow, a - grow * PROBE_TOKENS[0]) for grow, a in zip(per_token, short)]


def attention_head_dim(config) -> int:
    """The size of one attention head (of the rotary tables handed across a boundary), or 0
    for a config without attention heads: such a model hands none across."""
    heads = getattr(config, "num_attention_heads", None)
    return getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else 0)


def attention_bytes_per_token(config, dtype_bytes: int) -> int | None:
    """Keys + values one attention layer caches per token, as transformers stores them; None
    when the config does not name its attention heads (the cache is then measured instead)."""
    heads = getattr(config, "num_attention_heads", None)
    if not heads:
        return None
    if getattr(config, "kv_lora_rank", None) and getattr(config, "qk_rope_head_dim", None):
        # Compressed (multi-head latent) attention, as in DeepSeek V2/V3: transformers caches
        # the compressed latent and the shared rotary part of the key, one "head" of each.
        return (config.kv_lora_rank + config.qk_rope_head_dim) * dtype_bytes
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        kv_heads = 1  # Falcon-7B, StarCoder (gpt_bigcode): one key/value head for all
    else:
        kv_heads = (getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None)
                    or heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * kv_heads * head_dim * dtype_bytes


def cut_config(config, count: int):
    """A copy of `config` with its first `count` layers: every per-layer list (layer_types, …)
    cut with it, so transformers accepts it and each kept layer is what it was."""
    text = _text_config(config)
    total = text.num_hidden_layers
    values = text.to_dict()
    for key, value in values.items():
        if isinstance(value, list) and len(value) == total and key not in ("architectures",):
            values[key] = value[:count]
    key = getattr(text, "attribute_map", {}).get("num_hidden_layers", "num_hidden_layers")
    values[key] = count
    return text.__class__.from_dict(values)


def own_tensors(module: nn.Module) -> Iterator[tuple[nn.Module, str, torch.Tensor]]:
    """(module, name, tensor) for the parameters and buffers `module` holds itself."""
    for name, tensor in list(module._parameters.items()) + list(module._buffers.items()):
        if tensor is not None:
            yield module, name, tensor


def part_tensors(modules: list[nn.Module], holders: list[nn.Module] = ()) -> Iterator[tuple[nn.Module, str, torch.Tensor]]:
    """(owner, name, tensor) for every tensor under `modules` and of `holders` themselves."""
    for module in modules:
        for owner in module.modules():
            yield from own_tensors(owner)
    for holder in holders:
        yield from own_tensors(holder)


def layers_of_every_kind(config) -> int:
    """How many first layers hold one layer of each cache kind the model has: a cut copy needs
    as many (transformers asks an attention layer for the length of the cache)."""
    kinds = _layer_types(config)[0]
    return next(n for n in range(1, len(kinds) + 1) if set(kinds[:n]) == set(kinds))


def cache_tensors(entry) -> Iterator[tuple[object, object, torch.Tensor]]:
    """(container, key, tensor) for every tensor one cache layer holds: keys and values, and
    whatever else its kind keeps (sliding-window counters, indexer keys, conv or recurrent
    states in dicts, a ragged cache's buffers by sequence). `container[key]` or
    `setattr(container, key, …)` replaces it. Each dict is read at once (a copy of its
    items), so telemetry on another thread never iterates one while the engine adds to it."""
    for name, value in list(vars(entry).items()):
        if isinstance(value, torch.Tensor):
            yield entry, name, value
        elif isinstance(value, dict):
            for key, item in list(value.items()):
                if isinstance(item, torch.Tensor):
                    yield value, key, item


def cache_bytes(entry) -> int:
    """Bytes of one cache layer's tensors (shapes only: safe from any thread)."""
    return sum(t.numel() * t.element_size() for _, _, t in cache_tensors(entry) if not t.is_meta and t.dim() > 0)


def replace_cache_tensor(container, key, tensor: torch.Tensor) -> None:
    if isinstance(container, dict):
        container[key] = tensor
    else:
        setattr(container, key, tensor)


# --- finding the parts ----------------------------------------------------------------


def _find_stack(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(name of the stack's owner, the stack): the longest ModuleList whose elements are all of
    a class named in `_no_split_modules`."""
    unsplit = set(getattr(model, "_no_split_modules", None) or ())
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if all(type(layer).__name__ in unsplit for layer in module):
            if best is None or len(module) > len(best[1]):
                best = (name.rpartition(".")[0], module)
    return best


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def _sides(model: nn.Module, base: nn.Module, layers: nn.ModuleList, head: nn.Module) -> tuple[list, list]:
    """Split the modules outside the stack into what runs before it and what runs after.

    After the stack run the final norm (the only norm beside the stack, or the last one
    registered when there are two: Bloom normalises its embeddings too), OPT's `project_out`,
    and the output head; everything else of the base (embeddings, position embeddings, rotary
    tables, dropout) runs before it."""
    children = [(name, child) for name, child in base.named_children() if child is not layers]
    norms = [child for _, child in children if _is_norm(child)]
    final_norm = norms[-1] if norms else None
    after = ([final_norm] if final_norm is not None else [])
    after += [child for name, child in children if name in AFTER_NORM_NAMES]
    before = [child for _, child in children if all(child is not a for a in after)]
    # Anything the top model owns beside the base and the head (rare) runs with the head.
    extra = [child for child in model.children() if child is not head
             and not any(module is base for module in child.modules())]
    return before, after + extra + [head]


def _text_config(config):
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if callable(getter) else config


def _layer_types(config) -> tuple[list[str], list[dict]]:
    from transformers.cache_utils import get_layer_types_and_kwargs

    return get_layer_types_and_kwargs(_text_config(config))


def _dtype_of(model: nn.Module) -> torch.dtype:
    for tensor in model.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32

