"""Bad input, as a new user types it: each case exits 2 with one sentence on stderr and no
traceback. Where the value alone is wrong, the refusal comes before any model file is read
(the loaders are replaced by tripwires for those cases); damaged model files are refused
before any weights load. (How long each refusal takes in a fresh process:
`python -m benchmarks.bad_input`.)

The table runs in this process (`vramancer.cli.main`); a few cases run as real processes to
show the real path: argv bytes that are not UTF-8, environment variables, a huge device count.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from vramancer.cli import main
from vramancer.engine import engine as engine_module
from vramancer.engine import loader as loader_module
from vramancer.model import loading
from vramancer.model import source as sources

TOKEN_FILE_LIMIT = "more than 4096 bytes"

# (case id, argv, environment, words the sentence must hold, what may be read before the refusal)
#   "nothing": the value alone is wrong, no model file may be opened
#   "config":  the model's config (or header) is the bad input, weights must not load
NOTHING, CONFIG = "nothing", "config"
MANY_SIMS = "sim:" + ",".join(["1GiB"] * 5000)
MANY_NODES = ",".join(["cpu"] + [f"node:127.0.0.1:{7000 + i}/sim0" for i in range(3000)])

CASES = [
    # sampling flags
    ("temperature-nan", ["generate", "--prompt", "hi", "--temperature", "nan"], {}, "--temperature must be a finite number", NOTHING),
    ("temperature-inf", ["generate", "--prompt", "hi", "--temperature", "inf"], {}, "--temperature must be a finite number", NOTHING),
    ("temperature-negative", ["generate", "--prompt", "hi", "--temperature", "-1"], {}, "--temperature must be 0 or more", NOTHING),
    ("top-p-nan", ["generate", "--prompt", "hi", "--top-p", "nan"], {}, "--top-p must be a finite number", NOTHING),
    ("top-p-zero", ["generate", "--prompt", "hi", "--top-p", "0"], {}, "--top-p must be in (0, 1]", NOTHING),
    ("top-p-above-one", ["generate", "--prompt", "hi", "--top-p", "1.5"], {}, "--top-p must be in (0, 1]", NOTHING),
    ("top-k-negative", ["generate", "--prompt", "hi", "--top-k", "-1"], {}, "--top-k must be between 0 and", NOTHING),
    ("repetition-penalty-nan", ["generate", "--prompt", "hi", "--repetition-penalty", "nan"], {}, "--repetition-penalty must be a finite number", NOTHING),
    ("repetition-penalty-zero", ["generate", "--prompt", "hi", "--repetition-penalty", "0"], {}, "--repetition-penalty must be between 0.01 and 100", NOTHING),
    ("repetition-penalty-1e-300", ["generate", "--prompt", "hi", "--repetition-penalty", "1e-300"], {}, "--repetition-penalty must be between 0.01 and 100", NOTHING),
    ("repetition-penalty-1e300", ["generate", "--prompt", "hi", "--repetition-penalty", "1e300"], {}, "--repetition-penalty must be between 0.01 and 100", NOTHING),
    ("temperature-1e-300", ["generate", "--prompt", "hi", "--temperature", "1e-300"], {}, "--temperature must be 0 (greedy) or at least 0.001", NOTHING),
    ("temperature-1e-45", ["generate", "--prompt", "hi", "--temperature", "1e-45"], {}, "--temperature must be 0 (greedy) or at least 0.001", NOTHING),
    ("top-k-10^30", ["generate", "--prompt", "hi", "--top-k", str(10**30)], {}, "--top-k must be between 0 and 16777216", NOTHING),
    ("temperature-arabic-indic", ["generate", "--prompt", "hi", "--temperature", "\u0661.\u0665"], {}, "invalid float value", NOTHING),
    ("seed-negative", ["generate", "--prompt", "hi", "--seed", "-1"], {}, "--seed must be between 0 and 2^64-1", NOTHING),
    ("seed-past-2^64", ["generate", "--prompt", "hi", "--seed", str(2**64)], {}, "--seed must be between 0 and 2^64-1", NOTHING),
    ("max-new-tokens-negative", ["generate", "--prompt", "hi", "--max-new-tokens", "-1"], {}, "--max-new-tokens must be 0 or more", NOTHING),
    ("rounds-zero", ["bench", "--rounds", "0"], {}, "--rounds must be at least 1", NOTHING),
    ("bench-max-new-tokens-0", ["bench", "--max-new-tokens", "0"], {}, "bench --max-new-tokens must be at least 2", NOTHING),
    ("bench-max-new-tokens-1", ["bench", "--max-new-tokens", "1"], {}, "bench --max-new-tokens must be at least 2", NOTHING),
    # load flags
    ("threads-99999", ["plan", "--threads", "99999"], {}, "--threads must be between 1 and", NOTHING),
    ("threads-negative", ["plan", "--threads", "-1"], {}, "--threads must be between 1 and", NOTHING),
    ("context-zero", ["plan", "--context", "0"], {}, "--context must be at least 1", NOTHING),
    ("context-huge", ["plan", "--context", str(10**15)], {}, "--context must be at most", NOTHING),
    ("context-not-a-number", ["plan", "--context", "abc"], {}, "invalid int value", NOTHING),
    ("dtype-unknown", ["plan", "--dtype", "float64"], {}, "invalid choice", NOTHING),
    ("weights-unknown", ["plan", "--weights", "q5"], {}, "--weights 'q5' is not a weights format", NOTHING),
    ("migrate-malformed", ["generate", "--prompt", "hi", "--migrate", "0-9sim2"], {}, "not of the form", NOTHING),
    ("migrate-superscript-step", ["generate", "--prompt", "hi", "--migrate", "0-3:sim1@\u00b2"], {}, "not of the form", NOTHING),
    ("migrate-arabic-indic-step", ["generate", "--prompt", "hi", "--migrate", "0-3:sim1@\u0662"], {}, "not of the form", NOTHING),
    ("context-arabic-indic", ["plan", "--context", "\u0662\u0660"], {}, "invalid int value", NOTHING),
    ("context-underscores", ["plan", "--context", "1_000"], {}, "invalid int value", NOTHING),
    ("port-superscript", ["node", "--port", "7\u00b2"], {}, "invalid int value", NOTHING),
    ("devices-given-twice", ["plan", "--devices", "sim:1GiB", "--devices", "sim:2GiB"], {}, "--devices is given twice", NOTHING),
    ("cuda-graphs-given-twice", ["plan", "--cuda-graphs", "--no-cuda-graphs"], {}, "is given twice", NOTHING),
    ("temperature-given-twice", ["generate", "--prompt", "hi", "--temperature", "0", "--temperature", "1"], {}, "--temperature is given twice", NOTHING),
    ("port-out-of-range", ["node", "--port", "70000"], {}, "--port must be between 0 and 65535", NOTHING),
    ("discover-seconds-nan", ["devices", "--discover-seconds", "nan"], {}, "--discover-seconds must be a finite number", NOTHING),
    ("token-file-dev-zero", ["node", "--devices", "sim:1GiB", "--no-advertise", "--token-file", "/dev/zero"], {}, "is a device or socket, not a regular file", NOTHING),
    ("token-file-big", ["node", "--devices", "sim:1GiB", "--no-advertise", "--token-file", "{big-token}"], {}, TOKEN_FILE_LIMIT, NOTHING),
    ("token-file-fifo", ["node", "--devices", "sim:1GiB", "--no-advertise", "--token-file", "{fifo}"], {}, "is a FIFO, not a regular file", NOTHING),
    ("token-file-folder", ["node", "--devices", "sim:1GiB", "--no-advertise", "--token-file", "/"], {}, "is a folder, not a regular file", NOTHING),
    ("api-key-file-fifo", ["serve", "--port", "0", "--api-key-file", "{fifo}"], {}, "is a FIFO, not a regular file", NOTHING),
    ("token-file-missing", ["node", "--devices", "sim:1GiB", "--no-advertise", "--token-file", "/no/such/token"], {}, "cannot be read", NOTHING),
    # environment variables: the same sentence path as flags
    ("VRM_CONTEXT=abc", ["plan"], {"VRM_CONTEXT": "abc"}, "VRM_CONTEXT must be a whole number", NOTHING),
    ("VRM_CONTEXT=0", ["plan"], {"VRM_CONTEXT": "0"}, "--context must be at least 1", NOTHING),
    ("VRM_THREADS=x", ["plan"], {"VRM_THREADS": "x"}, "VRM_THREADS must be a whole number", NOTHING),
    ("VRM_THREADS=100000", ["plan"], {"VRM_THREADS": "100000"}, "--threads must be between 1 and", NOTHING),
    ("VRM_NODE_PORT=abc", ["node"], {"VRM_NODE_PORT": "abc"}, "VRM_NODE_PORT must be a whole number", NOTHING),
    ("VRM_DISCOVER_SECONDS=abc", ["devices"], {"VRM_DISCOVER_SECONDS": "abc"}, "VRM_DISCOVER_SECONDS must be a number", NOTHING),
    ("VRM_DISCOVER_SECONDS=nan", ["plan", "--devices", "cpu,discover"], {"VRM_DISCOVER_SECONDS": "nan"}, "VRM_DISCOVER_SECONDS must be a finite number", NOTHING),
    ("VRM_DISCOVER_SECONDS=999999", ["plan", "--devices", "cpu,discover"], {"VRM_DISCOVER_SECONDS": "999999"}, "VRM_DISCOVER_SECONDS must be more than 0 and at most 600", NOTHING),
    ("VRM_DISCOVER_SECONDS=999999-devices", ["devices", "--discover"], {"VRM_DISCOVER_SECONDS": "999999"}, "VRM_DISCOVER_SECONDS must be more than 0 and at most 600", NOTHING),
    ("VRM_CONTEXT=arabic-indic", ["plan"], {"VRM_CONTEXT": "\u0662\u0660"}, "VRM_CONTEXT must be a whole number", NOTHING),
    ("VRM_CACHE_DIR-too-long", ["plan"], {"VRM_CACHE_DIR": "/tmp/" + "c" * 300}, "cannot be used: File name too long", NOTHING),
    ("VRM_CONFIG-a-fifo", ["plan"], {"VRM_CONFIG": "{fifo}"}, "the config file", NOTHING),
    ("VRM_CACHE_DIR-a-file", ["plan"], {"VRM_CACHE_DIR": "{big-token}"}, "is a file, not a folder", NOTHING),
    ("VRM_DEVICES=sim:0x1GiB", ["plan"], {"VRM_DEVICES": "sim:0x1GiB"}, "at least one device", NOTHING),
    ("VRM_DEVICES=gpu", ["plan"], {"VRM_DEVICES": "gpu"}, "not a device", NOTHING),
    ("VRM_WEIGHTS=int3", ["plan"], {"VRM_WEIGHTS": "int3"}, "--weights 'int3' is not a weights format", NOTHING),
    # device specs
    ("sim-99999999999-devices", ["plan", "--devices", "sim:99999999999x1GiB"], {}, "99999999999 devices are more than", NOTHING),
    ("sim-5000-listed", ["plan", "--devices", MANY_SIMS], {}, "5000 devices are more than", NOTHING),
    ("3000-remote-devices", ["plan", "--devices", MANY_NODES], {}, "3001 devices are more than", NOTHING),
    ("sim-size-overflows", ["plan", "--devices", "sim:1" + "0" * 400 + "GiB"], {}, "larger than any device", NOTHING),
    ("sim-zero-devices", ["plan", "--devices", "sim:0x1GiB"], {}, "at least one device", NOTHING),
    ("sim-negative-size", ["plan", "--devices", "sim:-1GiB"], {}, "must be positive", NOTHING),
    ("sim-no-size", ["plan", "--devices", "sim:3x"], {}, "needs a size", NOTHING),
    ("sim-unknown-unit", ["plan", "--devices", "sim:2xTB"], {}, "is not a size", NOTHING),
    ("device-twice", ["plan", "--devices", "cpu,cpu"], {}, "listed twice", NOTHING),
    ("remote-malformed", ["plan", "--devices", "cpu,node:host/sim0"], {}, "is not a remote device", NOTHING),
    ("device-unknown", ["plan", "--devices", "gpu"], {}, "not a device", NOTHING),
    ("sim-arabic-indic-count", ["plan", "--devices", "sim:\u0662x1GiB"], {}, "is not a size", NOTHING),
    ("sim-arabic-indic-size", ["plan", "--devices", "sim:\u0661GiB"], {}, "is not a size", NOTHING),
    ("devices-with-spaces", ["plan", "--devices", "  sim:  2 x 1 GiB  "], {}, "holds spaces", NOTHING),
    ("remote-port-superscript", ["plan", "--devices", "cpu,node:127.0.0.1:7\u00b2/sim0"], {}, "is not a remote device", NOTHING),
    # prompts
    ("raw-empty-prompt", ["generate", "--raw", "--prompt", ""], {}, "the prompt is empty", NOTHING),
    ("prompt-not-utf8", ["generate", "--prompt", "caf\udce9"], {}, "--prompt is not valid UTF-8", NOTHING),
    ("bench-prompt-not-utf8", ["bench", "--prompt", "\udcff"], {}, "--prompt is not valid UTF-8", NOTHING),
    # model files (made by the `bad_models` fixture; {name} is replaced by its path)
    ("model-missing", ["plan", "--model", "/no/such/model.gguf"], {}, "does not exist", CONFIG),
    ("gguf-empty", ["plan", "--model", "{empty.gguf}"], {}, "cut short inside its GGUF header", CONFIG),
    ("gguf-cut-in-fixed-header", ["plan", "--model", "{cut-12.gguf}"], {}, "cut short inside its GGUF header", CONFIG),
    ("gguf-cut-in-metadata", ["plan", "--model", "{cut-20000.gguf}"], {}, "it is cut short", CONFIG),
    ("gguf-cut-in-tensor-table", ["plan", "--model", "{cut-100.gguf}"], {}, "cut short or damaged", CONFIG),
    ("gguf-absurd-tensor-count", ["plan", "--model", "{absurd.gguf}"], {}, "claims 1000000000000000 tensors", CONFIG),
    ("gguf-not-gguf", ["plan", "--model", "{text.gguf}"], {}, "is not a GGUF file", CONFIG),
    ("gguf-unknown-version", ["plan", "--model", "{version-9.gguf}"], {}, "GGUF version 9", CONFIG),
    ("config-not-json", ["plan", "--model", "{bad-json}"], {}, "cannot be read", CONFIG),
    ("config-a-list", ["plan", "--model", "{list-json}"], {}, "cannot be read", CONFIG),
    ("config-unknown-type", ["plan", "--model", "{unknown-type}"], {}, "cannot be read", CONFIG),
    ("folder-without-config", ["plan", "--model", "{no-config}"], {}, "has no config.json", CONFIG),
    ("model-path-too-long", ["plan", "--model", "/tmp/" + "m" * 5000], {}, "cannot be used: File name too long", CONFIG),
    ("gguf-path-too-long", ["plan", "--model", "/tmp/" + "m" * 5000 + ".gguf"], {}, "cannot be used: File name too long", CONFIG),
    ("gguf-a-fifo", ["plan", "--model", "{fifo.gguf}"], {}, "is not a regular file", CONFIG),
    ("gguf-cut-in-tensor-data", ["plan", "--model", "{cut-data.gguf}"], {}, "is cut short or damaged", CONFIG),
    ("gguf-tensor-count-0", ["plan", "--model", "{tensors-0.gguf}"], {}, "claims 0 tensors", CONFIG),
    ("gguf-tensor-count-minus-1", ["plan", "--model", "{tensors-minus-1.gguf}"], {}, "claims -1 tensors", CONFIG),
    ("config-fifo", ["plan", "--model", "{fifo-config}"], {}, "is a FIFO, not a regular file", CONFIG),
    ("config-nested-100000-deep", ["plan", "--model", "{nested}"], {}, "its config.json is nested too deeply", CONFIG),
    ("config-heads-0", ["plan", "--model", "{heads-0}"], {}, "num_attention_heads in its config.json must be between 1 and", CONFIG),
    ("config-layers-negative", ["plan", "--model", "{layers-negative}"], {}, "num_hidden_layers in its config.json must be between 1 and", CONFIG),
    ("config-layers-huge", ["plan", "--model", "{layers-huge}"], {}, "num_hidden_layers in its config.json must be between 1 and 1024", CONFIG),
    ("config-hidden-big", ["plan", "--model", "{hidden-big}"], {}, "hidden_size in its config.json must be a whole number, not 'big'", CONFIG),
    ("config-hidden-0", ["plan", "--model", "{hidden-0}"], {}, "hidden_size in its config.json must be between 1 and", CONFIG),
    ("config-hidden-true", ["plan", "--model", "{hidden-true}"], {}, "hidden_size in its config.json must be a whole number", CONFIG),
    ("config-kv-heads-not-dividing", ["plan", "--model", "{kv-heads-3}"], {}, "is not divisible by num_key_value_heads 3", CONFIG),
    ("config-positions-1", ["plan", "--model", "{positions-1}", "--context", "128"], {}, "--context 128 is longer than model", CONFIG),
    ("folder-without-weights", ["generate", "--model", "{no-weights}", "--prompt", "hi"], {}, "has no weights", CONFIG),
    ("safetensors-cut-short", ["generate", "--model", "{cut-weights}", "--prompt", "hi"], {}, "is cut short or damaged", CONFIG),
    ("safetensors-garbage", ["generate", "--model", "{garbage-weights}", "--prompt", "hi"], {}, "is cut short or not a safetensors file", CONFIG),
    ("safetensors-header-not-json", ["generate", "--model", "{header-not-json}", "--prompt", "hi"], {}, "its header is not valid JSON", CONFIG),
    ("weights-of-the-wrong-shape", ["generate", "--model", "{wrong-shape}", "--prompt", "hi"], {}, "weights do not match its config.json", CONFIG),
]
# Cases that load a tiny model's config and time its devices run on two small simulated devices.
TINY_LOAD = ["--devices", "sim:2x1GiB", "--context", "128"]


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, tiny_model_dir) -> dict[str, str]:
    """Damaged copies of the bundled GGUF and broken model folders, by name."""
    folder = tmp_path_factory.mktemp("bad-models")
    gguf = sources.bundled_model_path().read_bytes()[: 4 << 20]
    files = {
        "empty.gguf": b"",
        "cut-12.gguf": gguf[:12],
        "cut-100.gguf": gguf[:100],
        "cut-20000.gguf": gguf[:20000],
        "absurd.gguf": gguf[:8] + struct.pack("<Q", 10**15) + gguf[16:],
        "text.gguf": b"hello, this is not a model\n" * 10,
        "version-9.gguf": gguf[:4] + struct.pack("<I", 9) + gguf[8:],
    }
    paths = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        paths[name] = str(folder / name)
    files.update({"tensors-0.gguf": gguf[:8] + struct.pack("<Q", 0) + gguf[16:],
                  "tensors-minus-1.gguf": gguf[:8] + struct.pack("<q", -1) + gguf[16:],
                  "big-token": b"x" * 5000})
    whole = sources.bundled_model_path().read_bytes()
    files["cut-data.gguf"] = whole[: len(whole) - 5_000_000]  # header and table whole, the last tensors gone
    for name in ("tensors-0.gguf", "tensors-minus-1.gguf", "big-token", "cut-data.gguf"):
        (folder / name).write_bytes(files[name])
        paths[name] = str(folder / name)
    for name in ("fifo", "fifo.gguf"):
        os.mkfifo(folder / name)
        paths[name] = str(folder / name)
    for name, config in {"bad-json": "{oops", "list-json": "[]", "unknown-type": '{"model_type": "nonsense"}',
                         "no-config": None, "nested": "[" * 100_000 + "]" * 100_000}.items():
        (folder / name).mkdir()
        if config is not None:
            (folder / name / "config.json").write_text(config)
        paths[name] = str(folder / name)
    (folder / "fifo-config").mkdir()
    os.mkfifo(folder / "fifo-config" / "config.json")
    paths["fifo-config"] = str(folder / "fifo-config")
    tiny = Path(tiny_model_dir)
    config = json.loads((tiny / "config.json").read_text())
    for name, change in {"heads-0": {"num_attention_heads": 0}, "layers-negative": {"num_hidden_layers": -1},
                         "layers-huge": {"num_hidden_layers": 10**7}, "hidden-big": {"hidden_size": "big"},
                         "hidden-0": {"hidden_size": 0}, "hidden-true": {"hidden_size": True},
                         "kv-heads-3": {"num_key_value_heads": 3}, "positions-1": {"max_position_embeddings": 1},
                         "wrong-shape": {"intermediate_size": 96}}.items():
        shutil.copytree(tiny, folder / name)
        (folder / name / "config.json").write_text(json.dumps({**config, **change}))
        paths[name] = str(folder / name)
    weights = (tiny / "model.safetensors").read_bytes()
    header_length = int.from_bytes(weights[:8], "little")
    for name, data in {"no-weights": None, "cut-weights": weights[: len(weights) // 2],
                       "garbage-weights": bytes(range(256)) * 64,
                       "header-not-json": weights[:8] + b"{" * header_length + weights[8 + header_length:]}.items():
        shutil.copytree(tiny, folder / name)
        (folder / name / "model.safetensors").unlink()
        if data is not None:
            (folder / name / "model.safetensors").write_bytes(data)
        paths[name] = str(folder / name)
    return paths


@pytest.fixture(autouse=True)
def node_log_as_it_was():
    """`vramancer node` sets up its log (its own handler, no propagation) for the process it
    runs in; run in this process, that must not outlive the case."""
    log = logging.getLogger("vramancer.node")
    saved = (list(log.handlers), log.propagate, log.level)
    yield
    log.handlers[:], log.propagate, log.level = saved[0], saved[1], saved[2]


@pytest.fixture
def tripwires(monkeypatch):
    """Loaders that fail the test if called: `arm("nothing")` forbids reading any model file,
    `arm("config")` forbids reading weights (the config and tokenizer may be read)."""

    def trip(what):
        def loader(*args, **kwargs):
            raise AssertionError(f"{what} was read although the input was already known to be bad")
        return loader

    def arm(allowed: str) -> None:
        if allowed == NOTHING:
            for module in (sources, loading, loader_module, engine_module):
                monkeypatch.setattr(module, "load_config", trip("the model's config"), raising=False)
                monkeypatch.setattr(module, "resolve_model", trip("the model"), raising=False)
            for module in (sources, engine_module):
                monkeypatch.setattr(module, "load_tokenizer", trip("the tokenizer"))
        for module in (loading, engine_module):
            monkeypatch.setattr(module, "load_weights", trip("the weights"))

    return arm


def assert_one_sentence(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("vramancer") and lines[0].rstrip().endswith("."), lines[0]
    return lines[0]


def test_the_table_holds_forty_cases_of_every_kind():
    assert len(CASES) >= 40
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case, argv, env, words, allowed", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_sentence_exit_2_and_nothing_heavy_loads(case, argv, env, words, allowed, bad_models,
                                                                   tripwires, capsys, monkeypatch):
    for name in [n for n in os.environ if n.startswith("VRM_") and n != "VRM_CACHE_DIR"]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    argv = [bad_models[a[1:-1]] if a.startswith("{") and a.endswith("}") else a for a in argv]
    for name, value in env.items():
        if value.startswith("{") and value.endswith("}"):
            monkeypatch.setenv(name, bad_models[value[1:-1]])
    if argv[0] == "generate" and "--model" in argv:
        argv += TINY_LOAD
    tripwires(allowed)
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's own usage errors
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2, err
    line = assert_one_sentence(err)
    assert words in line


def test_a_tokenizer_that_cannot_be_parsed_is_the_model_error_before_weights_load(tiny_model_dir, tmp_path,
                                                                                  tripwires, capsys):
    broken = tmp_path / "broken-tokenizer"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "tokenizer.json").write_text("{broken")
    tripwires(CONFIG)
    status = main(["generate", "--model", str(broken), "--devices", "sim:2x1GiB", "--context", "128", "--prompt", "hi"])
    line = assert_one_sentence(capsys.readouterr().err)
    assert status == 2
    assert "the tokenizer of model" in line and "cannot be read: JSONDecodeError" in line


def test_the_python_api_refuses_the_same_values_with_vramancer_error(tiny_model_dir):
    from vramancer.engine import Engine, LoadOptions, VramancerError

    with pytest.raises(VramancerError, match="--context must be at most"):
        LoadOptions(context=10**15).check()
    with pytest.raises(VramancerError, match="devices are more than"):
        LoadOptions(devices="sim:99999999999x1GiB").check()
    engine = Engine.load(tiny_model_dir, "sim:2x1GiB", context=128)
    try:
        for sampling, words in [({"temperature": float("nan")}, "--temperature must be a finite number"),
                                ({"top_p": float("nan")}, "--top-p must be a finite number"),
                                ({"repetition_penalty": float("inf")}, "--repetition-penalty must be a finite number"),
                                ({"seed": 2**64}, "--seed must be between")]:
            with pytest.raises(VramancerError, match=words.replace("(", r"\(").replace(")", r"\)")):
                engine.generate("hi", max_new_tokens=2, **sampling)
        with pytest.raises(VramancerError, match="the prompt is empty"):
            engine.generate("", raw=True, max_new_tokens=2)
        with pytest.raises(VramancerError, match="not valid UTF-8"):
            engine.generate("caf\udce9", max_new_tokens=2)
        with pytest.raises(VramancerError, match="not valid UTF-8"):
            engine.generate([{"role": "user", "content": "\udcff"}], max_new_tokens=2)
        assert engine.generate("hi", max_new_tokens=2).new_tokens >= 1  # and the engine still works
    finally:
        engine.close()


# --- the real path: a process, its argv bytes and its environment --------------------------------


def run_cli(args: list, env: dict[str, str]) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("VRM_") or k == "VRM_CACHE_DIR"}
    full_env.update(env)
    return subprocess.run([sys.executable, "-m", "vramancer", *args], capture_output=True, timeout=120, env=full_env)


@pytest.mark.parametrize("args, env, words", [
    ([b"generate", b"--prompt", b"caf\xe9"], {}, "--prompt is not valid UTF-8"),
    (["plan"], {"VRM_CONTEXT": "abc"}, "VRM_CONTEXT must be a whole number"),
    (["node"], {"VRM_NODE_PORT": "abc"}, "VRM_NODE_PORT must be a whole number"),
    (["plan", "--devices", "sim:99999999999x1GiB"], {}, "devices are more than"),
], ids=["argv-not-utf8", "VRM_CONTEXT=abc", "VRM_NODE_PORT=abc", "sim-99999999999"])
def test_in_a_real_process(args, env, words):
    result = run_cli(args, env)
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, stderr
    assert words in assert_one_sentence(stderr)


@pytest.mark.parametrize("args, words", [
    (["plan", "--devices", "sim:2x1GiB", "--context", "\u0662"], "invalid int value"),
    (["plan", "--devices", "sim:1GiB", "--devices", "sim:2GiB"], "--devices is given twice"),
    (["serve", "--port", "0", "--api-key-file", "{fifo}"], "is a FIFO, not a regular file"),
    (["plan", "--model", "{nested}"], "nested too deeply"),
], ids=["arabic-indic-context", "devices-twice", "api-key-fifo", "config-nested"])
def test_hostile_values_in_a_real_process(args, words, bad_models):
    """Each refused in a fresh process within seconds: nothing waits on the FIFO."""
    args = [bad_models[a[1:-1]] if a.startswith("{") else a for a in args]
    result = run_cli(args, {})
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, stderr
    assert words in assert_one_sentence(stderr)


def test_running_out_of_memory_is_one_sentence(tiny_model_dir):
    """As under `ulimit -v 600000`: address space for imports, not for a model's load."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (600_000 << 10, 600_000 << 10))

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("VRM_") or k in ("VRM_CACHE_DIR", "VRM_KERNEL_DIR")}
    result = subprocess.run([sys.executable, "-m", "vramancer", "generate", "--prompt", "hi", "--devices", "sim:2x1GiB",
                             "--max-new-tokens", "2"], capture_output=True, timeout=120, env=full_env, preexec_fn=limit)
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, stderr
    assert "this process ran out of memory" in assert_one_sentence(stderr)
