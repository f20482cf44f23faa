"""`plan` at scale: timing never builds a model's whole embedding table or head, and a layer too
big to build is priced from its bytes (profiling/timing.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vramancer.model.description import describe_model
from vramancer.model.loading import build_meta_model
from vramancer.profiling import timing

GIB = 1 << 30


def _wide_vocab_config(folder: Path) -> Path:
    """Two small layers under a 600k-row vocabulary: its embedding table and its head are
    2.3 GiB each in float32, the layers a few MiB."""
    from transformers import Qwen2Config

    Qwen2Config(vocab_size=600_000, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False,
                max_position_embeddings=4096).save_pretrained(folder)
    return folder


_CHILD = """
import json, sys
from vramancer.cli.main import main
try:
    main(["plan", "--model", sys.argv[1], "--devices", "sim:2x8GiB", "--json"])
except SystemExit as exit:
    assert not exit.code, exit.code
status = open("/proc/self/status").read()
field = lambda name: int(status.split(name + ":")[1].split()[0]) * 1024
print(json.dumps({"peak": field("VmHWM")}), file=sys.stderr)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak from /proc")
def test_plan_of_a_huge_vocabulary_never_builds_the_table_or_the_head(tmp_path):
    folder = _wide_vocab_config(tmp_path / "wide")
    env = dict(os.environ, VRM_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", _CHILD, str(folder)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    plan = json.loads(out.stdout)
    peak = json.loads(out.stderr.strip().splitlines()[-1])["peak"]
    # The imports take about 0.4 GiB; the table alone would be 2.3 GiB more.
    assert peak < 1.2 * GIB, f"plan peaked at {peak / GIB:.2f} GiB"
    assert plan["predicted_tokens_per_s"] > 0


def test_the_timed_copy_holds_a_slice_of_the_vocabulary_and_scales_the_head_by_it():
    from transformers import Qwen2Config

    config = Qwen2Config(vocab_size=600_000, hidden_size=1024, intermediate_size=2048, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2)
    small, scale = timing.timing_config(config, 2)
    assert small.num_hidden_layers == 2
    assert small.vocab_size == timing.HEAD_SLICE_BYTES // (1024 * 4)
    assert scale == pytest.approx(600_000 / small.vocab_size)
    # A padding id beyond the slice keeps its row; a vocabulary that fits is left whole.
    config.pad_token_id = 599_999
    assert timing.timing_config(config, 2)[0].vocab_size == 600_000
    config.vocab_size, config.pad_token_id = 8_000, None
    assert timing.timing_config(config, 2)[1] == 1.0


def test_a_layer_too_big_to_build_is_priced_from_its_bytes(monkeypatch):
    from transformers import Qwen2Config

    config = Qwen2Config(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    meta = build_meta_model(config, torch.float32)
    monkeypatch.setattr(timing, "TIMED_LAYER_BYTES", 1024)

    def never(*_args, **_kwargs):
        raise AssertionError("a layer over the limit was built to be timed")

    monkeypatch.setattr(timing, "_time_real_layers", never)
    description = describe_model(meta, torch.float32)
    timings = timing.time_device(description, torch.device("cpu"), torch.float32, "host CPU")
    assert "priced from bytes" in timings.timed_as and "more than timing builds" in timings.timed_as
    assert timings.layer_decode_s > 0 and timings.head_s > timings.embed_s


def test_plan_says_what_each_tensor_of_the_bundled_gguf_ends_in():
    from vramancer.planning.precision import kernels_turned_off

    if kernels_turned_off():
        pytest.skip("GGUF blocks are kept only by our kernels; with them off torchao requantizes")
    from vramancer.model.loading import tensor_formats
    from vramancer.model.source import load_config, resolve_model

    source = resolve_model("default")
    config = load_config(source)
    q4 = tensor_formats(source, config, torch.float32, "q4")
    # SmolLM2's Q4_1 file: 210 linear weights in Q4_1 blocks, kept; the tied table/head in Q8_0, kept.
    assert q4 == {"F32 → float32": 61, "Q4_1 → q4 (the file's blocks, kept)": 210,
                  "Q8_0 → q8 (the file's blocks, kept)": 1}
    q8 = tensor_formats(source, config, torch.float32, "q8")
    assert q8["Q4_1 → q8 (int8 rows, requantized)"] == 210
    assert q8["Q8_0 → q8 (the file's blocks, kept)"] == 1
    assert tensor_formats(source, config, torch.float32, "native") == {
        "F32 → float32": 61, "Q4_1 → float32": 210, "Q8_0 → float32": 1}
