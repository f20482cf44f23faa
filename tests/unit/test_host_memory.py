"""Weights left in a memory-mapped file are copied into the process's own memory at load
(runtime/host_memory.py): matmuls over mapped file pages ran measurably slower."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn

from vramancer.engine import Engine
from vramancer.runtime.host_memory import HUGE_PAGE, _file_mappings, copy_mapped

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")


def in_a_file(tensor: torch.Tensor) -> bool:
    return any(low <= tensor.data_ptr() < high for low, high in _file_mappings())


def test_mapped_weights_are_copied_with_their_values_identity_and_ties(tmp_path):
    big = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float32, shape=(768, 1024))  # 3 MiB
    big[:] = np.random.default_rng(0).standard_normal(big.shape, dtype=np.float32)
    big.flush()
    mapped = torch.from_numpy(np.load(tmp_path / "big.npy", mmap_mode="r+"))
    model = nn.Sequential(nn.Linear(1024, 768, bias=False), nn.Linear(768, 1024, bias=False), nn.Linear(4, 4))
    model[0].weight = nn.Parameter(mapped, requires_grad=False)
    model[1].weight = model[0].weight  # a tie (shapes aside: only identity matters here)
    ordinary = model[2].weight.data_ptr()
    expected = mapped.clone()
    assert in_a_file(model[0].weight)

    weight = model[0].weight
    slots = [(module, "weight", module.weight) for module in model]
    copied = copy_mapped(slots)

    assert copied == expected.numel() * 4
    assert model[0].weight is weight and model[1].weight is weight, "the parameter and its tie stay"
    assert not in_a_file(weight) and torch.equal(weight, expected)
    assert weight.data_ptr() % HUGE_PAGE == 0, "a tensor of a huge page or more gets aligned memory"
    assert model[2].weight.data_ptr() == ordinary, "weights already in ordinary memory stay where they are"
    assert torch.equal(mapped, expected), "the file's released pages read back unchanged"


def test_a_model_folder_loads_into_own_memory_and_answers_as_before(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    engine = Engine.load(tiny_model_dir, "sim:2x64MiB", context=256)
    try:
        mapped = [name for name, tensor in engine.model.named_parameters() if in_a_file(tensor)]
        assert mapped == []
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        assert any(in_a_file(tensor) for tensor in plain.parameters()), "transformers maps the file"
        answer = engine.generate("Tell me about the sea.", raw=True, max_new_tokens=12)
        with torch.inference_mode():
            ids = engine.tokenizer("Tell me about the sea.", return_tensors="pt")
            out = plain.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=engine.tokenizer.eos_token_id)
        assert answer.token_ids == out[0, ids["input_ids"].shape[1]:].tolist()
    finally:
        engine.close()
