"""Checkpoints whose tensor names transformers changes on load, and hub ids, stream one tensor
at a time too (model/loading.py's `renamed_safetensors` and `checkpoint_files`): the whole-model
load through transformers is made to fail, so a test passes only if the stream did the work."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from vramancer.model import loading
from vramancer.model.source import resolve_model


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def _refuse_whole_loads(*args, **kwargs):
    raise AssertionError("the whole-model load ran: the checkpoint was not streamed")


def test_a_base_model_checkpoint_streams_under_the_causal_lms_names(tmp_path, monkeypatch):
    """Saved from the base model, its tensors lack the `model.` prefix; transformers adds it on
    load, and so does the stream, tensor by tensor."""
    model = _tiny_llama()
    model.model.save_pretrained(tmp_path)  # "layers.0.mlp.up_proj.weight", not "model.layers.0…"
    monkeypatch.setattr(loading, "_from_pretrained", _refuse_whole_loads)
    loaded = loading.load_weights(resolve_model(str(tmp_path)), torch.float32)
    expected = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


_HUB_CHILD = """
import sys, torch
from transformers import AutoModelForCausalLM
from vramancer.model import loading
from vramancer.model.source import resolve_model

def refuse(*args, **kwargs):
    raise AssertionError("the whole-model load ran")

plain = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).state_dict()
loading._from_pretrained = refuse
source = resolve_model(sys.argv[1])
assert source.is_hub_id
streamed = loading.load_weights(source, torch.float32).state_dict()
assert set(streamed) == set(plain)
assert all(torch.equal(streamed[name], plain[name]) for name in plain)
print("streamed")
"""


def test_a_hub_id_in_the_hugging_face_cache_streams_from_its_snapshot(tmp_path):
    """A hub id already in the cache (laid out as huggingface_hub lays it out) is read from its
    snapshot's safetensors, offline, as a model folder is."""
    snapshot = tmp_path / "hub" / "models--vramancer-test--tiny-llama" / "snapshots" / ("0" * 40)
    _tiny_llama().save_pretrained(snapshot)
    refs = snapshot.parents[1] / "refs"
    refs.mkdir()
    (refs / "main").write_text("0" * 40)
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1", PYTHONPATH=str(root),
               TRANSFORMERS_VERBOSITY="error")
    done = subprocess.run([sys.executable, "-c", _HUB_CHILD, "vramancer-test/tiny-llama"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "streamed"
