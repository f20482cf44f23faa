"""The model is described once per load (issue 28): planner, profiler and runtime share one
ModelDescription, and the loaded model's parts are found by name, not described again."""

from __future__ import annotations

import pytest
import torch


def test_one_load_with_a_fresh_cache_describes_the_model_once(tiny_model_dir, tmp_path, monkeypatch):
    from vramancer.engine import Engine
    from vramancer.model import architecture

    monkeypatch.setenv("VRM_CACHE_DIR", str(tmp_path))  # nothing cached: every device is timed
    calls = []
    find_stack = architecture._find_stack  # what describe() does first, and nothing else calls

    def counted(model):
        calls.append(type(model).__name__)
        return find_stack(model)

    monkeypatch.setattr(architecture, "_find_stack", counted)
    engine = Engine.load(tiny_model_dir, "sim:2x64MiB", context=128, strategy="profiled")
    try:
        assert calls == ["LlamaForCausalLM"], calls
        assert engine.pricing.timings.devices["sim0"].layer_decode_s > 0  # the profiler did time layers
        split = engine.split
        # Bound to the loaded model: its own modules, not the meta model's.
        assert split.arch.layers is split.model.model.layers
        assert split.arch.output_embeddings is split.model.lm_head
        assert not any(t.is_meta for t in split.model.parameters())
        assert engine.generate("Tell me about the sea.", max_new_tokens=4).new_tokens == 4
    finally:
        engine.close()


def test_a_description_binds_to_a_cut_copy_and_refuses_one_that_lacks_its_parts(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from vramancer.model.architecture import UnsupportedArchitecture, cut_config
    from vramancer.model.description import describe_model
    from vramancer.model.loading import build_meta_model
    from vramancer.model.source import load_config, resolve_model

    config = load_config(resolve_model(tiny_model_dir))
    description = describe_model(build_meta_model(config, torch.float32), torch.float32)
    cut = AutoModelForCausalLM.from_config(cut_config(config, 2))
    arch = description.architecture.bind(cut)
    assert arch.layers is cut.model.layers and len(arch.caches) == 2
    assert arch.before == [cut.model.embed_tokens, cut.model.rotary_emb]
    assert description.bound_to(cut).profile.layer_bytes == description.profile.layer_bytes[:2]
    with pytest.raises(UnsupportedArchitecture, match="lacks a part it had when it was described"):
        description.architecture.bind(torch.nn.Linear(2, 2))
