"""A model file read one tensor (or a few of its rows) at a time.

The streaming load (model/loading.py) asks for each weight in turn, converts it and lets go,
so no more than one tensor's float copy is ever held. The bytes are read with plain reads
at offsets taken from the file's header (safetensors' JSON header, gguf's `GGUFReader`
table), not through a memory mapping: a mapping's pages count in the process's resident
memory until it is closed, and reading a 1.5B model through safetensors' `safe_open` held
1.1 GB of file pages beside the weights at the peak.

A GGUF's tensors carry llama.cpp's names and, for Llama-family models, query and key rows
in llama.cpp's order: both are undone with transformers' own name map and tensor
processors (`transformers.modeling_gguf_pytorch_utils`), as its loader does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from vramancer.config.files import read_regular
from vramancer.model.checks import check_gguf_table, read_safetensors_header
from vramancer.model.weights_cache import gguf_parsed_once

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"
MAX_INDEX_BYTES = 64 << 20  # the index of a model of thousands of shards is a few MB
# GGUF block types whose bytes our q4 format takes as they are (quantization/q4_blocks.py).
Q4_KINDS = ("Q4_0", "Q4_1")
# ... and those our q8 blocks take as they are (quantization/q8_blocks.py).
Q8_KINDS = ("Q8_0",)


@dataclass
class StoredTensor:
    """One tensor of the file under the model's parameter name."""

    name: str
    shape: tuple[int, ...]
    kind: str  # the file's type for it: "BF16", "F32", "Q4_1", ...
    rows: Callable[[int, int], torch.Tensor]  # rows first..end-1, as floats
    blocks: Callable[[], torch.Tensor] | None = None  # the raw q4/q8 bytes [N, K/32 * block bytes], where kept


def safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint files of a model folder: one file, or the shards its index lists."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        text = read_regular(index, "the safetensors index", MAX_INDEX_BYTES)  # a FIFO is refused, not waited on
        shards = sorted(set(json.loads(text)["weight_map"].values()))
        return [folder / shard for shard in shards]
    single = folder / SAFETENSORS_FILE
    return [single] if single.is_file() else []


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class SafetensorsFile:
    """One safetensors file: its header read once, its tensors read by plain reads."""

    def __init__(self, path: Path):
        self.path = path
        self.start, header = read_safetensors_header(path)  # every byte range checked against the file
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.entries: dict = dict(sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def tensor(self, name: str) -> torch.Tensor:
        shape = self.shape(name)
        return self.rows(name)(0, shape[0] if shape else 1).reshape(shape)

    def rows(self, name: str) -> Callable[[int, int], torch.Tensor]:
        entry = self.entries[name]
        dtype, shape = SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        count = shape[0] if shape else 1
        row_bytes = (end - begin) // max(count, 1)

        def read(first: int, last: int) -> torch.Tensor:
            raw = read_bytes(self.path, self.start + begin + first * row_bytes, (last - first) * row_bytes)
            return raw.view(dtype).reshape(last - first, *shape[1:])

        return read


def read_bytes(path: Path, offset: int, nbytes: int) -> torch.Tensor:
    """`nbytes` of the file at `offset`, into memory of our own (uint8)."""
    out = torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(out.numpy())
    with path.open("rb", buffering=0) as f:
        f.seek(offset)
        done = 0
        while done < nbytes:
            got = f.readinto(view[done:])
            if not got:
                raise EOFError(f"{path} ends inside a tensor")
            done += got
    return out


def safetensors_names(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape, read from the headers only."""
    return {name: st.shape(name) for st in map(SafetensorsFile, files) for name in st.entries}


def safetensors_tensors(files: list[Path]) -> Iterator[StoredTensor]:
    """Each tensor of the files, in file order."""
    for path in files:
        st = SafetensorsFile(path)
        for name, entry in st.entries.items():
            yield StoredTensor(name, st.shape(name), entry["dtype"], st.rows(name))


class GgufTensors:
    """A GGUF file's tensors under the model's names, for a model built from its config."""

    def __init__(self, path: Path, model: torch.nn.Module, config):
        import gguf
        import transformers.modeling_gguf_pytorch_utils as hf_gguf

        self.path = Path(path)
        self.reader = gguf.GGUFReader(str(path))
        check_gguf_table(self.reader, self.path)
        architecture = _field_text(self.reader, "general.architecture")
        processor_class = hf_gguf.TENSOR_PROCESSORS.get(architecture, hf_gguf.TensorProcessor)
        self.processor = processor_class(config=config.to_dict())
        # Processors that only reorder rows (Llama's query/key permutation) or do nothing may
        # be handed raw block rows, or a slice of rows of any other tensor; others may not.
        self.row_wise = processor_class in (hf_gguf.TensorProcessor, hf_gguf.LlamaTensorProcessor)
        with gguf_parsed_once():  # transformers' walk would build gguf's name map per module
            self.names = hf_gguf.get_gguf_hf_weights_map(model, self.processor)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Model name → shape, for the tensors the model has a place for."""
        return {self.names[t.name]: tuple(int(d) for d in reversed(t.shape.tolist()))
                for t in self.reader.tensors if t.name in self.names}

    def tensors(self, keep_blocks: Callable[[str], bool]) -> Iterator[StoredTensor]:
        """Each tensor the model has a place for; Q4_0/Q4_1/Q8_0 tensors for which
        `keep_blocks(model name)` holds also offer their raw blocks."""
        for tensor in self.reader.tensors:
            if tensor.name not in self.names:
                continue
            name = self.names[tensor.name]
            shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
            kind = tensor.tensor_type.name
            blocks = None
            if kind in Q4_KINDS + Q8_KINDS and self.row_wise and len(shape) == 2 and keep_blocks(name):
                blocks = (lambda tensor=tensor: torch.from_numpy(
                    self._processed(tensor, self._raw(tensor, 0, tensor.data.shape[0])).copy()))
            yield StoredTensor(name, shape, kind, self._row_reader(tensor, shape), blocks)

    def _row_reader(self, tensor, shape) -> Callable[[int, int], torch.Tensor]:
        from gguf import dequantize

        whole_only = not self.row_wise or ".attn_q." in tensor.name or ".attn_k." in tensor.name

        count = tensor.data.shape[0]

        def rows(first: int, end: int) -> torch.Tensor:
            if whole_only or len(shape) < 2:
                values = self._processed(tensor, dequantize(self._raw(tensor, 0, count), tensor.tensor_type))
                return torch.from_numpy(values.copy()).reshape(shape)[first:end]
            values = dequantize(self._raw(tensor, first, end), tensor.tensor_type)
            return torch.from_numpy(values.copy()).reshape(end - first, *shape[1:])

        return rows

    def _raw(self, tensor, first: int, end: int):
        """Rows first..end-1 of the tensor as the reader's array would hold them, read from
        the file (touching the reader's mapping would keep its pages resident)."""
        data = tensor.data  # its dtype and shape only: no page of it is read
        count = data.shape[0]
        row_bytes = tensor.n_bytes // max(count, 1)
        raw = read_bytes(self.path, tensor.data_offset + first * row_bytes, (end - first) * row_bytes)
        return raw.numpy().view(data.dtype).reshape(end - first, *data.shape[1:])

    def _processed(self, tensor, values):
        return self.processor.process(weights=values, name=tensor.name, tensor_key_mapping=self.names,
                                      parsed_parameters={"tensors": {}, "config": self.processor.config}).weights


def _field_text(reader, key: str) -> str:
    field = reader.fields.get(key)
    return bytes(field.parts[field.data[0]]).decode() if field is not None else ""


GGUF_FIXED_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type → bytes


def gguf_tensor_kinds(path: Path) -> dict[str, str]:
    """Each tensor's llama.cpp name → its stored type ("Q4_1", "Q8_0", "F32", ...), read from the
    header alone: the metadata is skipped, not parsed (gguf's reader parses every value, seconds
    for a tokenizer's arrays), and no tensor data is touched."""
    import struct

    from gguf import GGMLQuantizationType

    with Path(path).open("rb") as f:
        def read(fmt: str):
            size = struct.calcsize(fmt)
            data = f.read(size)
            if len(data) < size:
                raise EOFError(f"{path} ends inside its header")
            return struct.unpack(fmt, data)

        def text() -> str:
            (length,) = read("<Q")
            return f.read(length).decode()

        def skip(value_type: int) -> None:
            if value_type in GGUF_FIXED_BYTES:
                f.seek(GGUF_FIXED_BYTES[value_type], 1)
            elif value_type == 8:
                f.seek(read("<Q")[0], 1)
            elif value_type == 9:
                item, count = read("<IQ")
                if item in GGUF_FIXED_BYTES:
                    f.seek(GGUF_FIXED_BYTES[item] * count, 1)
                else:
                    for _ in range(count):
                        skip(item)
            else:
                raise ValueError(f"{path} has an unknown GGUF value type {value_type}")

        _magic, _version, tensors, keys = read("<4sIQQ")
        for _ in range(keys):
            text()
            skip(read("<I")[0])
        kinds = {}
        for _ in range(tensors):
            name = text()
            (dims,) = read("<I")
            f.seek(8 * dims, 1)
            (kind,) = read("<I")
            f.seek(8, 1)  # the data's offset
            kinds[name] = GGMLQuantizationType(kind).name
        return kinds
