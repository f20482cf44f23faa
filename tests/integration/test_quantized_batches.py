"""Under q4/q8 weights a batch's decode steps run each decoder layer's fused step on our
kernels (kernels/cpu/fused_layer.py), padding masked per row, and every request answers as it
does alone."""

from __future__ import annotations

import pytest

from vramancer.engine import events as ev
from vramancer.engine.engine import Engine
from vramancer.kernels.cpu import fused_layer
from vramancer.kernels.cpu.build import kernels, unavailable_reason

pytestmark = pytest.mark.skipif(kernels() is None, reason=f"kernels unavailable: {unavailable_reason()}")

# Four lengths: the shorter ones are left-padded, so every decode step carries a mask.
PROMPTS = ["Tell me about the sea.", "Hi", "Why is the sky blue?",
           "What is the capital of France, and why did it grow so large over the centuries?"]


@pytest.mark.parametrize("weights", ["q4", "q8"])
def test_a_quantized_batch_runs_fused_and_answers_as_alone(tiny_model_dir, weights):
    engine = Engine.load(tiny_model_dir, "sim:2x64MiB", context=256, weights=weights)
    try:
        solo = {p: engine.generate(p, max_new_tokens=12).token_ids for p in PROMPTS}
        layers = engine.split.layer_modules
        assert layers and all(fused_layer.is_fused(layer) for layer in layers)
        masked, unfused = [], []

        def saw_layer(_module, args, kwargs):  # what each decode step hands a layer
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[1] == 1:
                masked.append(kwargs.get("attention_mask") is not None)

        def saw_attention(_module, args, kwargs):  # the layer's own forward ran
            hidden = args[0] if args else kwargs["hidden_states"]
            unfused.append(hidden.shape[1])

        hooks = [layer.register_forward_pre_hook(saw_layer, with_kwargs=True) for layer in layers]
        hooks += [layer.self_attn.register_forward_pre_hook(saw_attention, with_kwargs=True) for layer in layers]
        done = {}
        batch = engine.batch(lambda e: done.__setitem__(e.request_id, e) if isinstance(e, ev.GenerationDone) else None)
        for i, prompt in enumerate(PROMPTS):
            batch.submit(ev.Submit(str(i), prompt, {"max_new_tokens": 12}))
        while batch.busy:
            batch.step()
        for hook in hooks:
            hook.remove()
    finally:
        engine.close()
    assert masked and any(masked)  # decode steps of a padded batch reached the layers with their mask
    assert 1 not in unfused  # ... and none ran the layer's own forward: only prompts did
    for i, prompt in enumerate(PROMPTS):
        assert list(done[str(i)].token_ids) == list(solo[prompt])
