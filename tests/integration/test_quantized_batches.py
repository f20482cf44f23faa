"""Under q4/q8 weights, with every decoder layer fused on our kernels (kernels/cpu/fused_layer.py),
a batch of requests of different lengths answers each one as it does alone."""

from __future__ import annotations

import pytest

from vramancer.engine import events as ev
from vramancer.engine.engine import Engine
from vramancer.kernels.cpu import fused_layer
from vramancer.kernels.cpu.build import kernels, unavailable_reason

pytestmark = pytest.mark.skipif(kernels() is None, reason=f"kernels unavailable: {unavailable_reason()}")

# Four lengths: each sequence attends over its own keys in every step (scheduling/ragged.py).
PROMPTS = ["Tell me about the sea.", "Hi", "Why is the sky blue?",
           "What is the capital of France, and why did it grow so large over the centuries?"]


@pytest.mark.parametrize("weights", ["q4", "q8"])
def test_a_quantized_batch_of_fused_layers_answers_as_alone(tiny_model_dir, weights):
    engine = Engine.load(tiny_model_dir, "sim:2x64MiB", context=256, weights=weights)
    try:
        solo = {p: engine.generate(p, max_new_tokens=12).token_ids for p in PROMPTS}
        layers = engine.split.layer_modules
        assert layers and all(fused_layer.is_fused(layer) for layer in layers)
        done = {}
        batch = engine.batch(lambda e: done.__setitem__(e.request_id, e) if isinstance(e, ev.GenerationDone) else None)
        for i, prompt in enumerate(PROMPTS):
            batch.submit(ev.Submit(str(i), prompt, {"max_new_tokens": 12}))
        while batch.busy:
            batch.step()
    finally:
        engine.close()
    for i, prompt in enumerate(PROMPTS):
        assert list(done[str(i)].token_ids) == list(solo[prompt])
