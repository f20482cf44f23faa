"""Shared fixtures: a tiny random Llama for fast tests, the bundled model loaded once."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from references import built_once

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network
# The suite runs many torch processes at once on few cores (test processes, the servers, nodes
# and dashboards they start): OpenMP threads that spin while they wait for work would burn
# the cores the others need. Set before any test imports torch; children inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The compiled CPU kernels (kernels/cpu/build.py) are the ones `make setup` built into the
# user's cache: keyed by their source and versions, they hold nothing of any test's, and a
# fresh folder would cost a compile (a minute) per run.
if "VRM_KERNEL_DIR" not in os.environ:
    import platformdirs

    os.environ["VRM_KERNEL_DIR"] = os.path.join(os.environ.get("VRM_CACHE_DIR") or platformdirs.user_cache_dir("vramancer"),
                                                "kernels")


def _scratch_folder(variable: str, prefix: str) -> None:
    """Point `variable` at a fresh folder unless this process inherited one (pytest-xdist's
    workers and the servers tests start do), and remove it when the process that made it exits:
    runs would otherwise leave a model cache each in the temporary folder."""
    if variable not in os.environ:
        os.environ[variable] = folder = tempfile.mkdtemp(prefix=prefix)
        atexit.register(shutil.rmtree, folder, ignore_errors=True)


# What the test processes of one run build once for all (references.built_once).
_scratch_folder("VRM_TEST_RUN_DIR", "vramancer-test-run-")
# Caches (profiles, quantized weights) go to a fresh folder, never the user's own.
_scratch_folder("VRM_CACHE_DIR", "vramancer-test-cache-")
# The user's own config file (config.toml) never steers a test: point at one that is not there.
os.environ["VRM_CONFIG"] = os.path.join(os.environ["VRM_TEST_RUN_DIR"], "no-config", "config.toml")

TINY_LAYERS = 6


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    """A 6-layer random Llama (hidden 64) with the bundled model's tokenizer and chat template,
    saved as a Hugging Face folder once per run. Same seed every run, so outputs are reproducible."""
    with built_once("tiny-llama") as (folder, done):
        if not done:
            _save_tiny_llama(folder)
    return str(folder)


def _save_tiny_llama(folder: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from vramancer.model.source import bundled_model_path

    path = bundled_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.2,  # large enough that greedy output varies token to token
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="session")
def smollm_engine():
    """The bundled SmolLM2 split over three simulated devices, loaded once per run.
    Tests that migrate must put the placement back (see `restore_placement`)."""
    from vramancer.engine import Engine

    engine = Engine.load("default", "sim:3x1GiB", context=512, weights="native")
    yield engine
    engine.close()


@pytest.fixture
def anyio_backend():
    return "asyncio"  # Textual and uvicorn run on asyncio


@pytest.fixture
def one_torch_thread():
    """The models decode fastest on one thread on this shared 2-core machine (threads that
    wait for a busy core spin), and the UI thread needs a core too."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
