"""A model described once per load: its config, architecture, caches and profile (the sizes
of its parts), read from its modules.

`describe_model` reads a model built on the meta device (only shapes are read); the planner,
the profiler, the runtime and the nodes are handed that one description, and `bound_to` finds
the same parts in the loaded (or cut, or partly loaded) copy by their module names instead
of describing it again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from vramancer.model.architecture import Architecture, describe, part_tensors
from vramancer.planning.memory import LayerCache
from vramancer.planning.placement import ModelProfile
from vramancer.quantization.weights import (
    quantizable,
    quantized_weight_bytes,
    stored_bytes,
)


@dataclass(frozen=True)
class ModelDescription:
    """One model as every part of a load sees it."""

    config: object
    dtype: torch.dtype  # the compute dtype the caches and sizes are priced in
    weights: str  # native, q8 or q4: how the weights are held
    architecture: Architecture  # bound to the model it was last bound to (first the meta one)
    profile: ModelProfile
    # What a decoder layer returns: a tuple (hidden state first: Bloom, Falcon, GPT-Neo, MPT)
    # or the hidden state alone. Stand-ins for layers that run elsewhere return the same.
    layer_returns_tuple: bool = False

    @property
    def caches(self) -> tuple[LayerCache, ...]:
        return self.architecture.caches

    def bound_to(self, model: torch.nn.Module, recount: bool = True) -> "ModelDescription":
        """The same description over another copy of the model, its parts found by name.
        With `recount`, the profile counts what that copy's tensors really hold (a loaded
        model's quantized weights); a copy whose tensors are still on the meta device keeps
        the profile as it was."""
        arch = self.architecture.bind(model)
        profile = _profile(model, arch, self.dtype, self.weights) if recount else self.profile
        return replace(self, architecture=arch, profile=profile)


def describe_model(model: torch.nn.Module, dtype: torch.dtype, weights: str = "native") -> ModelDescription:
    """The description of `model` (usually built on the meta device): the one `describe()`
    of a load."""
    arch = describe(model, dtype)
    return ModelDescription(model.config, dtype, weights, arch, _profile(model, arch, dtype, weights),
                            _layer_returns_tuple(model, arch))


class _FirstLayerRan(Exception):
    def __init__(self, output):
        super().__init__("probe done")
        self.output = output


def _layer_returns_tuple(model: torch.nn.Module, arch: Architecture) -> bool:
    """Whether the first decoder layer returns a tuple, read from a one-token pass that stops
    after that layer: of the model itself on the meta device (shapes only, no memory), or,
    for a model whose pass reads a value on the way (Falcon, GPT-Neo), of a copy with one
    layer and an 8-token vocabulary in memory that is never initialised. A model with real
    tensors, or one neither pass can run, is taken to return the hidden state alone."""
    if not all(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        return False
    found = _first_layer_output(model, arch, "meta")
    if found is None:
        found = _first_layer_output(*_one_layer_copy(model.config, arch), "cpu")
    return isinstance(found, tuple)


def _one_layer_copy(config, arch: Architecture) -> tuple[torch.nn.Module | None, Architecture | None]:
    from transformers import AutoModelForCausalLM

    from vramancer.model.architecture import cut_config

    try:
        small = cut_config(config, 1)
        small.vocab_size = 8
        with torch.device("meta"):
            copy = AutoModelForCausalLM.from_config(small)
        copy.to_empty(device="cpu")  # memory of its own, never written: only the layer's output form is read
        return copy, arch.bind(copy)
    except Exception:  # noqa: BLE001 - no copy: the usual convention
        return None, None


def _first_layer_output(model, arch, device: str):
    """What the first layer returns in a one-token pass of `model`, or None if it cannot run."""
    if model is None:
        return None

    def stop(module, args, output):
        raise _FirstLayerRan(output)

    handle = arch.layers[0].register_forward_hook(stop)
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)
    except _FirstLayerRan as ran:
        return ran.output
    except Exception:  # noqa: BLE001 - a pass that cannot run here
        return None
    finally:
        handle.remove()
    return None


def profile_model(model: torch.nn.Module, dtype: torch.dtype, weights: str = "native") -> ModelProfile:
    """The profile alone, for a model not described yet (tests, tools)."""
    return describe_model(model, dtype, weights).profile


def _profile(model: torch.nn.Module, arch: Architecture, dtype: torch.dtype, weights: str) -> ModelProfile:
    """Works on a model built on the meta device: only shapes are read. Under quantized
    `weights`, a meta model's linear weights count what torchao will store for them, and a
    loaded model's quantized tensors count what they hold."""
    size = torch.empty((), dtype=dtype).element_size()

    table_and_head = (arch.input_embeddings, arch.output_embeddings)

    def tensor_bytes(owner: torch.nn.Module, name: str, t: torch.Tensor) -> int:
        if t.is_meta and name == "weight" and weights != "native":
            if any(owner is m for m in table_and_head):  # per-row int8, whatever `weights`
                return quantized_weight_bytes(t.shape[0], t.shape[1], "q8", dtype)
            if quantizable(owner, weights, arch.output_embeddings):
                return quantized_weight_bytes(t.shape[0], t.shape[1], weights, dtype)
        if is_traceable_wrapper_subclass(t):
            return stored_bytes(t)  # already quantized: what it really holds
        return t.numel() * (size if t.is_floating_point() else t.element_size())

    def nbytes(modules: list[torch.nn.Module], holders: list[torch.nn.Module] = ()) -> int:
        # a tensor shared by two modules counts once
        seen = {id(t): (owner, name, t) for owner, name, t in part_tensors(modules, holders)}
        return sum(tensor_bytes(*entry) for entry in seen.values())

    head_weight = tensor_bytes(arch.output_embeddings, "weight", arch.output_embeddings.weight)
    tied = arch.tied() or bool(getattr(model.config, "tie_word_embeddings", False))
    return ModelProfile(
        num_layers=len(arch.layers),
        layer_bytes=tuple(nbytes([layer]) for layer in arch.layers),
        embed_bytes=nbytes(arch.before, arch.holders),
        head_bytes=nbytes(arch.after),  # the head's weight counts even when tied: tied_bytes says so
        tied_bytes=head_weight if tied else 0,
        kv_bytes_per_token=max((c.bytes_per_token for c in arch.caches), default=0),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        vocab_size=arch.vocab_size,
        dtype_bytes=size,
        layer_caches=arch.caches,
        architecture=arch.model_type,
    )
