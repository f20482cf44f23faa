"""Reading a model's weights into host memory, in the compute dtype or quantized, and the
module tree built on the meta device for sizing before any weight is read."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from vramancer.config.errors import VramancerError
from vramancer.kernels.cpu.few_rows import (
    use_few_rows_linear,
    use_few_rows_norm,
)
from vramancer.model.checkpoint import (
    Q4_KINDS,
    Q8_KINDS,
    GgufTensors,
    SafetensorsFile,
    StoredTensor,
    safetensors_files,
    safetensors_names,
    safetensors_tensors,
)
from vramancer.model.checks import ModelFileError, check_shapes, weight_shapes
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
from vramancer.platforms.heap import give_back_freed_memory

# transformers imports torchao (our --weights kernels) whenever it builds a model; torchao then
# warns on stderr about CUDA-only libraries a CPU build cannot load, and torch about enum
# registrations: noise about nothing we use, in front of our one-sentence errors.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

log = logging.getLogger(__name__)
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
    """Read the weights into host memory, each in the form it will run in; the runtime then
    sends each part to its device.

    The model is built on the meta device and its weights are read from the memory-mapped
    file one tensor at a time, each converted to the compute dtype or quantized (see
    quantization/weights.py) before the next is read: host memory holds the model as it will
    run plus one tensor in flight, never the whole model in float32. A GGUF's Q4_0/Q4_1
    blocks become q4 weights as they are, its Q8_0 blocks q8 blocks (where our kernels run).
    What a GGUF gave is kept in the weights cache as it runs (quantized under q8 and q4), and
    read from there the next time.

    A hub id streams from its safetensors in the Hugging Face cache (fetched there first if
    need be), and tensors that transformers renames on load are renamed name by name. A
    checkpoint whose tensors transformers merges or splits on load (a `WeightConverter`), one
    without safetensors, and q4 in torchao's layout load the whole model through
    transformers and quantize it after, as before."""
    from vramancer.quantization.weights import keeps_q8_blocks, quantize_model, streams

    kind = weights if streams(weights, dtype) else "native"  # what the stream (and the cache) holds
    entry = gguf_cache_entry(source.gguf_path)
    if entry is not None:
        config = load_config(source)  # from the cache: no third parse of the GGUF
        piece = f"weights-{str(dtype).removeprefix('torch.')}-{kind}"
        if kind != "native" and keeps_q8_blocks(dtype):
            piece += "-q8_0-kept"  # not a piece written before Q8_0 blocks were kept (they held q8 rows)
        model = from_cache(entry, piece, lambda folder: _read_cached(folder, config, dtype, kind))
        if model is None:
            with gguf_parsed_once():
                model = _stream_gguf(source, config, dtype, kind)
            store(entry, piece, lambda folder: _write_cached(folder, model, kind))
        let_go_of_gguf_reader()  # whichever way the weights came, the config's parse is done with
    else:
        files = checkpoint_files(source)
        model = _stream_safetensors(files, load_config(source), dtype, kind) if files else None
        if model is None:
            model = _from_pretrained(source.location, dtype, **source.pretrained_kwargs())
            kind = "native"
    model.eval()
    model.requires_grad_(False)
    if weights != kind:
        quantize_model(model, weights)
    elif weights != "native":
        from vramancer.quantization.weights import finish_quantized

        finish_quantized(model, weights)
    elif dtype == torch.float32:  # a decode step of a few sequences reads each weight once on the CPU (few_rows.py)
        # Our kernels take float32 only: a bfloat16/float16 model (the GPUs' dtype) has no use
        # for them, and must not wait minutes for their first build.
        use_few_rows_linear(model)
        use_few_rows_norm(model)
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_matmul_foldable_input)
    return model


def check_weights(source: ModelSource, config, dtype: torch.dtype) -> None:
    """Before any weight is read (model/checks.py): a local model folder has weights, and its
    safetensors hold, under each of the model's names they use, the shape its config gives."""
    if source.gguf_file is not None or source.is_hub_id:
        return  # a GGUF's table is checked as it is parsed (checks.check_gguf_table)
    folder = Path(source.location)
    try:
        files = safetensors_files(folder)
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        raise ModelFileError(f"model {source.name} cannot be read: its {folder.name}/model.safetensors.index.json "
                             "is damaged.") from None
    stored = weight_shapes(source.name, folder, files)
    if stored is not None:
        check_shapes(source.name, stored, _slots(build_meta_model(config, dtype)))


def _empty_model(config, dtype: torch.dtype) -> torch.nn.Module:
    """The model with its parameters on the meta device; buffers (rotary tables) are real,
    computed from the config as transformers would."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # from_pretrained ties once loaded; the slots to fill must know it first
    return model


def _slots(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """What a checkpoint must fill: each parameter once (a tied head is the table) and each
    buffer that is part of the state dict, with its shape."""
    saved = set(model.state_dict())
    slots = {name: tuple(p.shape) for name, p in model.named_parameters()}
    slots.update({name: tuple(b.shape) for name, b in model.named_buffers() if name in saved})
    return slots


def _fits(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]], what: str, quiet: bool = False) -> bool:
    """Whether the file's tensors fill the model's slots one for one (extra names may be the
    tied head or buffers the model computes itself). Logs why not."""
    slots = _slots(model)
    known = set(model.state_dict()) | {name for name, _ in model.named_buffers()}
    missing = [name for name in slots if name not in shapes]
    wrong = [name for name in slots if name in shapes and shapes[name] != slots[name]]
    extra = [name for name in shapes if name not in known]
    if missing or wrong or extra:
        if quiet:
            return False
        log.info("%s does not match the model's tensors one for one (missing %s, other shapes %s, unknown %s); "
                 "loading it whole through transformers", what, missing[:3], wrong[:3], extra[:3])
        return False
    return True


def _fill(model: torch.nn.Module, stored, dtype: torch.dtype, formats: dict[str, str]) -> None:
    """Put each stored tensor in its slot, converted to its format, one at a time."""
    from vramancer.quantization.q4_blocks import BlockInt4Tensor
    from vramancer.quantization.q8_blocks import BlockInt8Tensor
    from vramancer.quantization.weights import convert_weight

    slots = _slots(model)
    tied = _tied(model)
    for item in stored:
        if item.name not in slots:
            continue  # the tied head's copy, or a buffer the model computed itself
        fmt = formats.get(item.name, "native")
        # A file's blocks are kept only in their own width: under q8 a Q4_1 tensor is read as
        # values and quantized again, its blocks are not Q8_0's.
        if fmt == "q4" and item.blocks is not None and item.kind in Q4_KINDS:
            value = BlockInt4Tensor.from_gguf_blocks(item.blocks(), item.kind, item.shape, dtype)
        elif fmt == "q8" and item.blocks is not None and item.kind in Q8_KINDS:
            value = BlockInt8Tensor.from_gguf_blocks(item.blocks(), item.shape, dtype)
        else:
            value = convert_weight(item.rows, item.shape, fmt, dtype)
        _set_tensor(model, item.name, value)
        del value
        give_back_freed_memory()
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    _check_filled(model)


def _tied(model: torch.nn.Module) -> bool:
    table, head = model.get_input_embeddings(), model.get_output_embeddings()
    return table is not None and head is not None and head.weight is table.weight


def _set_tensor(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """accelerate's `set_module_tensor_to_device`, for our quantized tensors too: a new
    parameter (or buffer) in the slot, holding `value` itself, no copy and no cast."""
    path, _, leaf = name.rpartition(".")
    owner = model.get_submodule(path) if path else model
    if leaf in owner._parameters:
        owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def _check_filled(model: torch.nn.Module) -> None:
    left = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise ValueError(f"the file left {len(left)} weights unread, {left[0]} first")


def _stream_safetensors(files: list[Path], config, dtype: torch.dtype, weights: str) -> torch.nn.Module | None:
    """A model folder's safetensors, streamed; None if its names are not the model's."""
    from vramancer.quantization.weights import weight_formats

    model = _empty_model(config, dtype)
    tensors = renamed_safetensors(model, files)
    if tensors is None:
        return None
    _fill(model, tensors, dtype, weight_formats(model, weights))
    _read_generation_config(model, files[0].parent)
    return model


def checkpoint_files(source: ModelSource) -> list[Path]:
    """The safetensors of a model folder, or of a hub model as transformers keeps them in the
    Hugging Face cache (fetched there first if need be, as `from_pretrained` would fetch
    them); [] where there are none to stream, and the whole-model load then says why."""
    if source.gguf_file is not None:
        return []
    if not source.is_hub_id:
        return safetensors_files(Path(source.location))
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    from vramancer.model.source import hub_reachable

    wanted = ["*.safetensors", "model.safetensors.index.json", "generation_config.json"]
    for local_only in (True, False):
        if not local_only and not hub_reachable():
            break
        try:
            folder = Path(snapshot_download(source.location, allow_patterns=wanted, local_files_only=local_only))
            files = safetensors_files(folder)
        except (OSError, ValueError, KeyError, HfHubHTTPError):
            continue  # not in the cache (or not fetched): the next way, or transformers' own
        if files and all(f.is_file() for f in files):
            return files
    return []


def renamed_safetensors(model: torch.nn.Module, files: list[Path]) -> list[StoredTensor] | None:
    """The files' tensors under the model's names: their own, or as transformers renames them
    on load (its per-model conversion mapping, old `gamma`/`beta` names, a checkpoint of the
    base model without its prefix), applied name by name. None where they still do not fill
    the model one for one, or where transformers would merge or split tensors (a
    `WeightConverter`, such as stacking a mixture's experts): its whole-model load does that."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    shapes = safetensors_names(files)
    where = f"{files[0].parent}"
    if _fits(model, shapes, where, quiet=True):
        return list(safetensors_tensors(files))
    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    meta = model.state_dict()
    names = {}
    for name in shapes:
        renamed, merged = rename_source_key(name, renamings, converters, model.base_model_prefix, meta)
        if merged is not None:
            log.info("%s holds %s, which transformers merges with other tensors on load; loading it whole", where, name)
            return None
        names[name] = renamed
    if len(set(names.values())) != len(names) or not _fits(model, {names[n]: shape for n, shape in shapes.items()},
                                                           where):
        return None
    return [dataclasses.replace(item, name=names[item.name]) for item in safetensors_tensors(files)]


def _stream_gguf(source: ModelSource, config, dtype: torch.dtype, weights: str) -> torch.nn.Module:
    """A GGUF's tensors, streamed (Q4_0/Q4_1 blocks kept under q4); transformers' whole-file
    load if its names are not the model's."""
    from vramancer.quantization.weights import weight_formats

    model = _empty_model(config, dtype)
    tensors = GgufTensors(source.gguf_path, model, config)
    if not _fits(model, tensors.shapes(), source.name):
        model = _from_pretrained(source.location, dtype, config=config, **source.pretrained_kwargs())
        if weights != "native":
            from vramancer.quantization.weights import quantize_model

            quantize_model(model, weights)
        return model
    from vramancer.quantization.weights import keeps_q8_blocks

    formats = weight_formats(model, weights)
    kept = {"q4", "q8"} if keeps_q8_blocks(dtype) else {"q4"}
    _fill(model, tensors.tensors(lambda name: formats.get(name) in kept), dtype, formats)
    return model


def _read_generation_config(model: torch.nn.Module, folder: Path) -> None:
    from transformers import GenerationConfig

    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))


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


# --- the weights cache's piece: the model as it runs --------------------------------------
#
# One safetensors file: plain tensors under their names; a quantized weight as the plain
# tensors inside it, under `<name>#<part>` (q8: qdata, scale, zero_point; q4: qdata), with
# each weight's format in the file's metadata.

FORMATS_KEY = "vramancer.formats"


def _write_cached(folder: Path, model: torch.nn.Module, weights: str) -> None:
    """The weights as they run, each tensor once, and the generation config."""
    from vramancer.quantization.q4_blocks import BlockInt4Tensor
    from vramancer.quantization.q8_blocks import BlockInt8Tensor
    from vramancer.quantization.q8_rows import RowInt8Tensor

    tensors: dict[str, torch.Tensor] = {}
    formats: dict[str, str] = {}
    state = dict(model.named_parameters())
    state.update({name: b for name, b in model.named_buffers() if name in _slots(model)})
    for name, tensor in state.items():
        if isinstance(tensor, torch.nn.Parameter):
            tensor = tensor.data
        if isinstance(tensor, BlockInt4Tensor):
            formats[name] = "q4"
            tensors[f"{name}#qdata"] = tensor.qdata
        elif isinstance(tensor, BlockInt8Tensor):
            formats[name] = "q8 blocks"
            tensors[f"{name}#qdata"], tensors[f"{name}#scale"] = tensor.qdata, tensor.scale
        elif isinstance(tensor, RowInt8Tensor):
            formats[name] = "q8"
            for part in ("qdata", "scale", "zero_point"):
                tensors[f"{name}#{part}"] = getattr(tensor, part)
        else:
            tensors[name] = tensor
    write_safetensors(folder / WEIGHTS_FILE, tensors, {FORMATS_KEY: json.dumps(formats)})
    model.generation_config.save_pretrained(str(folder))


def _read_cached(folder: Path, config, dtype: torch.dtype, weights: str) -> torch.nn.Module:
    """The model from a cached piece, one tensor at a time; any mismatch raises (the piece is
    then rebuilt from the GGUF)."""
    from vramancer.quantization.q4_blocks import BlockInt4Tensor
    from vramancer.quantization.q8_blocks import BlockInt8Tensor
    from vramancer.quantization.q8_rows import RowInt8Tensor

    model = _empty_model(config, dtype)
    slots, tied = _slots(model), _tied(model)
    f = SafetensorsFile(folder / WEIGHTS_FILE)
    formats = json.loads(f.metadata.get(FORMATS_KEY, "{}"))
    for name, shape in slots.items():  # one tensor at a time, each read into memory of its own
        fmt = formats.get(name, "native")
        if fmt == "q4":
            value = BlockInt4Tensor(f.tensor(f"{name}#qdata"), torch.Size(shape), dtype)
        elif fmt == "q8 blocks":
            value = BlockInt8Tensor(f.tensor(f"{name}#qdata"), f.tensor(f"{name}#scale"), torch.Size(shape), dtype)
        elif fmt == "q8":
            qdata, scale, zero = (f.tensor(f"{name}#{part}") for part in ("qdata", "scale", "zero_point"))
            value = RowInt8Tensor(qdata, scale, [1, shape[1]], dtype, zero_point=zero)
        else:
            value = f.tensor(name)
            if value.dtype != dtype and value.is_floating_point() and name not in dict(model.named_buffers()):
                raise ValueError(f"{name} is cached as {value.dtype}, not {dtype}")
        if tuple(value.shape) != shape:
            raise ValueError(f"{name} is cached with shape {tuple(value.shape)}, not {shape}")
        _set_tensor(model, name, value)
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    _check_filled(model)
    _read_generation_config(model, folder)
    return model


# --- reading a model part by part (a node's layers) -----------------------------------------


class PartReader:
    """A model whose weights are read from its file part by part, when they are asked for:
    a node reads the layers it holds (and the small modules before the stack), never the rest.

    Where the file's tensors are not the model's one for one even once renamed as transformers
    renames them (tensors it merges on load, no safetensors), the whole model is read at once instead, as
    `load_weights` reads it, and `read` and `forget` have nothing to do."""

    def __init__(self, source: ModelSource, dtype: torch.dtype):
        self.dtype = dtype
        config = load_config(source)
        self._stored: dict | None = None
        model = _empty_model(config, dtype)
        if source.gguf_path is not None:
            tensors = GgufTensors(source.gguf_path, model, config)
            if _fits(model, tensors.shapes(), source.name):
                self._stored = {item.name: item for item in tensors.tensors(lambda name: False)}
        elif files := checkpoint_files(source):
            tensors = renamed_safetensors(model, files)
            if tensors is not None:
                self._stored = {item.name: item for item in tensors}
                _read_generation_config(model, files[0].parent)
        if self._stored is None:
            model = load_weights(source, dtype)
        self.model = model.eval().requires_grad_(False)
        self._names = {id(module): name for name, module in self.model.named_modules()}

    @property
    def streams(self) -> bool:
        """True when parts are read one by one (False: the whole model was read at once)."""
        return self._stored is not None

    def read(self, modules: list[torch.nn.Module], holders: list[torch.nn.Module] = ()) -> None:
        """Fill every tensor of `modules` (and those `holders` keep themselves, not their
        children's) that the file holds and they do not hold yet."""
        if self._stored is None:
            return
        for owner, name, tensor in self._tensors(modules, holders):
            item = self._stored.get(self._full_name(owner, name))
            if item is None or not (tensor.is_meta or name in owner._buffers):
                continue
            value = convert_weight_rows(item, self.dtype)
            if name in owner._parameters:
                owner._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
            else:
                owner._buffers[name] = value.to(tensor.dtype)

    def forget(self, modules: list[torch.nn.Module]) -> None:
        """Let go of the weights of `modules` (back on the meta device) when they can be read again."""
        if self._stored is None:
            return
        for owner, name, tensor in self._tensors(modules):
            if name in owner._parameters and not tensor.is_meta:
                owner._parameters[name] = torch.nn.Parameter(torch.empty_like(tensor, device="meta"),
                                                             requires_grad=False)
        give_back_freed_memory()

    def _tensors(self, modules, holders=()):
        from vramancer.model.architecture import part_tensors

        return list(part_tensors(modules, holders))

    def _full_name(self, owner: torch.nn.Module, name: str) -> str:
        prefix = self._names[id(owner)]
        return f"{prefix}.{name}" if prefix else name


def convert_weight_rows(item, dtype: torch.dtype) -> torch.Tensor:
    """One stored tensor in the compute dtype, read a few rows at a time."""
    from vramancer.quantization.weights import convert_weight

    return convert_weight(item.rows, item.shape, "native", dtype)
def tensor_formats(source: ModelSource, config, dtype: torch.dtype, weights: str) -> dict[str, int]:
    """What the load makes of each weight, grouped as "<as stored> → <as it runs>" with how many
    tensors take that way, read from the file's header and the model's shapes only (`plan
    --json`): a GGUF's Q4_0/Q4_1 tensors under q4 keep their blocks; every other quantized
    tensor is read as floats and quantized (per-row int8 for q8 and for the embeddings and
    head, blocks of 32 for q4)."""
    from collections import Counter

    from vramancer.model.checkpoint import Q4_KINDS, Q8_KINDS, SafetensorsFile, gguf_tensor_kinds
    from vramancer.quantization.weights import keeps_q8_blocks, streams, weight_formats

    model = _empty_model(config, dtype)
    streamed = streams(weights, dtype)
    formats = weight_formats(model, weights)
    dtype_name = str(dtype).removeprefix("torch.")
    ends = {"q8": "q8 (int8 rows)", "q4": "q4 (blocks of 32)" if streamed else "q4 (torchao's int4, groups of 32)"}
    stored: dict[str, str] = {}
    row_wise = True
    if source.gguf_path is not None:
        import transformers.modeling_gguf_pytorch_utils as hf_gguf

        kinds = gguf_tensor_kinds(source.gguf_path)
        processor_class = hf_gguf.TENSOR_PROCESSORS.get(config.model_type, hf_gguf.TensorProcessor)
        row_wise = processor_class in (hf_gguf.TensorProcessor, hf_gguf.LlamaTensorProcessor)
        with gguf_parsed_once():  # transformers' walk would build gguf's name map per module
            names = hf_gguf.get_gguf_hf_weights_map(model, processor_class(config=config.to_dict()))
        stored = {names[name]: value for name, value in kinds.items() if name in names}
    elif not source.is_hub_id:
        for path in safetensors_files(Path(source.location)):
            stored.update({name: entry["dtype"] for name, entry in SafetensorsFile(path).entries.items()})
    groups: Counter = Counter()
    for name, param in model.named_parameters():
        was = stored.get(name, "no weights file" if not stored else "not in the file")
        fmt = formats.get(name, "native")
        if fmt == "q4" and was in Q4_KINDS and row_wise and streamed and param.dim() == 2:
            becomes = "q4 (the file's blocks, kept)"
        elif fmt == "q8" and was in Q8_KINDS and row_wise and keeps_q8_blocks(dtype) and param.dim() == 2:
            becomes = "q8 (the file's blocks, kept)"
        else:
            becomes = ends.get(fmt, dtype_name)
            if fmt != "native" and source.gguf_path is not None and was not in ("F32", "F16", "BF16", "F64"):
                becomes = becomes[:-1] + ", requantized)"  # dequantized a tensor at a time, then quantized
        groups[f"{was} → {becomes}"] += 1
    return dict(sorted(groups.items()))
