"""Generation on the tiny model: split equals unsplit, streaming, sampling, limits."""

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vramancer.engine import Engine, VramancerError

PROMPT = "Tell me about the sea."


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    engine = Engine.load(tiny_model_dir, "sim:3x64MiB", context=256)
    engine.migrate(0, 2, "sim0")  # embed+L0–2 | L3–5 | head: two layer blocks and two boundaries
    yield engine
    engine.close()


def test_split_greedy_equals_plain_transformers(engine, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    plain = model.generate(**inputs, max_new_tokens=20, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    ours = engine.generate(PROMPT, max_new_tokens=20)
    assert ours.token_ids == plain
    assert ours.prompt_tokens == inputs["input_ids"].shape[1] and ours.new_tokens == 20


def test_every_layer_gets_positions_and_mask_on_its_own_device(engine):
    """The decoder hands each layer the rotary tensors and mask it made beside the embeddings.
    Past a boundary, every layer of the block must get the copies carried onto the block's
    device, not the originals: on a real GPU split, the originals are on the wrong device."""
    seen: dict[int, int] = {}
    layers = engine.model.get_decoder().layers
    hooks = [
        layer.register_forward_pre_hook(
            lambda module, args, kwargs, i=i: seen.__setitem__(i, id(kwargs["position_embeddings"][0])),
            with_kwargs=True)
        for i, layer in enumerate(layers)
    ]
    try:
        engine.generate(PROMPT, max_new_tokens=1)
    finally:
        for hook in hooks:
            hook.remove()
    devices = engine.placement.layer_devices
    assert devices[:3] == ["sim0"] * 3 and devices[3:] == ["sim1"] * 3
    # One tensor object per block: made once, then carried once across the boundary.
    assert len({seen[i] for i in range(3)}) == 1 and len({seen[i] for i in range(3, 6)}) == 1
    assert seen[0] != seen[3]


def test_stream_yields_the_same_text_as_generate(engine):
    pieces = list(engine.stream(PROMPT, max_new_tokens=20))
    assert len(pieces) > 1
    assert "".join(pieces) == engine.generate(PROMPT, max_new_tokens=20).text


def test_sampling_with_a_seed_is_reproducible_and_differs_from_greedy(engine):
    kwargs = dict(max_new_tokens=20, temperature=1.0, top_p=0.95, top_k=50, seed=7)
    first = engine.generate(PROMPT, **kwargs).token_ids
    assert engine.generate(PROMPT, **kwargs).token_ids == first
    assert first != engine.generate(PROMPT, max_new_tokens=20).token_ids


def test_seeded_sampling_draws_what_plain_transformers_draws(engine, tiny_model_dir):
    """A lone request through the scheduler samples exactly as transformers' generate does with
    the same seed: the same warpers in the same order, and the same random draws."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    torch.manual_seed(7)
    plain = model.generate(**inputs, max_new_tokens=20, do_sample=True, temperature=0.8, top_p=0.95, top_k=50)
    ours = engine.generate(PROMPT, max_new_tokens=20, temperature=0.8, top_p=0.95, top_k=50, seed=7)
    assert ours.token_ids == plain[0, inputs["input_ids"].shape[1]:].tolist()


def test_cancel_from_another_thread(engine):
    cancel = threading.Event()
    seen = []

    def on_text(piece):
        seen.append(piece)
        if len(seen) == 3:
            threading.Thread(target=cancel.set).start()

    result = engine.generate(PROMPT, max_new_tokens=200, on_text=on_text, cancel=cancel)
    assert result.cancelled and result.new_tokens < 200


def test_raw_prompt_skips_the_chat_template(engine):
    templated = engine.generate(PROMPT, max_new_tokens=1)
    raw = engine.generate(PROMPT, max_new_tokens=1, raw=True)
    assert raw.prompt_tokens < templated.prompt_tokens


def test_a_prompt_longer_than_the_context_is_refused(engine):
    with pytest.raises(VramancerError, match="longer than the context of 256"):
        engine.generate("word " * 400, max_new_tokens=4)


def test_generation_stops_at_the_context(engine):
    result = engine.generate(PROMPT, max_new_tokens=1000)
    assert result.prompt_tokens + result.new_tokens <= 256


def test_conversation_messages_use_the_chat_template(engine):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": PROMPT},
    ]
    result = engine.generate(messages, max_new_tokens=4)
    assert result.prompt_tokens > engine.generate(PROMPT, max_new_tokens=1).prompt_tokens
