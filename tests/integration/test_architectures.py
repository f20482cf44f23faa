"""Every decoder architecture in the matrix splits 3-way with the tokens plain transformers
gives, keeps them through a migration mid-answer, and is priced like its real parameters and
cache; what cannot be split is refused before loading with one sentence.

The models are random and built in-process from each family's own default config, shrunk only
in its sizes (hidden 64, 4 layers, a byte-level vocabulary: `tiny_config`), so a family whose
config lacks a field the others have is tested as it is. `python -m tests.integration.test_architectures`
prints the README's list of supported architectures from the matrix."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[2] / "README.md"
LAYERS = 4
WINDOW = 8  # sliding windows shorter than prompt + answer, so decoding passes them
PROMPT = "Tell me about the sea."  # 22 byte tokens
NEW_TOKENS = 8
MIGRATE_AT = 3

# Every family starts from its config class's defaults, and only these sizes change, and only
# where the defaults hold a value: a field a config lacks is never added (that hid issue 36:
# Mamba was given attention heads it does not have), and one left None (derived from others, or
# switched off) stays None.
SIZES = dict(
    vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
    initializer_range=0.2,  # random weights large enough that greedy output varies token to token
    # experts
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=64, n_group=1, topk_group=1,
    # compressed (latent) attention
    kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    # windows shorter than prompt + answer, so decoding passes them; rotary over part of a head
    sliding_window=WINDOW, window_size=WINDOW, rotary_dim=8,
    # state-space and linear-attention layers
    state_size=8, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=16,
    mamba_dt_rank=8, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
    linear_value_head_dim=16, ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=16, n_groups=1, chunk_size=16,
    moe_shared_expert_intermediate_size=64,
)
# Token ids inside the byte vocabulary, and no end of sequence: every answer runs its full length.
TOKENS = dict(pad_token_id=0, bos_token_id=None, eos_token_id=None)
ALTERNATING = dict(layer_types=["sliding_attention", "full_attention"] * (LAYERS // 2))

# model_type -> what must change beyond SIZES, each a field its config has: per-layer patterns
# cut to LAYERS, and switches the CPU needs
MATRIX: dict[str, dict] = {
    "llama": {},
    "mistral": {},
    "mixtral": {},
    "qwen2": {},
    "qwen2_moe": {},
    "qwen3": {},
    "qwen3_moe": {},
    "gemma": {},
    "gemma2": {},
    "gemma3_text": ALTERNATING,  # its default pattern (5 sliding, 1 full) cut to 4 layers has no full one
    "phi": {},
    "phi3": {},
    "phimoe": {},
    "gpt2": {},
    "gpt_neo": {"attention_types": [[["global", "local"], LAYERS // 2]]},
    "gptj": {},
    "gpt_bigcode": {},
    "gpt_neox": {},
    "opt": {},
    "falcon": {},
    "bloom": {},
    "mpt": {},
    "olmo": {},
    "olmo2": {},
    "olmo3": {},
    "olmoe": {},
    # head_dim is the rotary part's here; its router needs a count of experts per token, None by default
    # DeepSeek's attention (MLA) gives every query head its own key head, as its checkpoints
    # say (num_key_value_heads = num_attention_heads); with fewer, transformers' own attention
    # fails on a prompt continued over a cache (a kept prefix, a chunked prefill).
    "deepseek_v2": {"head_dim": 8, "first_k_dense_replace": 1, "num_experts_per_tok": 2, "num_key_value_heads": 4},
    "deepseek_v3": {"first_k_dense_replace": 1, "num_key_value_heads": 4},
    "stablelm": {},
    "starcoder2": {},
    "cohere": {},
    "cohere2": {},
    "granite": {},
    "granitemoe": {},
    "glm4": {},
    "smollm3": {},
    "gpt_oss": {},
}

# Hybrids: layers that keep a recurrent or convolution state, some beside attention.
HYBRID = {
    "mamba": {},
    "lfm2": {"layer_types": ["conv", "full_attention"] * (LAYERS // 2)},  # by default every layer attends
    "falcon_h1": {},
    "qwen3_next": {},
    # Mamba, attention, MLP and expert layers; the last two keep no cache at all
    "nemotron_h": {"layer_types": ["linear_attention", "moe", "full_attention", "mlp"], "use_mamba_kernels": False},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1,
              "use_mamba_kernels": False},
}
MATRIX.update(HYBRID)

# model_type -> (config overrides, words the refusal must contain)
REFUSED: dict[str, tuple[dict, str]] = {
    "bert": ({}, "encoder model"),
    "t5": ({}, "encoder-decoder model"),
    # its later layers read the keys and values of earlier ones (at its own depth: the pattern needs it)
    "gemma3n_text": ({"num_hidden_layers": 35}, "shared-cache layers"),
}


def config_fields(config_class) -> set[str]:
    """The fields a config class declares (its dataclass fields; before transformers 5, its
    `__init__` parameters), also under the names its attribute_map gives them. What it derives
    from them afterwards (Mamba's intermediate size, Falcon's head size) is not a field."""
    if dataclasses.is_dataclass(config_class):
        names = {field.name for field in dataclasses.fields(config_class)}
    else:
        names = set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs"}
    return names | {alias for alias, name in getattr(config_class, "attribute_map", {}).items() if name in names}


def tiny_config(model_type: str, overrides: dict):
    """`model_type`'s default config with SIZES, TOKENS and `overrides` applied to its own fields."""
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(model_type)
    fields = config_fields(type(defaults))
    invented = sorted(set(overrides) - fields)
    assert not invented, f"{model_type}'s config has no field {', '.join(invented)}: the test would invent it"
    values = {key: value for key, value in SIZES.items() if key in fields and getattr(defaults, key) is not None}
    values.update({key: value for key, value in TOKENS.items() if key in fields})
    return AutoConfig.for_model(model_type, **{**values, **overrides})


@pytest.fixture(scope="session")
def byte_tokenizer():
    return make_byte_tokenizer()


def make_byte_tokenizer():
    """A real byte-level tokenizer with 256 byte tokens after three special ones: small enough
    that the tiny models' embeddings cost nothing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(specials + sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    assert len(tokenizer) == SIZES["vocab_size"]
    return tokenizer


def build(model_type: str, overrides: dict, tokenizer, folder: Path):
    """A random tiny model of `model_type`, saved to `folder` with the tokenizer; the model too."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, overrides), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # the whole answer, whatever random weights say
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def plain_greedy(model, tokenizer) -> list[int]:
    inputs = tokenizer(PROMPT, return_tensors="pt")  # ids and attention mask, as the engine passes them
    with torch.inference_mode():
        # use_cache: MPT's config turns transformers' KV cache off by default; the split always uses one.
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, use_cache=True)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def unique_bytes(model) -> int:
    tensors = {t.data_ptr(): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def plan_json(capsys, folder) -> tuple[int, dict]:
    from vramancer.cli import main

    capsys.readouterr()
    code = main(["plan", "--json", "--model", str(folder), "--devices", "sim:3x1GiB", "--context", "64"])
    out = capsys.readouterr()
    return code, json.loads(out.out) if out.out.strip() else {}


@pytest.mark.parametrize("model_type", sorted(MATRIX))
def test_architecture_splits_with_identical_tokens(model_type, byte_tokenizer, tmp_path, capsys, caplog):
    import transformers

    from vramancer.engine import Engine
    from vramancer.model.architecture import cache_bytes, cache_tensors
    from vramancer.scheduling.kv_room import SpareRoomLayer

    model = build(model_type, MATRIX[model_type], byte_tokenizer, tmp_path)
    expected = plain_greedy(model, byte_tokenizer)
    prompt_tokens = len(byte_tokenizer(PROMPT)["input_ids"])

    engine = Engine.load(str(tmp_path), "sim:3x1GiB", context=64)
    assert "could not time" not in caplog.text  # the profiler ran real layers of this architecture
    try:
        profile = engine.profile
        # Priced like the real parameters: every module is in exactly one part.
        assert abs(profile.weight_bytes() - unique_bytes(model)) <= 0.01 * unique_bytes(model)
        assert {b.device for b in engine.placement.blocks()} == {"sim0", "sim1", "sim2"}

        split = engine.generate(PROMPT, raw=True, max_new_tokens=NEW_TOKENS).token_ids
        assert split == expected, f"{model_type}: split tokens differ from plain transformers"

        # Mid-answer, the first layer of the last block goes to the first device, with its cache;
        # the planner's per-layer KV matches the cache the layers really hold.
        last = engine.placement.blocks()[-1]
        seen: dict = {}

        def on_step(step: int) -> None:
            cache = engine._cache
            if step == MIGRATE_AT and "moved" not in seen:
                tokens = prompt_tokens + step - 1  # the last token chosen is not in the cache yet
                seen["kv"] = [cache_bytes(entry) for entry in cache.layers]
                # A full-attention layer of the scheduler's cache holds spare columns ahead of the
                # tokens (scheduling/kv_room.py): what it holds is priced at its capacity.
                held = [entry.capacity if isinstance(entry, SpareRoomLayer) else tokens for entry in cache.layers]
                seen["planned"] = [profile.kv_bytes(i, held[i]) for i in range(profile.num_layers)]
                # every tensor the layer's cache holds moves with it, counters included
                layer = last.layers.first
                seen["held"] = sum(t.numel() * t.element_size() for _, _, t in cache_tensors(cache.layers[layer]))
                seen["moved"] = engine.migrate(last.layers.first, last.layers.first, "sim0", step=step)

        migrated = engine.generate(PROMPT, raw=True, max_new_tokens=NEW_TOKENS, on_step=on_step).token_ids
        assert migrated == expected, f"{model_type}: tokens differ after a migration mid-answer"
        layer = last.layers.first
        assert seen["kv"] == seen["planned"], (
            f"{model_type}: transformers {transformers.__version__}'s cache holds {seen['kv']} bytes per layer where "
            f"vramancer/model/architecture.py plans {seen['planned']}: the cache or config class changed")
        assert seen["moved"].bytes == profile.layer_bytes[layer] + seen["held"]
        assert engine.placement.layer_devices[layer] == "sim0"
    finally:
        engine.close()

    code, plan = plan_json(capsys, tmp_path)
    assert code == 0 and plan["supported"] is True and plan["architecture"] == model_type
    assert len(plan["placement"]) == 3


def test_a_model_without_attention_plans_splits_migrates_and_answers_from_the_command_line(
        byte_tokenizer, tmp_path, capsys):
    """Issue 36: a pure state-space model, whose config names no attention heads at all, as a
    user saves it from transformers' own MambaConfig."""
    from transformers import MambaConfig, MambaForCausalLM

    from vramancer.cli import main

    torch.manual_seed(0)
    config = MambaConfig(hidden_size=64, num_hidden_layers=6, state_size=8, expand=2, intermediate_size=128,
                         vocab_size=512, initializer_range=0.2)
    assert not hasattr(config, "num_attention_heads")
    model = MambaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.save_pretrained(tmp_path)
    expected = plain_greedy(model, byte_tokenizer)
    assert len(set(expected)) > 2, "the random model should not repeat one token: the comparison would prove little"
    generate = ["generate", "--model", str(tmp_path), "--devices", "sim:3x1GiB", "--dtype", "float32", "--raw",
                "--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS), "--migrate", f"4-5:sim0@{MIGRATE_AT}", "--json"]

    capsys.readouterr()
    assert main(["plan", "--model", str(tmp_path), "--devices", "sim:3x1GiB", "--dtype", "float32"]) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    assert [line.split()[:2] for line in out.out.splitlines() if line.strip().startswith("sim")] == [
        ["sim0", "embed,"], ["sim1", "L2–3"], ["sim2", "L4–5"]]

    # As saved so far the folder has no tokenizer; transformers then hands an empty one, and
    # every prompt encodes to nothing: one sentence says so, not a traceback from the first layer.
    assert main(generate) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the prompt encodes to no tokens" in err and "tokenizer files" in err

    byte_tokenizer.save_pretrained(tmp_path)
    code = main(generate)
    answer = json.loads(capsys.readouterr().out)
    assert code == 0
    assert answer["token_ids"] == expected
    [moved] = answer["migrations"]
    assert (moved["first_layer"], moved["last_layer"], moved["src"], moved["dst"]) == (4, 5, "sim2", "sim0")
    # Two layers' weights and their convolution (128 channels × kernel 4) and recurrent (128 × state 8)
    # states in float32, plus the 8-byte token counter transformers keeps beside them (5.x).
    weights = 2 * sum(p.numel() * 4 for p in model.backbone.layers[0].parameters())
    states = 2 * (128 * 4 + 128 * 8) * 4
    assert 0 <= moved["bytes"] - (weights + states) <= 2 * 8
    assert [(b["device"], b["first_layer"], b["last_layer"]) for b in answer["placement"]] == [
        ("sim0", 0, 1), ("sim1", 2, 3), ("sim0", 4, 5)]


def _tensor_ids(value, keep: list) -> set[int]:
    if isinstance(value, torch.Tensor):
        keep.append(value)  # alive to the end of the test, so no other tensor takes its id
        return {id(value)}
    if isinstance(value, (tuple, list)):
        return set().union(*(_tensor_ids(v, keep) for v in value))
    if isinstance(value, dict):
        return set().union(*(_tensor_ids(v, keep) for v in value.values()))
    return set()


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_layers_off_the_first_device_get_their_own_copies_of_every_kind_of_mask_and_rotary(
        model_type, byte_tokenizer, tmp_path):
    """Alternating models hand sliding and full layers each their own mask (and Gemma 3 its
    own rotary tensors): a block on another device must get copies of both kinds, not only of
    the kind its first layer got. On a GPU split the originals are on the wrong device."""
    from vramancer.engine import Engine

    model = build(model_type, ALTERNATING, byte_tokenizer, tmp_path)
    expected = plain_greedy(model, byte_tokenizer)
    engine = Engine.load(str(tmp_path), "sim:2x1GiB", context=64)
    devices = engine.placement.layer_devices
    later = [i for i, device in enumerate(devices) if device != engine.placement.embed]
    kinds = model.config.layer_types
    assert len({kinds[i] for i in later}) == 2, f"the test needs both kinds of layer off the first device: {devices}"
    passes: list[dict[int, set[int]]] = []  # per forward pass: layer -> ids of the tensors it got
    keep: list = []

    def record(index):
        def hook(module, args, kwargs):
            if index == 0:
                passes.append({})
            passes[-1][index] = _tensor_ids((args[1:], kwargs), keep)
        return hook

    # Registered after the split's own hooks, so each sees what its layer really gets.
    hooks = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(engine.split.stack)]
    try:
        assert engine.generate(PROMPT, raw=True, max_new_tokens=NEW_TOKENS).token_ids == expected
    finally:
        for hook in hooks:
            hook.remove()
        engine.close()
    assert len(passes) == NEW_TOKENS
    for got in passes:
        beside_embeddings = set().union(*(got[i] for i in range(len(devices)) if i not in later))
        for i in later:
            assert not got[i] & beside_embeddings, f"layer {i} ({kinds[i]}) got a tensor of the first device"


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_unsupported_architecture_is_refused_before_loading(model_type, tmp_path, capsys):
    from vramancer.cli import main

    overrides, words = REFUSED[model_type]
    tiny_config(model_type, overrides).save_pretrained(tmp_path)  # a config and no weights at all
    code = main(["generate", "--model", str(tmp_path), "--devices", "sim:3x1GiB", "--prompt", "hello"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert model_type in err and words in err and "splits decoder-only language models" in err

    code, plan = plan_json(capsys, tmp_path)
    assert code == 2 and plan["supported"] is False
    assert model_type in plan["reason"] and words in plan["reason"]


def test_a_model_the_profiler_cannot_time_still_loads_priced_from_bytes(byte_tokenizer, tmp_path, monkeypatch, caplog):
    from vramancer.engine import Engine
    from vramancer.profiling import timing as profiler

    def cannot_time(*args, **kwargs):
        raise RuntimeError("this layer cannot run outside its model")

    monkeypatch.setattr(profiler, "_time_real_layers", cannot_time)
    model = build("llama", {"num_hidden_layers": 3}, byte_tokenizer, tmp_path)
    engine = Engine.load(str(tmp_path), "sim:3x1GiB", context=64, strategy="profiled", reprofile=True)
    try:
        assert "could not time llama" in caplog.text and "pricing it from its bytes" in caplog.text
        timings = engine.pricing.timings.devices["sim0"]
        assert timings.timed_as.endswith("priced from bytes") and timings.layer_decode_s > 0
        assert engine.predict().tokens_per_s > 0
        assert engine.generate(PROMPT, raw=True, max_new_tokens=NEW_TOKENS).token_ids == plain_greedy(model, byte_tokenizer)
    finally:
        engine.close()


def write_qwen2_gguf(path: Path, layers: int = 3) -> None:
    """A tiny random Qwen2 as a float32 GGUF file with a byte-level tokenizer: what llama.cpp's
    converter would write for it (architecture `qwen2`, its tensor and metadata names)."""
    import gguf
    import numpy as np
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Config, Qwen2ForCausalLM

    specials = ["<pad>", "<s>", "</s>"]
    tokens = specials + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["Ġt"]
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokens), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=512, tie_word_embeddings=False,
                                         initializer_range=0.2))
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(layers)
    writer.add_context_length(512)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_file_type(0)  # all float32
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    writer.add_token_merges(["Ġ t"])  # byte-level BPE needs a merge list: one will do
    writer.add_bos_token_id(1)
    writer.add_pad_token_id(0)
    ends = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    inner = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, tensor in model.state_dict().items():
        stem, _, kind = name.rpartition(".")
        if stem in ends:
            target = ends[stem]
        else:
            index, rest = stem.removeprefix("model.layers.").split(".", 1)
            target = f"blk.{index}.{inner[rest]}"
        writer.add_tensor(f"{target}.{kind}", tensor.detach().numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_gguf_of_another_architecture_loads_through_the_weights_cache(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vramancer.engine import Engine
    from vramancer.model.source import resolve_model
    from vramancer.model.weights_cache import gguf_cache_entry

    path = tmp_path / "tiny-qwen2.gguf"
    write_qwen2_gguf(path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    expected = plain_greedy(plain, tokenizer)
    for load in ("from the GGUF", "from the weights cache"):
        engine = Engine.load(str(path), "sim:3x1GiB", context=64)
        try:
            assert engine.profile.architecture == "qwen2", load
            assert engine.generate(PROMPT, raw=True, max_new_tokens=NEW_TOKENS).token_ids == expected, load
        finally:
            engine.close()
        assert (gguf_cache_entry(resolve_model(str(path)).gguf_path) / "weights-float32-native").is_dir()


def readme_list() -> str:
    return ", ".join(f"`{name}`" for name in sorted(MATRIX))


def test_readme_lists_the_architectures_the_matrix_checks():
    text = README.read_text()
    found = re.search(r"<!-- architectures -->\n(.*?)\n<!-- /architectures -->", text, re.S)
    assert found, "README.md has no <!-- architectures --> list"
    assert found.group(1).strip() == readme_list(), (
        "README's list of supported architectures differs from tests/integration/test_architectures.py; "
        "regenerate it with `python -m tests.integration.test_architectures`")


if __name__ == "__main__":
    print(readme_list())
