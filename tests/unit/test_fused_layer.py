"""A decoder layer's fused decode step (kernels/cpu/fused_layer.py) gives what the layer's own
forward gives, to the bit, on tiny random q4/q8 models (Llama, and Qwen2 with biases on q/k/v); a ragged
batch's decode step runs fused, each row with the bits it gets alone; prompts and layers with parts it
does not run keep their own forward."""

import pytest
import torch
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from vramancer.kernels.cpu.build import kernels, unavailable_reason
from vramancer.kernels.cpu.fused_layer import fuse_decoder_layers, is_fused
from vramancer.kernels.cpu.modules import rewire
from vramancer.quantization.weights import quantize_model

pytestmark = pytest.mark.skipif(kernels() is None, reason=f"kernels unavailable: {unavailable_reason()}")

SHAPE = dict(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, initializer_range=0.2)
MODELS = {
    "llama": (LlamaForCausalLM, LlamaConfig(**SHAPE)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**SHAPE)),  # biases on q, k and v
}


def quantized_pair(kind: str, weights: str):
    """The same random model quantized twice: one as quantize_model leaves it (fused layers),
    one whose decoder layers run their own forward, as transformers wrote it."""
    cls, config = MODELS[kind]
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = cls(config).eval()
        quantize_model(model, weights)
        models.append(model)
    fused, own = models
    for layer in own.model.layers:
        del layer.forward
    assert all(is_fused(layer) for layer in fused.model.layers)
    assert not any(is_fused(layer) for layer in own.model.layers)
    return fused, own


def attention_calls(model) -> list:
    """Counts the decoder layers' attention modules that run (the fused step runs none)."""
    calls = []
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("kind,weights", [("llama", "q4"), ("llama", "q8"), ("qwen2", "q4")])
@pytest.mark.parametrize("batch", [1, 2])
def test_a_decode_step_is_the_layers_own_to_the_bit(kind, weights, batch):
    fused, own = quantized_pair(kind, weights)
    ids = torch.randint(0, SHAPE["vocab_size"], (batch, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        caches = [DynamicCache(), DynamicCache()]
        prompt = [model(ids[:, :-1], cache=cache, use_cache=True).logits for model, cache in zip((fused, own), caches)]
        assert torch.equal(*prompt)  # a prompt runs the layers' own forward in both
        calls = attention_calls(fused)
        positions = torch.arange(batch).view(batch, 1) + 8  # each row its own rotary angles
        steps = [model(ids[:, -1:], position_ids=positions, cache=cache, use_cache=True).logits
                 for model, cache in zip((fused, own), caches)]
    assert calls == []  # the decode step ran fused
    # Tolerance: none. The fused step runs the same kernels in the same order with the same roundings.
    assert torch.equal(steps[0], steps[1])
    for mine, theirs in zip(caches[0].layers, caches[1].layers):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)


@pytest.mark.parametrize("kind,weights", [("llama", "q4"), ("llama", "q8"), ("qwen2", "q8")])
def test_greedy_generation_gives_the_same_tokens_fused_or_not(kind, weights):
    fused, own = quantized_pair(kind, weights)
    rewire(fused)  # installing again changes nothing
    assert fuse_decoder_layers(fused) == SHAPE["num_hidden_layers"]
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        calls = attention_calls(fused)
        tokens = [model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)[0, 12:].tolist()
                  for model in (fused, own)]
    assert len(calls) == SHAPE["num_hidden_layers"]  # only the prompt ran the attention modules
    assert len(set(tokens[0])) > 3  # tokens that vary, so a difference would show
    assert tokens[0] == tokens[1]


def test_a_ragged_batch_step_runs_fused_each_row_with_the_bits_it_gets_alone():
    """Three sequences with pasts of different lengths, each in its own buffers (scheduling/ragged.py),
    decode one token each as rows of one step: fused, every row's logits and new keys those it gets alone."""
    from vramancer.scheduling import ragged

    fused, own = quantized_pair("llama", "q4")
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, SHAPE["vocab_size"], (1, n), generator=gen) for n in (5, 2, 19)]
    nexts = torch.randint(0, SHAPE["vocab_size"], (3, 1), generator=gen)
    layers = SHAPE["num_hidden_layers"]
    with torch.inference_mode():
        alone, caches = [], []
        for prompt, token in zip(prompts, nexts):
            cache = DynamicCache()
            fused(prompt, cache=cache, use_cache=True)
            past = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
            position = torch.tensor([[prompt.shape[1]]])
            alone.append(fused(token[None], position_ids=position, cache=cache, use_cache=True).logits)
            caches.append((past, cache))
        batch = ragged.RaggedCache(layers, fused.config._attn_implementation)
        for slot, (past, _) in enumerate(caches):
            batch.add(slot)
            batch.capacity[slot] = 32
            batch.put(slot, past)
        pieces = [ragged.Piece(slot, 0, 1, prompt.shape[1], slot) for slot, prompt in enumerate(prompts)]
        positions = torch.tensor([[prompt.shape[1]] for prompt in prompts])
        calls = attention_calls(fused)
        with ragged.ragged_forward(fused, batch, pieces):
            rows = fused(nexts, position_ids=positions, cache=batch, use_cache=True).logits
        assert calls == []  # the step ran fused in every layer
        two_tokens = [model(prompts[0][:, :2], cache=DynamicCache(), use_cache=True).logits for model in (fused, own)]
        assert len(calls) == layers  # several new tokens: the layers' own forward
    assert torch.equal(*two_tokens)
    for slot, ((_, cache), logits) in enumerate(zip(caches, alone)):
        assert torch.equal(rows[slot:slot + 1], logits), slot
        length = prompts[slot].shape[1] + 1
        for mine, theirs in zip(batch.layers, cache.layers):
            assert torch.equal(mine.key_rows[slot][:, :, :length], theirs.keys)
            assert torch.equal(mine.value_rows[slot][:, :, :length], theirs.values)


def test_a_layer_with_parts_it_does_not_run_keeps_its_own_forward():
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**SHAPE, head_dim=16)).eval()  # per-head norms on q and k
    quantize_model(model, "q4")
    assert not any(is_fused(layer) for layer in model.model.layers)
    with torch.inference_mode():
        calls = attention_calls(model)
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert len(calls) == 3 * SHAPE["num_hidden_layers"]


class HalvedLayer(LlamaDecoderLayer):
    """A layer with Llama's parts that computes something else with them."""

    def forward(self, hidden_states, *args, **kwargs):
        return super().forward(hidden_states, *args, **kwargs) * 0.5


def test_a_layer_that_computes_otherwise_with_the_same_parts_keeps_its_own_forward():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
    for layer in model.model.layers:
        layer.__class__ = HalvedLayer
    quantize_model(model, "q8")
    assert not any(is_fused(layer) for layer in model.model.layers)  # the probe step differed

