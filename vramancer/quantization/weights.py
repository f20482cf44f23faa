"""Weights that stay quantized on their devices (`--weights`).

- `native`: the weights in the compute dtype, as transformers loads them.
- `q8`: every linear layer's weight as int8 with one float32 scale per output row (torchao's
  `Int8Tensor` storage, quantization/q8_rows.py), about 1 byte per weight.
- `q4`: every linear layer's weight as 4-bit values in blocks of 32 along the input with a
  float16 scale and minimum per block (GGUF's Q4_1 layout, quantization/q4_blocks.py), 0.625
  bytes per weight; a Q4_1 file's values are kept exactly. CPU and simulated devices only.
- `auto` (the default): a GGUF file keeps the width it was stored at (4-5 bits: q4, 6-8 bits:
  q8, 16-32 bits: native; q8 for 4-5 bits where GPUs are among the devices); any other model,
  and any model split with remote devices, loads native.

The embedding table and the output head are per-row int8 under both q8 and q4 (one tensor
when they are tied). GGUF files keep the head at 8 bits or more too (the bundled Q4_1 file
stores it as Q8_0), and at 4 bits the bundled model's answers visibly changed. A GGUF's Q8_0
tensors keep their own blocks of 32 with a float16 scale each (quantization/q8_blocks.py)
where our kernels run them, so the bundled table and head hold the file's values.

Which kernels run them (`kernel_path`, printed by `plan` and `bench`):
- on CPU and simulated devices, our own (kernels/cpu/build.py: AVX2 + FMA, float32
  activations, each weight block unpacked once per batch of up to 8 rows), so the compute
  dtype under quantized weights is float32 there. torch's and torchao's kernels ran at
  2-3 GB/s of weights here and want bfloat16 activations, whose elementwise ops are slow
  without AVX-512; ours keep up with memory (~4 GB/s on one thread of this machine). The
  model's linears and RMSNorms are rewired onto them (kernels/cpu/modules.py);
- where our kernels cannot run (no AVX2/FMA, no compiler, a GPU among the devices),
  torchao's: q8 through `torch._weight_int8pack_mm` on the CPU and torchao's path on GPUs,
  q4 as torchao's `Int4OpaqueTensor` (`_weight_int4pack_mm_for_cpu`), in bfloat16.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from vramancer.config.errors import VramancerError
from vramancer.config.validation import check_weights
from vramancer.platforms.heap import give_back_freed_memory

Q4_GROUP = 32  # weights per scale/zero pair: GGUF's Q4_0/Q4_1 block size

# GGUF `general.file_type` (llama.cpp's LLAMA_FTYPE) → the nearest width we run.
_GGUF_FILE_TYPES = {
    0: "native", 1: "native", 32: "native",  # F32, F16, BF16
    2: "q4", 3: "q4", 8: "q4", 9: "q4",  # Q4_0, Q4_1, Q5_0, Q5_1
    12: "q4", 13: "q4", 14: "q4", 15: "q4", 16: "q4", 17: "q4",  # Q3_K_*, Q4_K_*, Q5_K_*
    10: "q4", 11: "q4",  # Q2_K, Q3_K_S
    7: "q8", 18: "q8",  # Q8_0, Q6_K
}


def choose_weights(name: str, gguf_path: Path | None, device_kinds: set[str],
                   remote: bool = False) -> tuple[str, str]:
    """`native`, `q8` or `q4` for the --weights value, the model file and the devices, with
    the reason `plan` prints. `auto` (the default) keeps a GGUF file's width and any other
    checkpoint's dtype; `remote`: some devices are other machines' (they load unquantized)."""
    check_weights(name)
    cpu_only = device_kinds <= {"cpu", "sim"}
    if name != "auto":
        if name == "q4" and not cpu_only:
            raise VramancerError("--weights q4 packs weights for the CPU's int4 kernel, so it needs CPU or "
                                 "simulated devices only; use q8 with GPUs.")
        if name != "native" and remote:
            raise VramancerError(f"--weights {name} quantizes this machine's copy of the model; remote devices "
                                 "load theirs unquantized, so use --weights native with them.")
        return name, f"{name}: asked for (--weights {name})"
    if remote:
        return "native", "native: remote devices load their layers unquantized (--weights auto)"
    file_type = gguf_file_type(gguf_path) if gguf_path else None
    if file_type is None:
        what = "the GGUF file names no width" if gguf_path else "a safetensors checkpoint keeps its dtype"
        return "native", f"native: {what} (--weights auto)"
    stored = _file_type_name(file_type)
    width = _GGUF_FILE_TYPES.get(file_type, "native")
    if width == "q4" and not cpu_only:
        return "q8", (f"q8: the GGUF file stores {stored}; q4 runs on CPU and simulated devices only, so "
                      "the GPUs get the nearest width they run (--weights auto)")
    return width, f"{width}: the GGUF file stores {stored}, kept at that width (--weights auto)"


def _file_type_name(file_type: int) -> str:
    """llama.cpp's name of a GGUF `general.file_type` ("Q4_1", "Q4_K_M"), from the gguf package."""
    from gguf import LlamaFileType

    try:
        return LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"file type {file_type}"


def gguf_file_type(path: Path) -> int | None:
    """The `general.file_type` of a GGUF file, read from its metadata without parsing the
    tensors (gguf's reader took 11 s for the bundled file on a busy machine). None if absent."""
    fixed = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type → bytes
    with path.open("rb") as f:
        def read(fmt: str):
            size = struct.calcsize(fmt)
            data = f.read(size)
            if len(data) < size:
                raise EOFError
            return struct.unpack(fmt, data)

        def skip_string() -> None:
            (length,) = read("<Q")
            f.seek(length, 1)

        def skip_value(value_type: int) -> None:
            if value_type in fixed:
                f.seek(fixed[value_type], 1)
            elif value_type == 8:
                skip_string()
            elif value_type == 9:
                item, count = read("<IQ")
                if item in fixed:
                    f.seek(fixed[item] * count, 1)
                else:
                    for _ in range(count):
                        skip_value(item)
            else:
                raise ValueError(f"unknown GGUF value type {value_type}")

        try:
            magic, _version, _tensors, keys = read("<4sIQQ")
            if magic != b"GGUF":
                return None
            for _ in range(keys):
                (length,) = read("<Q")
                key = f.read(length)
                (value_type,) = read("<I")
                if key == b"general.file_type" and value_type in (4, 5):
                    return read("<I" if value_type == 4 else "<i")[0]
                skip_value(value_type)
        except (EOFError, ValueError, struct.error):
            return None
    return None


def our_kernels(dtype: torch.dtype) -> bool:
    """Whether quantized weights run on our CPU kernels (kernels/cpu/build.py): with float32
    activations, where they build and this CPU has AVX2/FMA. Otherwise torchao's run. The first
    call may compile the kernels (once per machine, two to three minutes)."""
    if dtype != torch.float32:
        return False
    from vramancer.kernels.cpu.build import kernels

    return kernels() is not None


def kernel_path(weights: str, dtype: torch.dtype) -> str:
    """One line for `plan` and `bench`: which kernels run the quantized weights, and why."""
    if weights == "native":
        return f"native {str(dtype).removeprefix('torch.')} weights: torch's own matmuls"
    if our_kernels(dtype):
        return f"{weights} weights: VRAMancer's AVX2 CPU kernels (float32 in and out, int16 dot products)"
    from vramancer.kernels.cpu.build import kernels, unavailable_reason

    # Ours are unavailable (and say why), or they are there but take float32 only.
    why = unavailable_reason() if kernels() is None else f"{str(dtype).removeprefix('torch.')} activations"
    return f"{weights} weights: torchao/torch kernels ({why})"


def keeps_q8_blocks(dtype: torch.dtype) -> bool:
    """Whether a GGUF's Q8_0 tensors that q8 takes stay in their own blocks of 32
    (quantization/q8_blocks.py: the file's values to the bit) rather than becoming per-row
    int8: where our kernels run them."""
    return our_kernels(dtype)


def quantizable(module: nn.Module, weights: str, head: nn.Module | None) -> bool:
    """The linear layers that `weights` quantizes: all but the output head (q4 needs whole
    groups along the input)."""
    if weights == "native" or not isinstance(module, nn.Linear) or module is head:
        return False
    return weights != "q4" or module.in_features % Q4_GROUP == 0


def quantized_weight_bytes(out_features: int, in_features: int, weights: str, dtype: torch.dtype) -> int:
    """Bytes stored for one quantized linear weight (checked against the real tensors by
    tests/unit/test_quantized.py): q8 keeps int8 values, a float32 scale and an int8 zero per row;
    q4 two values per byte and a (scale, minimum) pair per group: float16 in our kernels'
    layout, the compute dtype in torchao's."""
    if weights == "q8":
        return out_features * in_features + out_features * (4 + 1)
    if weights == "q4":
        groups = in_features // Q4_GROUP
        pair = 2 * 2 if our_kernels(dtype) else 2 * torch.empty((), dtype=dtype).element_size()
        return out_features * in_features // 2 + groups * out_features * pair
    raise ValueError(weights)


def weight_formats(model: nn.Module, weights: str) -> dict[str, str]:
    """What `weights` makes of each weight of `model` (a real or meta-device model), by its
    parameter name: "q8" (per-row int8) or "q4" (blocks); a name not listed stays in the
    compute dtype. The embedding table and the output head are q8 under both (the tied head
    is listed under the table's name only, as `named_parameters` lists it)."""
    if weights == "native":
        return {}
    table, head = model.get_input_embeddings(), model.get_output_embeddings()
    wide = {id(m.weight) for m in (table, head) if m is not None}
    formats = {}
    for name, param in model.named_parameters():
        if id(param) in wide:
            formats[name] = "q8"
    for module_name, module in model.named_modules():
        if quantizable(module, weights, head) and id(module.weight) not in wide:
            formats[f"{module_name}.weight" if module_name else "weight"] = weights
    return formats


def streams(weights: str, dtype: torch.dtype) -> bool:
    """Whether `weights` can be made one tensor at a time as a file is read (`convert_weight`):
    native and q8 always; q4 where our kernels' layout is used (torchao's int4 layout is made
    by its own whole-model pass)."""
    return weights != "q4" or our_kernels(dtype)


CHUNK_BYTES = 32 << 20  # float32 rows converted at a time (a 150k-token embedding table is 0.9 GB whole)


def convert_weight(read: Callable[[int, int], torch.Tensor], shape: tuple[int, ...], fmt: str,
                   dtype: torch.dtype) -> torch.Tensor:
    """One weight of `shape` as `fmt` ("native" for the compute dtype, "q8", "q4"), built from
    `read(first, end)`, which returns its rows first..end-1 as floats. Rows are read and
    converted a few tens of MB at a time, so a large table never exists whole in float32;
    each row's result does not depend on the chunking (q8 scales rows, q4 packs tiles of 4
    rows and chunks are whole tiles)."""
    rows = shape[0] if shape else 1
    row_bytes = 4 * math.prod(shape[1:]) if len(shape) > 1 else 4 * rows
    step = rows if len(shape) < 2 else max(TILE_ROWS, CHUNK_BYTES // max(row_bytes, 1) // TILE_ROWS * TILE_ROWS)
    spans = [(first, min(first + step, rows)) for first in range(0, rows, step)] or [(0, 0)]
    if fmt == "native":
        if len(spans) == 1:
            return read(0, rows).to(dtype).contiguous()
        out = torch.empty(shape, dtype=dtype)
        for first, end in spans:
            _between_chunks(first)
            out[first:end] = read(first, end)
        return out
    if fmt == "q8":
        from torchao.quantization import PerRow

        from vramancer.quantization.q8_rows import RowInt8Tensor

        # Rows rounded to the compute dtype first, as a model loaded in it holds them: the
        # scales and values are then those of quantizing that model (bfloat16 under torchao).
        if len(spans) == 1:
            return RowInt8Tensor.from_hp(read(0, rows).to(dtype), PerRow())
        qdata, scales, zeros = _Stitched(rows), [], []
        for first, end in spans:
            _between_chunks(first)
            part = RowInt8Tensor.from_hp(read(first, end).to(dtype), PerRow())
            qdata.add(part.qdata, end - first)
            scales.append(part.scale)
            zeros.append(part.zero_point)
            block_size = list(part.block_size)
            del part
        return RowInt8Tensor(qdata.whole(), torch.cat(scales), block_size, dtype, zero_point=torch.cat(zeros))
    if fmt == "q4":
        from vramancer.quantization.q4_blocks import BlockInt4Tensor

        qdata = _Stitched(rows)
        for first, end in spans:
            _between_chunks(first)
            qdata.add(BlockInt4Tensor.from_float(read(first, end)).qdata, end - first)
        return BlockInt4Tensor(qdata.whole(), torch.Size(shape), dtype)
    raise ValueError(fmt)


def _between_chunks(first: int) -> None:
    """Before each chunk but the first, the last one's float rows and temporaries go back to
    the system (platforms/heap.py); the load does the same after each whole tensor."""
    if first:
        give_back_freed_memory()


class _Stitched:
    """A quantized weight's values, put together chunk by chunk into one tensor allocated at
    the first chunk. Gathering the chunks and concatenating them at the end held the weight
    twice, and kept the float temporaries' holes between the chunk results."""

    def __init__(self, rows: int):
        self.rows, self.done, self.filled, self.out = rows, 0, 0, None

    def add(self, part: torch.Tensor, part_rows: int) -> None:
        if self.out is None:  # the stored rows per weight row (q4: a tile of 4 rows is one stored row)
            self.out = torch.empty((part.shape[0] * self.rows // part_rows, *part.shape[1:]), dtype=part.dtype)
        self.out[self.filled:self.filled + part.shape[0]] = part
        self.filled += part.shape[0]
        self.done += part_rows

    def whole(self) -> torch.Tensor:
        if self.out is None or self.done != self.rows or self.filled != self.out.shape[0]:
            raise ValueError(f"the chunks filled {self.filled} of {0 if self.out is None else self.out.shape[0]} rows")
        return self.out


TILE_ROWS = 4  # q4's tile height (quantization/q4_blocks.py): chunks are whole tiles


def quantize_model(model: nn.Module, weights: str) -> None:
    """Quantize `model`'s weights in place (it is on the CPU, in its compute dtype): the
    embedding table and the output head as per-row int8 (one tensor when tied), the decoder's
    linear layers as `weights` says, in our kernels' layout under float32 activations (where
    they run), else in torchao's."""
    if weights == "native":
        return
    if streams(weights, model.dtype):
        table, head = model.get_input_embeddings(), model.get_output_embeddings()
        tied = table is not None and head is not None and head.weight is table.weight
        for name, fmt in weight_formats(model, weights).items():
            owner, leaf = _owner(model, name)
            weight = getattr(owner, leaf)
            setattr(owner, leaf, nn.Parameter(
                convert_weight(lambda a, b, w=weight: w[a:b], tuple(weight.shape), fmt, model.dtype),
                requires_grad=False))
        if tied:
            head.weight = table.weight
        finish_quantized(model, weights)
        return
    from vramancer.quantization.q8_rows import quantize_rows

    table, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = table is not None and head is not None and head.weight is table.weight
    if table is not None:
        table.weight = quantize_rows(table.weight)
    if head is not None:
        head.weight = table.weight if tied else quantize_rows(head.weight)
    from torchao.prototype.quantization.int4.inference_workflow import (
        PrototypeInt4WeightOnlyConfig,
    )
    from torchao.quantization import quantize_

    config = PrototypeInt4WeightOnlyConfig(group_size=Q4_GROUP, set_inductor_config=False)
    quantize_(model, config, filter_fn=lambda module, _name: quantizable(module, weights, head))


def finish_quantized(model: nn.Module, weights: str) -> None:
    """Once every weight holds its format: where our kernels run them, the modules are rewired
    onto them and the decoder layers fused (kernels/cpu/)."""
    if weights != "native" and our_kernels(model.dtype):
        from vramancer.kernels.cpu.fused_layer import fuse_decoder_layers
        from vramancer.kernels.cpu.modules import rewire

        rewire(model)
        fuse_decoder_layers(model)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (model.get_submodule(path) if path else model), leaf


def stored_bytes(tensor: torch.Tensor) -> int:
    """The bytes a tensor really holds: for a quantized (wrapper subclass) tensor, the sum of
    the plain tensors inside it, not its logical shape times its logical dtype."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(inner) for name in names if (inner := getattr(tensor, name)) is not None)
    return tensor.numel() * tensor.element_size()
