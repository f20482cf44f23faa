"""The GGUF cache: a second load gives the same model without parsing the GGUF again;
a damaged cache is rebuilt, never trusted and never fatal; another file never hits it.

The bundled model is read from its GGUF once per module (about 15 s); the other loads come
from the cache or rebuild one piece."""

from __future__ import annotations

import collections
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from vramancer.config.paths import CACHE_ENV
from vramancer.model import loading
from vramancer.model import source as sources
from vramancer.model import weights_cache as cache

pytestmark = pytest.mark.model

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
TOKENS = 12
PARSES: list = []  # GGUF files parsed by the first load


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(folder))
        yield folder


@pytest.fixture(scope="module")
def source():
    return sources.resolve_model("default")


@pytest.fixture(scope="module")
def first_load(cache_dir, source):
    """The bundled model read from its GGUF into an empty cache: (config, tokenizer, model),
    the tokenizer straight from transformers as the reference. Counts the GGUF parses."""
    import gguf.gguf_reader
    from transformers import AutoTokenizer

    assert not any(cache_dir.iterdir())
    reader = gguf.gguf_reader.GGUFReader
    parse = reader.__init__

    def counted(self, *args, **kwargs):
        PARSES.append(args[0] if args else kwargs.get("path"))
        parse(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reader, "__init__", counted)
        config = sources.load_config(source)
        sources.load_tokenizer(source)
        model = loading.load_weights(source, torch.float32)
    return config, AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file), model


@pytest.fixture
def no_gguf_parsing(monkeypatch):
    """Any attempt to parse a GGUF file fails the test."""
    import gguf.gguf_reader

    def refuse(self, *args, **kwargs):
        raise AssertionError("the GGUF file was parsed although the cache holds everything")

    monkeypatch.setattr(gguf.gguf_reader.GGUFReader, "__init__", refuse)


def greedy(tokenizer, model) -> list[int]:
    inputs = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False, temperature=None, top_p=None, top_k=None)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def replace_file(path: Path, data: bytes) -> None:
    """Swap in new content under the same name (a new inode: models already mapped keep theirs)."""
    scratch = path.with_name(path.name + ".scratch")
    scratch.write_bytes(data)
    os.replace(scratch, path)


def piece(source, name: str) -> Path:
    return cache.gguf_cache_entry(source.gguf_path) / name


def test_first_load_stores_every_piece(first_load, source, cache_dir):
    entry = cache.gguf_cache_entry(source.gguf_path)
    assert entry.parent.parent == cache_dir
    for name, files in {"config": {"config.json"}, "tokenizer": {"tokenizer.json"},
                        "weights-float32-native": {"model.safetensors", "generation_config.json"}}.items():
        present = {p.name for p in (entry / name).iterdir()}
        assert files | {cache.MANIFEST} <= present, name
    assert not [p for p in entry.iterdir() if p.name.startswith(".")], "staging folders were left behind"


def test_first_load_parses_the_gguf_once_and_leaves_libraries_as_they_were(first_load):
    import gguf
    import transformers.modeling_gguf_pytorch_utils as hf_gguf

    assert len(PARSES) == 1, "config, tokenizer and weights share one parse of the file"
    assert gguf.GGUFReader is gguf.gguf_reader.GGUFReader
    assert gguf.get_tensor_name_map is gguf.tensor_mapping.get_tensor_name_map
    assert hf_gguf.load_gguf_checkpoint.__module__ == hf_gguf.__name__
    assert not cache._KEPT_READERS


def test_second_load_is_identical_and_skips_the_gguf(first_load, source, no_gguf_parsing):
    config, tokenizer, model = first_load
    cached_config = sources.load_config(source)
    cached_tokenizer = sources.load_tokenizer(source)
    cached_model = loading.load_weights(source, torch.float32)
    assert cached_config.to_diff_dict() == config.to_diff_dict()
    assert_same_weights(model, cached_model)
    assert cached_model.get_output_embeddings().weight is cached_model.get_input_embeddings().weight
    # Mapped weights start on cache lines, as freshly allocated ones do (else matmuls run slower).
    assert {p.data_ptr() % cache.ALIGN for p in cached_model.parameters()} == {0}
    text = "Ünïcode, spaces  and <|im_start|> specials\n\tdone."
    assert cached_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert cached_tokenizer.apply_chat_template(PROMPT, tokenize=False) == tokenizer.apply_chat_template(PROMPT, tokenize=False)
    assert (cached_tokenizer.eos_token_id, cached_tokenizer.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    plain = greedy(tokenizer, model)
    assert greedy(cached_tokenizer, cached_model) == plain
    assert tokenizer.decode(plain, skip_special_tokens=True).startswith("The capital of France is Paris")


def test_split_engine_from_the_cache_answers_the_same(first_load, no_gguf_parsing):
    from vramancer.engine import Engine

    _, tokenizer, model = first_load
    engine = Engine.load("default", "sim:2x1GiB", context=256, weights="native")  # first_load is native
    try:
        result = engine.generate(PROMPT[0]["content"], max_new_tokens=TOKENS)
    finally:
        engine.close()
    assert result.token_ids == greedy(tokenizer, model)


def test_corrupt_weights_are_rebuilt(first_load, source, caplog):
    _, _, model = first_load
    weights = piece(source, "weights-float32-native") / cache.WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)  # a zeroed run inside some layer's weights
    replace_file(weights, bytes(data))
    del data
    with caplog.at_level(logging.WARNING, logger=cache.log.name):
        rebuilt = loading.load_weights(source, torch.float32)
    assert "ignoring the cached weights-float32-native" in caplog.text
    assert_same_weights(model, rebuilt)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=cache.log.name):
        again = loading.load_weights(source, torch.float32)  # the rebuilt piece is whole
    assert caplog.text == ""
    assert_same_weights(model, again)


def test_truncated_tokenizer_is_rebuilt(first_load, source, caplog):
    _, tokenizer, _ = first_load
    tokenizer_json = piece(source, "tokenizer") / "tokenizer.json"
    replace_file(tokenizer_json, tokenizer_json.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING, logger=cache.log.name):
        rebuilt = sources.load_tokenizer(source)
    assert "ignoring the cached tokenizer" in caplog.text
    assert rebuilt("Paris is lovely")["input_ids"] == tokenizer("Paris is lovely")["input_ids"]
    assert tokenizer_json.stat().st_size > 1000


def test_piece_without_manifest_is_not_trusted(first_load, source):
    """A crash between writing a piece and listing it leaves a folder we must not read."""
    config_piece = piece(source, "config")
    (config_piece / cache.MANIFEST).unlink()
    (config_piece / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 1}')
    config = sources.load_config(source)
    assert config.num_hidden_layers == 30
    assert (config_piece / cache.MANIFEST).is_file()


def test_a_different_file_gets_a_different_key(tmp_path, source):
    original = Path(source.location) / source.gguf_file
    copy = tmp_path / original.name
    shutil.copy2(original, copy)  # same bytes, same mtime: the same model
    assert cache.gguf_key(copy) == cache.gguf_key(original)
    stat = copy.stat()
    with copy.open("r+b") as f:  # another file of the same size and mtime: its tail differs
        f.seek(stat.st_size - 10)
        f.write(b"\x00" * 10)
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert cache.gguf_key(copy) != cache.gguf_key(original)
    shutil.copy2(original, copy)
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # rewritten in place
    assert cache.gguf_key(copy) != cache.gguf_key(original)
    other = sources.resolve_model(str(copy))
    assert cache.gguf_cache_entry(other.gguf_path) != cache.gguf_cache_entry(source.gguf_path)
    assert not cache.gguf_cache_entry(other.gguf_path).exists()


def test_unwritable_cache_does_not_stop_a_load(tmp_path, source, monkeypatch, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv(CACHE_ENV, str(blocker))
    with caplog.at_level(logging.WARNING, logger=cache.log.name):
        config = sources.load_config(source)
    assert config.num_hidden_layers == 30
    assert "could not cache the config" in caplog.text


def test_prefill_runs_the_head_as_one_matrix_product(first_load, source):
    """The last position's hidden state reaches the head as a strided view; without help,
    torch.matmul turns it into a batched product over an expanded weight (2.5x slower here)."""
    from torch.profiler import ProfilerActivity, profile

    _, tokenizer, _ = first_load
    model = loading.load_weights(source, torch.float32)
    inputs = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(**inputs, logits_to_keep=1)
    assert "aten::bmm" not in {event.key for event in prof.key_averages()}


def loaded_beside_float32(first_load, source, weights: str):
    """The bundled model streamed under `weights`, the float32 reference's tensors by name, and
    how many weights of each type the load holds."""
    _, _, model = first_load
    streamed = loading.load_weights(source, torch.float32, weights)
    kinds = collections.Counter(type(p.data).__name__ for p in streamed.parameters())
    return streamed, dict(model.named_parameters()), kinds


def test_q4_keeps_the_files_blocks_and_the_cache_holds_them_quantized(first_load, source):
    """Under q4 the GGUF's Q4_1 blocks become our q4 weights as they are: the same bytes as
    quantizing its dequantized values again; its Q8_0 table (tied to the head) stays in its
    blocks, the file's values to the bit; the cache keeps those bytes, about the GGUF's size,
    not float32 (5.3 times it), and gives back the same answer."""
    from vramancer.quantization.q4_blocks import BlockInt4Tensor
    from vramancer.quantization.q8_blocks import BlockInt8Tensor
    from vramancer.quantization.weights import our_kernels, stored_bytes

    if not our_kernels(torch.float32):
        pytest.skip("q4 in our kernels' layout needs them")
    _, tokenizer, _ = first_load
    streamed, floats, formats = loaded_beside_float32(first_load, source, "q4")
    for name, weight in streamed.named_parameters():
        weight = weight.data
        if isinstance(weight, BlockInt4Tensor):
            assert torch.equal(weight.qdata, BlockInt4Tensor.from_float(floats[name]).qdata), name
        elif isinstance(weight, BlockInt8Tensor):
            assert torch.equal(weight.dequantize(torch.float32), floats[name]), name
        else:
            assert torch.equal(weight, floats[name]), name
    assert (formats["BlockInt4Tensor"], formats["BlockInt8Tensor"]) == (210, 1), formats  # every Q4_1 tensor; the tied table
    held = sum(stored_bytes(p) for p in streamed.parameters())
    cached = piece(source, "weights-float32-q4-q8_0-kept") / cache.WEIGHTS_FILE
    gguf_bytes = (Path(source.location) / source.gguf_file).stat().st_size
    assert held <= cached.stat().st_size <= held * 1.02 + 65536
    assert cached.stat().st_size <= 1.1 * gguf_bytes
    again = loading.load_weights(source, torch.float32, "q4")  # from the cache
    assert greedy(tokenizer, again) == greedy(tokenizer, streamed)


def test_q8_reads_the_q4_files_values_and_keeps_only_its_q8_blocks(first_load, source):
    """Under q8 the GGUF's Q4_1 tensors are values to quantize again per row (their blocks are
    not Q8_0's), and only its Q8_0 table keeps its blocks."""
    from vramancer.quantization.q8_blocks import BlockInt8Tensor
    from vramancer.quantization.q8_rows import RowInt8Tensor
    from vramancer.quantization.weights import convert_weight, our_kernels

    if not our_kernels(torch.float32):
        pytest.skip("q8 in our kernels' layout needs them")
    _, tokenizer, _ = first_load
    streamed, floats, kinds = loaded_beside_float32(first_load, source, "q8")
    for name, weight in streamed.named_parameters():
        weight = weight.data
        if isinstance(weight, RowInt8Tensor):
            expected = convert_weight(lambda first, end: floats[name][first:end], tuple(weight.shape), "q8", torch.float32)
            assert torch.equal(weight.dequantize(torch.float32), expected.dequantize(torch.float32)), name
        elif isinstance(weight, BlockInt8Tensor):
            assert torch.equal(weight.dequantize(torch.float32), floats[name]), name
    assert (kinds["RowInt8Tensor"], kinds["BlockInt8Tensor"]) == (210, 1), kinds
    assert greedy(tokenizer, streamed)
