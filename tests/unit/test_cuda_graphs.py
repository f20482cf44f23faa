"""Decode steps replayed from recorded layers (runtime/graphs.py), checked on the CPU.

CUDA graphs exist only on NVIDIA GPUs (tests/integration/test_cuda.py runs the real ones there). What can
go wrong around them is ours and shows here too: an input not copied into the buffers a
recording reads, a buffer shared wrongly between layers, the warm-up's cache write counted
twice, a recording kept after its layer moved. So these tests record with `RerunRecorder`,
which keeps a graph's contract on the CPU: recording runs the warm-up only (a capture
executes nothing), and each replay recomputes the recorded call on the same input buffers
and writes into the same output tensors.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils import _pytree as pytree
from transformers.cache_utils import DynamicCache, StaticCache

from vramancer.config.errors import VramancerError
from vramancer.config.options import LoadOptions
from vramancer.engine import Engine
from vramancer.engine.loader import use_graphs
from vramancer.model.loading import build_meta_model
from vramancer.model.source import load_config, resolve_model
from vramancer.runtime.graphs import LayerGraphs, is_graphed
from vramancer.scheduling.ragged import RaggedCache

PROMPT = "Tell me about the sea."
TOKENS = 16


gpu = SimpleNamespace(local=True, torch_device=torch.device("cuda:0"))  # a CUDA device as use_graphs sees one


def meta_model(folder: str) -> torch.nn.Module:
    return build_meta_model(load_config(resolve_model(folder)), torch.float32)


class RerunRecorder:
    def __init__(self, fail_on: set[int] = frozenset()):
        self.recordings = 0
        self.replays = 0
        self.fail_on = fail_on  # recordings (counted from 1) that raise, as a capture can

    @staticmethod
    def accepts(device: torch.device) -> bool:
        return True

    def record(self, device, run):
        self.recordings += 1
        if self.recordings in self.fail_on:
            run(warm_up=True)
            raise RuntimeError("operation not permitted when stream is capturing")
        outputs = pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, run(warm_up=True))

        def replay() -> None:
            self.replays += 1
            for held, fresh in zip(pytree.tree_leaves(outputs), pytree.tree_leaves(run(warm_up=False))):
                if isinstance(held, torch.Tensor):
                    held.copy_(fresh)

        return replay, outputs


@pytest.fixture
def engine(tiny_model_dir):
    engine = Engine.load(tiny_model_dir, "sim:3x64MiB", context=256)
    yield engine
    engine.close()


def greedy(engine, **kwargs) -> list[int]:
    return engine.generate(PROMPT, max_new_tokens=TOKENS, **kwargs).token_ids


def test_replayed_layers_decode_the_same_tokens_and_each_layer_is_recorded_once(engine):
    expected = greedy(engine)
    recorder = RerunRecorder()
    engine.split.use_graphs(LayerGraphs(recorder))
    assert all(is_graphed(layer) for layer in engine.split.layer_modules)
    caches = []
    assert greedy(engine, on_step=lambda step: caches.append(engine.cache)) == expected
    assert isinstance(caches[0], StaticCache)
    layers = len(engine.split.layer_modules)
    # The first decode step records every layer; every later one replays them all.
    assert recorder.recordings == layers
    assert recorder.replays == layers * (TOKENS - 1)
    # Between answers the cache stays, held where its layers are, and counted (beside the
    # answer's prefix kept for later requests).
    kept = engine.split.graphs.cache
    assert kept is caches[0]
    assert sum(engine.kv_bytes_by_device().values()) == sum(engine.prefix_cache.bytes_by_layer()) + sum(
        t.numel() * t.element_size() for entry in kept.layers for t in (entry.keys, entry.values))
    # A second answer empties it in place and replays the first answer's recordings.
    caches.clear()
    assert greedy(engine, on_step=lambda step: caches.append(engine.cache)) == expected
    assert caches[0] is kept
    assert recorder.recordings == engine.split.graphs.recordings == layers
    assert recorder.replays == 2 * layers * (TOKENS - 1)
    # A batch's cache takes its place: the kept one and the recordings go.
    engine.cache = DynamicCache(config=engine.model.config)
    assert engine.split.graphs.cache is None and engine.split.graphs.replayed_layers() == []
    engine.cache = None
    assert greedy(engine) == expected
    assert recorder.recordings == 2 * layers


def test_a_lone_request_replays_and_a_second_joining_moves_it_into_the_batch_cache(engine):
    """The scheduler runs a lone request in the kept StaticCache (replayed); when a second one
    joins, the first one's used columns move into the batch's cache and both answer as alone."""
    from vramancer.engine import events as ev

    other = "Hi"
    expected = greedy(engine)
    other_alone = engine.generate(other, max_new_tokens=TOKENS).token_ids
    recorder = RerunRecorder()
    engine.split.use_graphs(LayerGraphs(recorder))
    done = {}
    batch = engine.batch(lambda e: done.__setitem__(e.request_id, e) if isinstance(e, ev.GenerationDone) else None)
    batch.submit(ev.Submit("first", PROMPT, {"max_new_tokens": TOKENS}))
    for _ in range(5):
        batch.step()
    assert isinstance(engine.cache, StaticCache) and recorder.replays > 0
    batch.submit(ev.Submit("second", other, {"max_new_tokens": TOKENS}))
    batch.step()
    assert len(batch.running) == 2 and isinstance(engine.cache, RaggedCache)
    assert engine.split.graphs.cache is None  # the kept cache and its recordings were let go
    while batch.busy:
        batch.step()
    assert list(done["first"].token_ids) == expected
    assert list(done["second"].token_ids) == other_alone


def test_a_migration_mid_answer_records_the_moved_layers_afresh_and_keeps_the_tokens(engine):
    expected = greedy(engine)
    recorder = RerunRecorder()
    engine.split.use_graphs(LayerGraphs(recorder))
    layers = len(engine.split.layer_modules)
    moves = {4: (0, 2, "sim2"), 9: (3, 5, "sim0")}

    def on_step(step: int) -> None:
        if step in moves:
            engine.migrate(*moves.pop(step), step=step)

    assert greedy(engine, on_step=on_step) == expected
    assert not moves
    assert recorder.recordings == 3 * layers  # every rewire drops every recording
    # The cache of that answer went with the first move; the next answer gets a new one.
    assert engine.split.graphs.cache is None
    assert greedy(engine) == expected
    kv_moved = [m for m in engine.migrations if m.step == 9][0]
    # A static cache holds the whole context from the first step: all of it moved.
    assert kv_moved.bytes > sum(engine.profile.layer_bytes[3:6])


def test_a_layer_that_cannot_be_recorded_runs_eagerly_and_the_others_replay(engine):
    expected = greedy(engine)
    recorder = RerunRecorder(fail_on={2})
    graphs = LayerGraphs(recorder)
    engine.split.use_graphs(graphs)
    failed_layer = 1  # the second layer recorded in the first decode step
    replayed = []
    assert greedy(engine, on_step=lambda step: replayed.append(graphs.replayed_layers())) == expected
    layers = len(engine.split.layer_modules)
    assert recorder.recordings == layers
    assert failed_layer not in replayed[-1] and len(replayed[-1]) == layers - 1
    assert "could not be recorded" in graphs.refusals()[failed_layer]


def test_turning_graphs_off_gives_every_layer_its_own_forward_back(engine):
    expected = greedy(engine)
    engine.split.use_graphs(LayerGraphs(RerunRecorder()))
    engine.split.use_graphs(None)
    assert not any(is_graphed(layer) or "forward" in vars(layer) for layer in engine.split.layer_modules)
    caches = []
    assert greedy(engine, on_step=lambda step: caches.append(engine.cache)) == expected
    assert not isinstance(caches[0], StaticCache)


def test_without_a_cuda_device_the_switch_changes_nothing(engine):
    expected = greedy(engine)
    engine.cuda_graphs = True
    assert engine.cuda_graphs
    assert not any(is_graphed(layer) for layer in engine.split.layer_modules)  # sim devices: nothing to record
    caches = []
    assert greedy(engine, on_step=lambda step: caches.append(engine.cache)) == expected
    assert not isinstance(caches[0], StaticCache)  # so no whole-context cache either


@pytest.mark.parametrize("model_type", ["qwen3", "phi3", "gemma3_text", "gpt_oss", "lfm2"])
def test_other_architectures_replay_their_full_attention_layers_with_the_same_tokens(model_type, tmp_path):
    """Gemma 3 and gpt-oss hand sliding and full layers each their own mask (and Gemma 3 its
    own rotary) through the same buffers; LFM2 has convolution layers beside attention. Only
    full-attention layers replay; the answer stays plain transformers'."""
    from tests.integration.test_architectures import (
        MATRIX,
        NEW_TOKENS,
        build,
        make_byte_tokenizer,
        plain_greedy,
    )

    tokenizer = make_byte_tokenizer()
    model = build(model_type, MATRIX[model_type], tokenizer, tmp_path)
    expected = plain_greedy(model, tokenizer)
    engine = Engine.load(str(tmp_path), "sim:3x1GiB", context=64)
    try:
        graphs = LayerGraphs(RerunRecorder())
        engine.split.use_graphs(graphs)
        replayed = []
        answer = engine.generate(PROMPT, raw=True, max_new_tokens=NEW_TOKENS,
                                 on_step=lambda step: replayed.append(graphs.replayed_layers()))
        assert answer.token_ids == expected
        config = model.config.get_text_config()
        full = [i for i, kind in enumerate(getattr(config, "layer_types", None) or ["full_attention"] * 4)
                if kind == "full_attention"]
        assert replayed[-1] == full and not graphs.refusals()
    finally:
        engine.close()


def test_a_model_transformers_cannot_run_from_a_static_cache_is_refused_in_one_sentence(tmp_path, capsys):
    from tests.integration.test_architectures import MATRIX, build, make_byte_tokenizer
    from vramancer.cli import main

    build("gpt_neo", MATRIX["gpt_neo"], make_byte_tokenizer(), tmp_path)  # local attention: static cache differs
    code = main(["generate", "--model", str(tmp_path), "--devices", "sim:2x1GiB", "--prompt", "hi", "--raw",
                 "--max-new-tokens", "4", "--context", "64", "--cuda-graphs"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        "vramancer: gpt_neo models cannot run from the static KV cache that CUDA graphs replay "
        "(transformers does not support it for them); run with --no-cuda-graphs."]
    # Left to choose (auto), the same model runs eagerly rather than being refused.
    assert use_graphs("auto", meta_model(str(tmp_path)), [gpu]) is False


def test_auto_replays_where_a_cuda_device_is_and_the_switch_and_variable_say_otherwise(tiny_model_dir, monkeypatch):
    from vramancer.cli import main
    from vramancer.config.validation import env_cuda_graphs

    engine = Engine.load(tiny_model_dir, "sim:2x64MiB", context=256)
    try:
        sims = engine.devices
        assert not engine.cuda_graphs  # no CUDA device: nothing to replay
        assert use_graphs("auto", engine.model, [*sims, gpu]) is True
        assert use_graphs("auto", engine.model, sims) is False
        assert use_graphs("off", engine.model, [*sims, gpu]) is False
        assert use_graphs("on", engine.model, sims) is True
    finally:
        engine.close()
    for text, mode in (("1", "on"), ("0", "off"), ("auto", "auto"), (" OFF ", "off")):
        monkeypatch.setenv("VRM_CUDA_GRAPHS", text)
        assert env_cuda_graphs() == mode
    monkeypatch.setenv("VRM_CUDA_GRAPHS", "maybe")
    with pytest.raises(VramancerError, match="VRM_CUDA_GRAPHS 'maybe' is not a choice; choose auto, on or off."):
        env_cuda_graphs()
    assert main(["plan", "--model", tiny_model_dir, "--devices", "sim:2x64MiB"]) == 2
    monkeypatch.delenv("VRM_CUDA_GRAPHS")
    with pytest.raises(VramancerError, match="--cuda-graphs 'sometimes' is not a choice"):
        LoadOptions(cuda_graphs="sometimes").check()


def test_the_profiler_times_decode_steps_replayed_when_graphs_will_replay_them(tiny_model_dir):
    """A GPU layer is timed the way it will run: under graphs, from recordings on a static cache."""
    from vramancer.profiling.timing import _time_real_layers

    from vramancer.model.description import describe_model

    meta = meta_model(tiny_model_dir)
    config = meta.config
    recorder = RerunRecorder()
    graphs = LayerGraphs(recorder)
    timings = _time_real_layers(describe_model(meta, torch.float32), torch.device("cpu"), torch.float32, "host CPU",
                                graphs=graphs)
    layers = config.num_hidden_layers
    # Recorded once per decode measure (short and long cache), replayed at every timed step.
    assert recorder.recordings == 2 * layers and recorder.replays >= 2 * 7 * layers
    assert timings.timed_as == "host CPU, CUDA graphs" and timings.layer_decode_s > 0
    assert not graphs.installed() and graphs.cache is None  # the timing model's layers let go


@pytest.mark.parametrize("switch, on", [([], False), (["--cuda-graphs"], True), (["--no-cuda-graphs"], False)])
def test_plan_says_whether_graphs_will_replay(tiny_model_dir, capsys, switch, on):
    import json

    from vramancer.cli import main

    assert main(["plan", "--model", tiny_model_dir, "--devices", "sim:2x64MiB", "--json", *switch]) == 0
    assert json.loads(capsys.readouterr().out)["cuda_graphs"] is on  # auto, with no CUDA device: off
