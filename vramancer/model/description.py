"""A model described for planning: the sizes of its parts and caches, read from its modules.

Works on a model built on the meta device (only shapes are read) as on a loaded one.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from vramancer.model.architecture import describe, part_tensors
from vramancer.planning.placement import ModelProfile
from vramancer.quantization.weights import (
    quantizable,
    quantized_weight_bytes,
    stored_bytes,
)


def profile_model(model: torch.nn.Module, dtype: torch.dtype, weights: str = "native") -> ModelProfile:
    """Works on a model built on the meta device: only shapes are read. Under quantized
    `weights`, a meta model's linear weights count what torchao will store for them, and a
    loaded model's quantized tensors count what they hold."""
    arch = describe(model, dtype)
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
