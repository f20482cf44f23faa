"""The streaming load: a model's weights go from the file to the form they run in one tensor
at a time, so loading it under q4 needs about its quantized size in host memory, not its
float32 size (the whole model in float32, then quantized, needed 5.9 bytes per parameter).

Peaks are read in a child process: its VmHWM, reset (/proc/self/clear_refs) after a small
load of the same architecture has brought in every import and kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

MIB = 1 << 20
# What a load may hold beyond its weights: a chunk of rows in float32 being converted
# (quantization/weights.py's CHUNK_BYTES) and its intermediates, the file's pages as they
# are read, the module tree. Measured at 60-110 MiB for this model; the whole model in
# float32 is 670 MiB, so the old path cannot pass.
ALLOWANCE = 256 * MIB


def _save(folder: Path, layers: int, vocab: int) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=True,
                         max_position_embeddings=2048, initializer_range=0.02)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def random_qwen2(tmp_path_factory) -> tuple[Path, Path]:
    """A 168M-parameter random Qwen2 in bfloat16 safetensors, and a one-layer copy to warm up with."""
    root = tmp_path_factory.mktemp("qwen2-stream")
    return _save(root / "model", 12, 32000), _save(root / "warm", 1, 1024)


def _load_in_child(model: Path, warm: Path, weights: str) -> dict:
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root), TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error")
    code = "import sys; from benchmarks.load_scale import child; child(*sys.argv[1:])"
    out = subprocess.run([sys.executable, "-c", code, str(model), str(warm), weights, "float32"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_q4_load_holds_its_quantized_size_not_the_float32_model(random_qwen2):
    from vramancer.quantization.weights import our_kernels

    if not our_kernels(torch.float32):
        pytest.skip("q4 streams in our kernels' layout only; torchao's is made by a whole-model pass")
    model, warm = random_qwen2
    result = _load_in_child(model, warm, "q4")
    float32_bytes = 4 * result["params"]
    assert result["resident"] + ALLOWANCE < float32_bytes  # else this test could not tell the two loads apart
    held = result["peak"] - result["overhead"]
    assert held <= result["resident"] + ALLOWANCE, (
        f"the load peaked at {held / MIB:.0f} MiB above its start for {result['resident'] / MIB:.0f} MiB of weights")
