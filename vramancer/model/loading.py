"""Reading a model's weights into host memory, in the compute dtype or quantized, and the
module tree built on the meta device for sizing before any weight is read."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from vramancer.config.errors import VramancerError
from vramancer.kernels.cpu.few_rows import (
    use_few_rows_attention,
    use_few_rows_linear,
    use_few_rows_norm,
)
from vramancer.model.source import ModelSource, load_config
from vramancer.model.weights_cache import (
    WEIGHTS_FILE,
    from_cache,
    gguf_cache_entry,
    gguf_parsed_once,
    let_go_of_gguf_reader,
    store,
    write_safetensors,
)

# transformers imports torchao (our --weights kernels) whenever it builds a model; torchao then
# warns on stderr about CUDA-only libraries a CPU build cannot load, and torch about enum
# registrations: noise about nothing we use, in front of our one-sentence errors.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_meta_model(config, dtype: torch.dtype) -> torch.nn.Module:
    """The model's module tree with no storage, for sizing and planning before any load."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError:
        from vramancer.model.architecture import SUPPORTED, UnsupportedArchitecture

        name = getattr(config, "model_type", None) or "this model"
        raise UnsupportedArchitecture(f"{name} is not a causal language model; VRAMancer splits {SUPPORTED}.") from None


def load_weights(source: ModelSource, dtype: torch.dtype, weights: str = "native") -> torch.nn.Module:
    """Read the weights into host memory; the runtime then sends each part to its device.
    Under quantized `weights` (see quantization/weights.py) the linear weights are quantized
    here, on the host, so each device only ever receives quantized tensors.

    GGUF files are dequantised on the host by transformers in any case, so no accelerator
    ever holds more than the parts planned for it. From the cache, the weights are
    memory-mapped once the file has passed its CRC check (the parts placed on the CPU are
    copied out of the mapping when the plan is applied: runtime.SplitModel.apply)."""
    entry = gguf_cache_entry(source.gguf_path)
    if entry is None:
        model = _from_pretrained(source.location, dtype, **source.pretrained_kwargs())
    else:
        config = load_config(source)  # from the cache: no third parse of the GGUF
        piece = f"weights-{str(dtype).removeprefix('torch.')}"
        model = from_cache(entry, piece, lambda folder: _read_weights(folder, config, dtype))
        if model is None:
            with gguf_parsed_once():
                model = _from_pretrained(source.location, dtype, config=config, **source.pretrained_kwargs())
            store(entry, piece, lambda folder: _write_weights(folder, model))
        let_go_of_gguf_reader()  # whichever way the weights came, the config's parse is done with
    model.eval()
    model.requires_grad_(False)
    if weights != "native":
        from vramancer.quantization.weights import quantize_model

        quantize_model(model, weights)
    elif dtype == torch.float32:  # a decode step of a few sequences reads each weight once on the CPU (few_rows.py)
        # Our kernels take float32 only: a bfloat16/float16 model (the GPUs' dtype) has no use
        # for them, and must not wait minutes for their first build.
        use_few_rows_linear(model)
        use_few_rows_norm(model)
        use_few_rows_attention(model)
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_matmul_foldable_input)
    return model


def _matmul_foldable_input(module: torch.nn.Module, args: tuple):
    """Give the output projection an input `torch.matmul` can fold into one matrix product.

    At prefill transformers hands the head a view of the last position, shaped [1, 1, H] but
    strided like [1, T, H]. For weights that need no gradient (ours), matmul then declines to
    fold it and runs a batched product over an expanded copy of the weight: 17 ms instead of
    7 ms for the bundled model's 49152 × 576 head on two cores — a tenth of the time to first
    token (torch.profiler: one aten::bmm where plain transformers, whose weights still ask for
    gradients, runs aten::mm). Copying the [1, 1, H] input costs microseconds."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or x.dim() < 3:
        return None
    shape, strides = x.shape, x.stride()
    if all(strides[i] == strides[i + 1] * shape[i + 1] for i in range(x.dim() - 2)):
        return None
    return (x.clone(memory_format=torch.contiguous_format),) + tuple(args[1:])


def _from_pretrained(location: str, dtype: torch.dtype, **kwargs) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(location, dtype=dtype, device_map="cpu", **kwargs)


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype a `--dtype` name asks for (`auto` is decided by planning/precision.py)."""
    if name not in DTYPES:
        raise VramancerError(f"'{name}' is not a dtype; choose auto, float32, float16 or bfloat16.")
    return DTYPES[name]


def split_refusal(model: torch.nn.Module) -> str | None:
    """None if VRAMancer can split `model` (real or on the meta device), else the one sentence
    that says why not, naming the architecture and what is supported."""
    from vramancer.model.architecture import UnsupportedArchitecture, describe

    try:
        describe(model)
    except UnsupportedArchitecture as exc:
        return str(exc)
    return None

def _read_weights(folder: Path, config, dtype: torch.dtype) -> torch.nn.Module:
    model, info = _from_pretrained(str(folder), dtype, config=config, output_loading_info=True)
    wrong = {kind: names for kind, names in info.items() if kind in ("missing_keys", "unexpected_keys", "mismatched_keys") and names}
    if wrong:
        raise ValueError(f"the weights do not fit the model: {wrong}")
    return model


def _write_weights(folder: Path, model: torch.nn.Module) -> None:
    """The state dict as safetensors, tied weights once (loading ties them again), and the
    generation config (transformers fails on a model folder without one)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for name, tensor in model.state_dict().items():
        identity = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
        if tensor.numel() and identity in seen:
            continue
        seen.add(identity)
        tensors[name] = tensor
    write_safetensors(folder / WEIGHTS_FILE, tensors)
    model.generation_config.save_pretrained(str(folder))
