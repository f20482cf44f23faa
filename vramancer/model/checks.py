"""A model's files checked before anything trusts them: each problem is one sentence.

transformers and the file parsers meet a damaged model late and loudly: a ZeroDivisionError for
`num_attention_heads: 0`, a RecursionError for a deeply nested config.json, minutes of work for a
config claiming millions of layers, a SafetensorError for a cut file, "You set
ignore_mismatched_sizes" for weights of the wrong shape. These checks read only the config and
the headers: no weight is loaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from vramancer.config.errors import VramancerError
from vramancer.config.files import read_regular

MAX_CONFIG_BYTES = 16 << 20  # config.json of the largest hub models is a few kB
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on its JSON header
MAX_LAYERS = 1024  # the deepest released models have ~200 layers
# Sizes past these describe no model that could be loaded (and some make the meta model hang).
LIMITS = {
    "hidden_size": 1 << 17, "num_hidden_layers": MAX_LAYERS, "num_attention_heads": 1 << 12,
    "num_key_value_heads": 1 << 12, "intermediate_size": 1 << 20, "vocab_size": 1 << 24,
    "max_position_embeddings": 1 << 24, "head_dim": 1 << 12,
}
# The files transformers can load weights from, besides safetensors (which we read ourselves).
OTHER_WEIGHTS = ("pytorch_model*.bin", "tf_model.h5", "flax_model.msgpack", "*.gguf")


class ModelFileError(VramancerError):
    """A model's config or weights are missing, damaged or inconsistent."""


def read_config_json(path: Path, name: str) -> dict:
    """The JSON object in a model folder's config.json, its sizes checked."""
    data = read_regular(path, f"the config.json of model {name}", MAX_CONFIG_BYTES)
    if len(data) > MAX_CONFIG_BYTES:
        raise ModelFileError(f"model {name} cannot be read: its config.json is larger than {MAX_CONFIG_BYTES >> 20} MiB.")
    try:
        values = json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested thousands deep
        why = "nested too deeply" if isinstance(exc, RecursionError) else "not valid JSON"
        raise ModelFileError(f"model {name} cannot be read: its config.json is {why}.") from None
    if not isinstance(values, dict):
        raise ModelFileError(f"model {name} cannot be read: its config.json holds a {type(values).__name__}, "
                             "not an object of settings.")
    check_config_values(values, name)
    return values


def check_config_values(values: dict, name: str) -> None:
    """The sizes a config states (and those of a nested text_config): whole numbers, positive,
    within `LIMITS`, and heads that divide as attention needs."""
    for part, where in ((values, "config.json"), (values.get("text_config"), "config.json's text_config")):
        if not isinstance(part, dict):
            continue
        sizes = {}
        for key, most in LIMITS.items():
            value = part.get(key)
            if value is None:
                continue
            # Some models give a size per layer (Gemma 3n's intermediate_size): each is checked.
            for item in value if isinstance(value, list) and value else [value]:
                if isinstance(item, bool) or not isinstance(item, int):
                    shown = repr(item)[:40]
                    raise ModelFileError(f"model {name}: {key} in its {where} must be a whole number, not {shown}.")
                if not 1 <= item <= most:
                    raise ModelFileError(f"model {name}: {key} in its {where} must be between 1 and {most}, not {item}.")
            if isinstance(value, int):
                sizes[key] = value
        heads, kv_heads = sizes.get("num_attention_heads"), sizes.get("num_key_value_heads")
        hidden = sizes.get("hidden_size")
        if heads and hidden and "head_dim" not in sizes and hidden % heads:
            raise ModelFileError(f"model {name}: hidden_size {hidden} in its {where} is not divisible by "
                                 f"num_attention_heads {heads}.")
        if heads and kv_heads and heads % kv_heads:
            raise ModelFileError(f"model {name}: num_attention_heads {heads} in its {where} is not divisible by "
                                 f"num_key_value_heads {kv_heads}.")


def check_context(config, context: int, name: str) -> None:
    """A context longer than the positions the model knows: learned position tables end there
    (an index error mid-answer), rotary ones answer past it with nothing learned."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    positions = getattr(text, "max_position_embeddings", None)
    if isinstance(positions, int) and not isinstance(positions, bool) and 0 < positions < context:
        raise ModelFileError(f"--context {context} is longer than model {name} knows positions for "
                             f"(max_position_embeddings {positions}); give --context {positions} or less.")


DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def read_safetensors_header(path: Path) -> tuple[int, dict]:
    """(where the data starts, the header's tensors and metadata) of a safetensors file, each
    tensor's dtype, shape and byte range checked against the file's size."""
    what = f"the weights file {path}"
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length < 2 or length > min(MAX_HEADER_BYTES, size - 8):
                raise ModelFileError(f"{what} is cut short or not a safetensors file (its header claims "
                                     f"{max(length, 0)} bytes of {size}).")
            text = f.read(length)
    except OSError as exc:
        raise ModelFileError(f"{what} cannot be read: {exc.strerror or exc}.") from None
    try:
        header = json.loads(text)
    except (ValueError, RecursionError):
        raise ModelFileError(f"{what} is damaged: its header is not valid JSON.") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{what} is damaged: its header is not an object.")
    data_bytes = size - 8 - length
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in (*shape, begin, end)):
                raise TypeError
            expected = math.prod(shape) * DTYPE_BYTES[dtype]
        except (TypeError, KeyError, ValueError):
            raise ModelFileError(f"{what} is damaged: the entry of tensor {key[:80]} is malformed.") from None
        if end - begin != expected or end > data_bytes:
            raise ModelFileError(f"{what} is cut short or damaged: tensor {key[:80]} lies at bytes {begin}-{end} "
                                 f"of {data_bytes}, for {expected} bytes of data.")
    return 8 + length, header


def weight_shapes(name: str, folder: Path, files: list[Path]) -> dict[str, tuple[int, ...]] | None:
    """Every tensor's shape in a model folder's safetensors `files`, from their headers (each
    checked against its file), or None where there are none but transformers may read another
    format. A folder with no weights at all is refused."""
    if not files:
        if not any(any(folder.glob(pattern)) for pattern in OTHER_WEIGHTS):
            raise ModelFileError(f"model {name} has no weights (no model.safetensors or pytorch_model.bin in "
                                 "its folder); `plan` works from the config alone, loading needs the weights.")
        return None
    shapes = {}
    for path in files:
        shapes.update({key: tuple(entry["shape"]) for key, entry in read_safetensors_header(path)[1].items()
                       if key != "__metadata__"})
    return shapes


def check_shapes(name: str, stored: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> None:
    """Refuse weights stored under one of the model's names with another shape than its config gives."""
    wrong = [key for key, shape in expected.items() if key in stored and stored[key] != shape]
    if wrong:
        key = wrong[0]
        raise ModelFileError(f"model {name}'s weights do not match its config.json: {key} is "
                             f"{list(stored[key])} in the file where the config makes it {list(expected[key])}"
                             f"{f' ({len(wrong)} tensors differ)' if len(wrong) > 1 else ''}.")


def check_gguf_table(reader, path: Path) -> None:
    """Each tensor of a parsed GGUF (`gguf.GGUFReader`) inside the file: a damaged offset or
    count would otherwise be read as zeros or garbage ("invalid value encountered") and the
    model would answer nonsense."""
    size = path.stat().st_size
    if not reader.tensors:
        raise ModelFileError(f"model file {path.name} holds no tensors; it is damaged.")
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if tensor.data_offset < 0 or tensor.n_bytes <= 0 or end > size or tensor.data.nbytes != tensor.n_bytes:
            raise ModelFileError(f"model file {path.name} is cut short or damaged: tensor {tensor.name} lies at bytes "
                                 f"{tensor.data_offset}-{end} of {size}.")
