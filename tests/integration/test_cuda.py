"""The CUDA path on a real GPU: placement, hand-overs, migration, telemetry, predictions and
the memory model, checked against plain transformers and torch's own counters.

Every test here is marked `cuda` and skipped where torch sees no CUDA device; run them with
`python -m pytest -m cuda tests/integration/test_cuda.py` (benchmarks/gpu_check.sh does). The models are
random-weight Llamas built in-process (benchmarks/random_llama.py): no download, no GGUF.
"""

from __future__ import annotations

import contextlib
import gc
import os

import pytest
import torch

from benchmarks.common import PROMPT
from benchmarks.random_llama import MEDIUM, TINY, build, save

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)"),
]

GPU = "cuda:0"
NEW_TOKENS = 24
# A greedy pick may legitimately flip where the two best logits are this close: the CPU and
# the GPU round differently. Anywhere else, a different token is a bug.
NEAR_TIE = 1e-3


# --- models ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    """Float32, large initial weights: greedy output varies token to token, ties are rare."""
    model, tokenizer = build(TINY, torch.float32, init_range=0.2)
    folder = tmp_path_factory.mktemp("tiny-cuda")
    save(model, tokenizer, folder)
    return str(folder)


@pytest.fixture(scope="module")
def medium_dir(tmp_path_factory) -> str:
    """About 170 M parameters in bfloat16: decode steps long enough to time."""
    model, tokenizer = build(MEDIUM, torch.bfloat16)
    folder = tmp_path_factory.mktemp("medium-cuda")
    save(model, tokenizer, folder)
    return str(folder)


def cuda_context_bytes() -> int:
    """Device memory this process holds beyond torch's allocator: the CUDA context (and
    cuBLAS/cuDNN handles). NVML's per-process figure where it sees us, else the device's
    used memory (which then also counts other processes)."""
    torch.zeros(1, device=GPU)
    torch.cuda.synchronize()
    reserved = torch.cuda.memory_reserved(GPU)
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid() and proc.usedGpuMemory:
                return int(proc.usedGpuMemory) - reserved
    except Exception:  # no NVML, or it cannot see our pid (a container): fall back below
        pass
    free, total = torch.cuda.mem_get_info(GPU)
    return total - free - reserved


def plain_greedy(model_dir: str, dtype: torch.dtype, tokens: int = NEW_TOKENS) -> tuple[list[int], object, dict]:
    """Plain transformers on cuda:0: (new token ids, model, inputs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(GPU).eval()
    inputs = {k: v.to(GPU) for k, v in tokenizer(PROMPT, return_tensors="pt").items()}
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=tokenizer.eos_token_id)
    return out[0, inputs["input_ids"].shape[1]:].tolist(), model, inputs


def assert_same_greedy(got: list[int], want: list[int], reference, inputs: dict) -> None:
    """Same tokens, or a first difference exactly where the reference's two best logits tie."""
    assert len(got) == len(want), f"{len(got)} tokens, expected {len(want)}"
    diverged = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if diverged is None:
        return
    ids = torch.cat([inputs["input_ids"], torch.tensor([want[:diverged]], device=GPU, dtype=torch.long)], dim=1)
    with torch.inference_mode():
        logits = reference(input_ids=ids).logits[0, -1].float()
    top = torch.topk(logits, 2).values
    gap = float(top[0] - top[1])
    assert gap < NEAR_TIE, (
        f"tokens differ at {diverged} where the reference's best logit leads by {gap:.4g} (no tie):\n"
        f"got  {got}\nwant {want}"
    )


def half_the_layers_cap(model_dir: str, dtype: torch.dtype, context: int) -> int:
    """A cap on cuda:0 that holds the embeddings and half the layers, so the planner has to
    put the rest on the CPU. Priced with the planner's own memory model."""
    from vramancer.model.description import profile_model
    from vramancer.model.loading import build_meta_model
    from vramancer.model.source import load_config, resolve_model
    from vramancer.planning.placement import EMBED, device_need
    from vramancer.platforms.devices import CUDA_RESERVE

    meta = build_meta_model(load_config(resolve_model(model_dir)), dtype)
    profile = profile_model(meta, dtype)
    half = profile.num_layers // 2
    need = device_need(profile, [EMBED, *range(half)], CUDA_RESERVE, context).total
    return need + profile.layer_bytes[half] // 2


def load_split(model_dir: str, dtype: str = "float32", context: int = 256):
    from vramancer.engine import Engine

    torch_dtype = getattr(torch, dtype)
    cap = half_the_layers_cap(model_dir, torch_dtype, context)
    engine = Engine.load(model_dir, f"{GPU}={cap},cpu", dtype=dtype, context=context)
    devices = {b.device for b in engine.placement.blocks()}
    assert devices == {GPU, "cpu"}, f"the cap did not force a split: {engine.placement.blocks()}"
    return engine


@contextlib.contextmanager
def beside_plain(model_dir: str):
    """An engine on `cuda:0,cpu` (float32, context 256) and a check that its tokens are
    plain transformers' greedy answer on cuda:0; both models freed afterwards."""
    from vramancer.engine import Engine

    want, reference, inputs = plain_greedy(model_dir, torch.float32)
    engine = Engine.load(model_dir, f"{GPU},cpu", dtype="float32", context=256)
    try:
        yield engine, lambda token_ids: assert_same_greedy(token_ids, want, reference, inputs)
    finally:
        engine.close()
        del reference
        free_gpu()


def expected_device(name: str, placement) -> str:
    """The plan's device for a parameter or buffer of a Llama, from its name alone."""
    if name.startswith(("model.embed_tokens", "model.rotary_emb")):
        return placement.embed
    if name.startswith(("model.norm", "lm_head")):
        return placement.head
    return placement.layer_devices[int(name.split(".")[2])]


def free_gpu() -> None:
    gc.collect()
    torch.cuda.empty_cache()


# --- tests -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape,dtype", [((5 * 2**20 + 3,), torch.uint8), ((1027, 4099), torch.float32),
                                          ((4100, 2051), torch.bfloat16)], ids=["odd-bytes", "f32", "bf16"])
def test_large_tensors_cross_both_ways_in_chunks_unchanged(shape, dtype):
    """Above a MiB, host ⇄ GPU copies go through two pinned buffers in turn; every byte must
    arrive, the last partial chunk included, and a later copy must not overwrite an earlier one."""
    from vramancer.config.device_spec import parse_device_spec
    from vramancer.platforms.devices import resolve_devices
    from vramancer.runtime.transfer import TransferManager

    devices = resolve_devices(parse_device_spec(f"{GPU},cpu"))
    transfer = TransferManager(devices)
    gpu, cpu = devices
    host = (torch.randint(0, 255, shape, dtype=torch.uint8) if dtype == torch.uint8
            else torch.randn(shape, dtype=torch.float32).to(dtype))
    up = transfer.move(host, cpu.name, gpu.name)
    again = transfer.move(host.flip(0).contiguous(), cpu.name, gpu.name)  # reuses the buffers
    assert up.device.type == "cuda" and torch.equal(up.cpu(), host)
    assert torch.equal(again.cpu(), host.flip(0))
    big = torch.cat([up.reshape(-1)] * 4)  # past the pinned limit: the chunked way down
    down = transfer.move(big, gpu.name, cpu.name)
    assert down.device.type == "cpu" and not down.is_pinned()
    assert torch.equal(down, torch.cat([host.reshape(-1)] * 4))
    link = next(l for l in transfer.link_stats() if (l.src, l.dst) == (gpu.name, cpu.name))
    assert link.bytes == big.numel() * big.element_size()


def test_split_decodes_the_same_tokens_as_plain_transformers_on_the_gpu(tiny_dir):
    want, reference, inputs = plain_greedy(tiny_dir, torch.float32)
    engine = load_split(tiny_dir)
    try:
        result = engine.generate(PROMPT, raw=True, max_new_tokens=NEW_TOKENS)
        assert_same_greedy(result.token_ids, want, reference, inputs)
        crossed = {(link.src, link.dst) for link in engine.link_stats() if link.transfers}
        assert (GPU, "cpu") in crossed, f"no hidden state went cuda:0 → cpu: {crossed}"
    finally:
        engine.close()
        del reference
        free_gpu()


def test_every_weight_and_kv_tensor_is_on_its_planned_device(tiny_dir):
    engine = load_split(tiny_dir)
    try:
        placement = engine.placement
        torch_device = {d.name: d.torch_device for d in engine.devices}
        misplaced = [
            f"{name} on {tensor.device}, planned {expected_device(name, placement)}"
            for name, tensor in [*engine.model.named_parameters(), *engine.model.named_buffers()]
            if tensor.device != torch_device[expected_device(name, placement)]
        ]
        assert not misplaced, "\n".join(misplaced)

        kv_misplaced: list[str] = []
        checked: list[int] = []

        def look(step: int) -> None:
            if step != 4:
                return
            for i, entry in enumerate(engine._cache.layers):  # the generation's own KV cache
                want = torch_device[placement.layer_devices[i]]
                for kind, tensor in (("keys", entry.keys), ("values", entry.values)):
                    if tensor.device != want:
                        kv_misplaced.append(f"layer {i} {kind} on {tensor.device}, planned {want}")
                checked.append(i)

        engine.generate(PROMPT, raw=True, max_new_tokens=8, on_step=look)
        assert len(checked) == TINY.layers
        assert not kv_misplaced, "\n".join(kv_misplaced)
    finally:
        engine.close()
        free_gpu()


def test_migration_to_the_cpu_and_back_mid_answer_keeps_the_tokens(tiny_dir):
    with beside_plain(tiny_dir) as (engine, same_as_plain):
        assert set(engine.placement.layer_devices) == {GPU}, engine.placement.blocks()
        first, last = 2, 5
        kv_on: dict[int, set[str]] = {}

        def on_step(step: int) -> None:
            if step == 8:
                engine.migrate(first, last, "cpu", step=step)
            elif step == 16:
                engine.migrate(first, last, GPU, step=step)
            if step in (12, 20):
                kv_on[step] = {str(engine._cache.layers[i].keys.device) for i in range(first, last + 1)}

        result = engine.generate(PROMPT, raw=True, max_new_tokens=NEW_TOKENS, on_step=on_step)
        assert kv_on == {12: {"cpu"}, 20: {GPU}}
        moves = engine.migrations
        assert [(m.src, m.dst) for m in moves] == [(GPU, "cpu"), ("cpu", GPU)]
        assert all(m.bytes > 0 for m in moves)
        same_as_plain(result.token_ids)
        on_gpu = {str(p.device) for p in engine.model.parameters()}
        assert on_gpu == {GPU}, f"parameters left behind after the round trip: {on_gpu}"

        # The same round trip between two answers (outside inference mode), through the
        # staging buffers the hand-overs of the first answer left behind.
        engine.migrate(first, last, "cpu")
        engine.migrate(first, last, GPU)
        again = engine.generate(PROMPT, raw=True, max_new_tokens=NEW_TOKENS)
        same_as_plain(again.token_ids)


def test_a_block_on_the_cpu_gets_both_kinds_of_mask_and_rotary_of_an_alternating_model(tmp_path):
    """Gemma 3 hands its sliding and full layers each their own mask and rotary tensors, made
    beside the embeddings on the GPU: a CPU block holding both kinds needs copies of both."""
    from tests.integration.test_architectures import ALTERNATING, make_byte_tokenizer
    from tests.integration.test_architectures import build as build_tiny

    build_tiny("gemma3_text", ALTERNATING, make_byte_tokenizer(), tmp_path)
    with beside_plain(str(tmp_path)) as (engine, same_as_plain):
        engine.migrate(2, 3, "cpu")  # one sliding and one full layer
        assert engine.placement.layer_devices == [GPU, GPU, "cpu", "cpu"]
        result = engine.generate(PROMPT, raw=True, max_new_tokens=NEW_TOKENS)
        same_as_plain(result.token_ids)


def test_cuda_graph_replays_decode_like_plain_transformers_split_and_across_migrations(tiny_dir):
    """runtime/graphs.py: the GPU layers replay recorded graphs, the CPU layers run
    eagerly, and a migration mid-answer has the moved layers recorded afresh."""
    with beside_plain(tiny_dir) as (engine, same_as_plain):
        engine.migrate(6, 7, "cpu")
        assert engine.cuda_graphs  # --cuda-graphs left to auto: on, with a CUDA device here
        replayed: dict[int, list[int]] = {}

        def on_step(step: int) -> None:
            if step in (6, 14, 22):
                replayed[step] = engine.split.graphs.replayed_layers()
            if step == 10:
                engine.migrate(2, 3, "cpu")
            elif step == 18:
                engine.migrate(2, 7, GPU)

        result = engine.generate(PROMPT, raw=True, max_new_tokens=NEW_TOKENS, on_step=on_step)
        assert engine.split.graphs.refusals() == {}
        assert replayed == {6: [0, 1, 2, 3, 4, 5], 14: [0, 1, 4, 5], 22: list(range(TINY.layers))}
        same_as_plain(result.token_ids)
        # The next answer: the cache is new (a migration let the kept one go), then kept; the
        # one after it replays from its first decode step what the one before recorded.
        engine.generate(PROMPT, raw=True, max_new_tokens=4)
        recorded = engine.split.graphs.recordings
        again = engine.generate(PROMPT, raw=True, max_new_tokens=NEW_TOKENS)
        assert engine.split.graphs.recordings == recorded
        same_as_plain(again.token_ids)


def test_auto_dtype_is_bfloat16_on_a_gpu_that_supports_it(tiny_dir):
    from vramancer.engine import Engine

    engine = Engine.load(tiny_dir, GPU, context=128)
    try:
        expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        assert engine.dtype == expected
        assert {p.dtype for p in engine.model.parameters()} == {expected}
        assert {str(p.device) for p in engine.model.parameters()} == {GPU}
        assert engine.generate(PROMPT, raw=True, max_new_tokens=4).new_tokens == 4
    finally:
        engine.close()
        free_gpu()


def test_telemetry_reads_the_gpu_through_nvml():
    import pynvml

    from vramancer.config.device_spec import parse_device_spec
    from vramancer.engine.telemetry import Telemetry
    from vramancer.platforms.devices import resolve_devices

    device = resolve_devices(parse_device_spec(GPU))[0]
    telemetry = Telemetry(lambda: ([device], [], {}), emit=lambda event: None)
    telemetry.sample()
    samples, _ = telemetry.sample()  # the second: NVML's rates need an interval behind them
    snap = samples.devices[0]

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())

    def reported(read) -> bool:
        try:
            read()
            return True
        except pynvml.NVMLError:
            return False

    assert snap.label == torch.cuda.get_device_name(0)
    assert snap.total == pynvml.nvmlDeviceGetMemoryInfo(handle).total
    assert 0 < snap.free <= snap.total
    missing = [
        field
        for field, read in (
            ("utilization", lambda: pynvml.nvmlDeviceGetUtilizationRates(handle)),
            ("temperature", lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)),
            ("power", lambda: pynvml.nvmlDeviceGetPowerUsage(handle)),
            ("pcie_rx", lambda: pynvml.nvmlDeviceGetPcieThroughput(handle, pynvml.NVML_PCIE_UTIL_RX_BYTES)),
        )
        if reported(read) and getattr(snap, field) is None
    ]
    assert not missing, f"NVML reports {missing} for this GPU but the sample left them empty: {snap}"
    assert snap.temperature is None or 0 < snap.temperature < 120
    assert snap.power is None or 0 < snap.power < 2000


def test_q8_weights_stay_int8_on_the_gpu_and_the_split_answers_like_q8_unsplit(tiny_dir):
    """--weights q8 with a GPU: the GPU holds int8 rows (torchao's kernels there, ours or
    torch's on the CPU), the plan counts what it holds, and half the layers moved to the CPU
    give the unsplit q8 answer (up to a tie between the two best logits: the CPU and the GPU
    round differently)."""
    pytest.importorskip("torchao")
    from vramancer.engine import Engine
    from vramancer.quantization.weights import stored_bytes

    engine = Engine.load(tiny_dir, f"{GPU},cpu", weights="q8", context=256)
    try:
        engine.migrate(0, len(engine.split.layer_modules) - 1, GPU)
        engine.migrate("embed", None, GPU)
        engine.migrate("head", None, GPU)
        want = engine.generate(PROMPT, raw=True, max_new_tokens=NEW_TOKENS).token_ids
        # --cuda-graphs left to auto: the int8 layers replay recorded graphs too.
        graphs = engine.split.graphs
        assert graphs is not None and graphs.refusals() == {}, graphs and graphs.refusals()
        assert graphs.replayed_layers() == list(range(len(engine.split.layer_modules)))
        weight = engine.split.layer_modules[0].mlp.up_proj.weight
        assert weight.qdata.dtype == torch.int8 and weight.qdata.device.type == "cuda", type(weight)
        on_gpu = {id(t): t for m in engine.split.model.modules() for t in m.parameters(recurse=False)
                  if t.device.type == "cuda"}
        need = next(n for n in engine.needs_json() if n["device"] == GPU)
        assert need["weights"] == pytest.approx(sum(stored_bytes(t) for t in on_gpu.values()), rel=0.02)

        half = len(engine.split.layer_modules) // 2
        moved = engine.migrate(half, len(engine.split.layer_modules) - 1, "cpu")
        assert moved.bytes > 0
        got = engine.generate(PROMPT, raw=True, max_new_tokens=NEW_TOKENS).token_ids
        diverged = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        if diverged is not None:  # the unsplit q8 model's two best logits where they part
            engine.migrate(half, len(engine.split.layer_modules) - 1, GPU)
            with torch.inference_mode():
                ids = engine.tokenizer(PROMPT, return_tensors="pt")["input_ids"].to(GPU)
                ids = torch.cat([ids, torch.tensor([want[:diverged]], device=GPU, dtype=torch.long)], dim=1)
                top = torch.topk(engine.split.model(input_ids=ids).logits[0, -1].float(), 2).values
            assert float(top[0] - top[1]) < 0.05, f"q8 split parts from q8 unsplit at {diverged}:\n{got}\n{want}"
    finally:
        engine.close()
        free_gpu()


@pytest.mark.parametrize("split", [False, True], ids=["cuda0", "cuda0+cpu"])
def test_predicted_decode_speed_is_within_25_percent_of_measured(medium_dir, split):
    from vramancer.engine import Engine

    engine = load_split(medium_dir, "bfloat16", 512) if split else Engine.load(medium_dir, GPU, dtype="bfloat16", context=512)
    try:
        predicted = engine.predict().tokens_per_s
        engine.generate(PROMPT, raw=True, max_new_tokens=64)  # warm-up: kernels, cuBLAS handles, clocks
        measured = max(engine.generate(PROMPT, raw=True, max_new_tokens=64).decode_tokens_per_s for _ in range(3))
        ratio = predicted / measured
        print(f"\n{engine.placement.blocks()}: predicted {predicted:.1f} tok/s, measured {measured:.1f} tok/s, ratio {ratio:.3f}")
        assert 0.75 <= ratio <= 1.25, f"predicted {predicted:.1f} tok/s, measured {measured:.1f} tok/s (×{ratio:.2f})"
    finally:
        engine.close()
        free_gpu()


def test_memory_model_matches_the_gpu_peak_within_10_percent(medium_dir):
    """The planner's need for cuda:0 (weights, KV cache for the full context, workspace of a
    full-context prefill, CUDA reserve) against torch's peak while a full-context prompt is
    answered, plus the CUDA context."""
    from vramancer.engine import Engine

    context = 1024
    free_gpu()
    before = torch.cuda.memory_allocated(GPU)
    engine = Engine.load(medium_dir, GPU, dtype="bfloat16", context=context)
    try:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(GPU)  # the profiler's timing runs are not the model's
        prompt = " ".join(f"w{i % 997}" for i in range(context - 4))
        result = engine.generate(prompt, raw=True, max_new_tokens=2)
        assert result.prompt_tokens == context - 4
        peak = torch.cuda.max_memory_allocated(GPU) - before
        context_bytes = cuda_context_bytes()  # after the work: kernels load lazily, on first use
        measured = peak + context_bytes
        need = next(n for n in engine.needs_json() if n["device"] == GPU)
        ratio = need["need"] / measured
        mib = lambda n: f"{n / 2**20:.0f} MiB"  # noqa: E731
        detail = (f"model need {mib(need['need'])} (weights {mib(need['weights'])}, kv {mib(need['kv_cache'])}, "
                  f"workspace {mib(need['workspace'])}, reserve {mib(need['reserve'])}); measured {mib(measured)} "
                  f"(torch peak {mib(peak)}, CUDA context {mib(context_bytes)}, reserved peak "
                  f"{mib(torch.cuda.max_memory_reserved(GPU))}); ratio {ratio:.3f}")
        print("\n" + detail)
        assert 0.9 <= ratio <= 1.1, detail
    finally:
        engine.close()
        free_gpu()
