"""--weights q8/q4 on the tiny model: the split answers like the same quantized model unsplit,
the plan counts the bytes the devices really hold, and migrations carry quantized bytes."""

import pytest
import torch

from vramancer.config.errors import VramancerError
from vramancer.config.options import LoadOptions
from vramancer.engine import Engine
from vramancer.engine.loader import prepare
from vramancer.kernels.cpu.fused_layer import is_fused
from vramancer.model.source import bundled_model_path
from vramancer.quantization.weights import (
    choose_weights,
    gguf_file_type,
    our_kernels,
    quantize_model,
    stored_bytes,
)
from vramancer.scheduling.generation import encode_prompt

PROMPT = "Tell me about the sea."
SPLIT = "sim:3x64MiB"


@pytest.fixture(scope="module", params=["q8", "q4"])
def quantized(request, tiny_model_dir):
    engine = Engine.load(tiny_model_dir, SPLIT, context=256, weights=request.param)
    yield request.param, engine
    engine.close()


def held_bytes(modules) -> int:
    """What the modules' tensors really occupy (a tensor shared between them once)."""
    tensors = {id(t): t for m in modules for t in list(m.parameters()) + list(m.buffers())}
    return sum(stored_bytes(t) for t in tensors.values())


def test_quantized_split_answers_like_the_same_quantized_model_unsplit(quantized, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    weights, engine = quantized
    split = engine.generate(PROMPT, max_new_tokens=16).token_ids
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=engine.dtype)
    plain.requires_grad_(False)
    quantize_model(plain, weights)
    inputs = encode_prompt(engine.tokenizer, PROMPT, raw=False)
    with torch.inference_mode():
        out = plain.generate(**inputs, max_new_tokens=16, do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=engine.tokenizer.eos_token_id)
    assert split == out[0, inputs["input_ids"].shape[1]:].tolist()
    placement = engine.placement
    assert len({placement.embed, *placement.layer_devices, placement.head}) > 1  # it really was split


def test_devices_hold_quantized_weights_and_the_plan_counts_them(quantized, tiny_model_dir):
    weights, engine = quantized
    layer = engine.split.layer_modules[0]
    assert type(layer.mlp.up_proj.weight).__name__ != "Parameter"  # a torchao tensor, not floats
    as_bfloat16 = sum(p.numel() for p in layer.parameters()) * 2  # numel: the logical count of weights
    assert held_bytes([layer]) < 0.6 * as_bfloat16
    # The plan made before any load (from shapes) counts what each layer holds once loaded.
    planned = prepare(LoadOptions(tiny_model_dir, SPLIT, context=256, weights=weights))
    planned.close()
    assert planned.weights == weights
    for i, module in enumerate(engine.split.layer_modules):
        assert planned.profile.layer_bytes[i] == pytest.approx(held_bytes([module]), rel=0.02)
        assert engine.profile.layer_bytes[i] == pytest.approx(held_bytes([module]), rel=0.02)
    for need in engine.needs_json():
        layers = [engine.split.layer_modules[i] for i, d in enumerate(engine.placement.layer_devices) if d == need["device"]]
        parts = layers + (list(engine.split.arch.before) if engine.placement.embed == need["device"] else []) \
            + (list(engine.split.arch.after) if engine.placement.head == need["device"] else [])
        assert need["weights"] == pytest.approx(held_bytes(parts), rel=0.02)


def inner_pointers(weight) -> set[int]:
    names, _ = weight.__tensor_flatten__()
    return {getattr(weight, name).data_ptr() for name in names}


def test_a_migration_moves_the_quantized_bytes_and_keeps_the_answer(quantized):
    weights, engine = quantized
    before = engine.generate(PROMPT, max_new_tokens=12).token_ids
    source = engine.placement.layer_devices[0]
    target = next(d.name for d in engine.devices if d.name != source)
    expected = held_bytes([engine.split.layer_modules[0], engine.split.layer_modules[1]])
    old_storage = inner_pointers(engine.split.layer_modules[0].self_attn.q_proj.weight)
    result = engine.migrate(0, 1, target)
    try:
        assert result.bytes == expected
        moved = engine.split.layer_modules[0].self_attn.q_proj.weight
        assert type(moved).__name__ != "Parameter"
        assert not inner_pointers(moved) & old_storage  # the layer now uses the copies that crossed the link
        if our_kernels(engine.dtype):  # decode steps stay fused (kernels/cpu/fused_layer.py)
            assert all(is_fused(layer) for layer in engine.split.layer_modules)
        assert engine.generate(PROMPT, max_new_tokens=12).token_ids == before
    finally:
        engine.migrate(0, 1, source)


def test_auto_keeps_a_gguf_files_width():
    path = bundled_model_path()
    assert gguf_file_type(path) == 3  # llama.cpp's MOSTLY_Q4_1
    reason = "q4: the GGUF file stores Q4_1, kept at that width (--weights auto)"
    assert choose_weights("auto", path, {"sim"}) == ("q4", reason)
    kind, reason = choose_weights("auto", path, {"cuda", "cpu"})
    assert kind == "q8" and "q4 runs on CPU and simulated devices only" in reason  # q4 is packed for the CPU kernel
    assert choose_weights("auto", None, {"sim"})[1] == "native: a safetensors checkpoint keeps its dtype (--weights auto)"
    assert choose_weights("auto", path, {"sim"}, remote=True)[0] == "native"  # nodes load unquantized
    assert choose_weights("q8", path, {"sim"}) == ("q8", "q8: asked for (--weights q8)")


def test_q4_is_refused_with_gpus_in_one_sentence():
    with pytest.raises(VramancerError, match="needs CPU or simulated devices only"):
        choose_weights("q4", None, {"cuda", "cpu"})


def test_a_quantized_plan_is_priced_from_layers_quantized_the_same_way(tiny_model_dir, monkeypatch):
    """The prediction under q8/q4 comes from timing layers that hold those weights and run
    those kernels, not from the native ones (which decode at a third of the speed here)."""
    from vramancer.quantization import weights as quantized

    timed_as: list[str] = []
    # The cut copy is quantized a tensor at a time, then handed to our kernels (or to torchao whole).
    spied = "finish_quantized" if quantized.streams("q8", torch.float32) else "quantize_model"
    real = getattr(quantized, spied)
    monkeypatch.setattr(quantized, spied, lambda model, weights: (timed_as.append(weights), real(model, weights))[1])
    planned = prepare(LoadOptions(tiny_model_dir, SPLIT, context=256, weights="q8"), reprofile=True)
    planned.close()
    assert timed_as == ["q8"]  # the profiler's cut model, once for the host that runs every sim device
    native = prepare(LoadOptions(tiny_model_dir, SPLIT, context=256), reprofile=True)
    native.close()
    assert timed_as == ["q8"]
    assert planned.pricing.timings.devices["sim0"] != native.pricing.timings.devices["sim0"]


def test_auto_dtype_on_the_cpu_is_float32_and_plan_says_why(tiny_model_dir):
    planned = prepare(LoadOptions(tiny_model_dir, SPLIT, context=256))
    planned.close()
    assert planned.dtype == torch.float32
    assert planned.dtype_reason.startswith("float32: on every CPU")


def test_bfloat16_split_answers_like_bfloat16_unsplit(tiny_model_dir):
    split = Engine.load(tiny_model_dir, SPLIT, context=256, dtype="bfloat16")
    one = Engine.load(tiny_model_dir, "cpu", context=256, dtype="bfloat16")
    try:
        placement = split.placement
        assert len({placement.embed, *placement.layer_devices, placement.head}) > 1
        assert split.generate(PROMPT, max_new_tokens=16).token_ids == one.generate(PROMPT, max_new_tokens=16).token_ids
    finally:
        split.close()
        one.close()
