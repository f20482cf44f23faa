"""Measured costs: how long each part of a model takes on each device, and each link.

A copy of the model cut to its first few layers (built by transformers from the real config,
layer types and windows cut with it) is timed on each device at decode shape (one token
against a KV cache) for two cache lengths, and at prefill shape; hooks split each pass into
what runs before the decoder stack, the stack, and the head. Links are timed with
hidden-state sized hand-overs, and the host's own cost of one `generate` step with a one-layer
copy of the model. Timing does not depend on weight values, so all of this runs from the
config, before any weights load. A model that cannot be timed is priced from its bytes.

At scale the copy stays small: its vocabulary is cut to the rows that fit HEAD_SLICE_BYTES
(an embedding lookup costs the same whatever the table's length; the head's matrix-vector
product grows with its rows, so its time is scaled up to the whole vocabulary), and a model
whose one layer is bigger than TIMED_LAYER_BYTES, built on the host, is priced from its
bytes rather than built: `plan` of a 70B config reads no more than a few GiB.

Simulated devices compute on the host CPU: they are timed as the CPU, and say so.
Results are cached per (model, device, dtype) under the user cache directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import torch

from vramancer.model.architecture import cut_config, layers_of_every_kind
from vramancer.model.description import ModelDescription
from vramancer.planning.pricing import (
    LONG_KV,
    SHORT_KV,
    DeviceTimings,
    LinkTimings,
    Timings,
)
from vramancer.platforms.devices import Device

from vramancer.runtime.transfer import TransferManager

log = logging.getLogger(__name__)

PROFILE_VERSION = 4
PREFILL_TOKENS = 64
COLD_STACK_BYTES = 256 * 1024 * 1024  # more than any CPU cache: layers timed in a stack this big
# A GPU is kept busy decoding this long before it is timed. Timed cold, an H200 took 3.5 ms a
# layer that it decodes in 0.56 ms a few seconds later (clocks, lazily loaded kernels, the
# allocator's pool): predictions came out 3-5x pessimistic.
WARM_GPU_S = 1.0
# The timed copy's embedding table and head hold at most this many bytes each (more than a
# CPU's cache, so the head's rows stream from memory as the full head's do).
HEAD_SLICE_BYTES = 64 * 1024 * 1024
# A layer bigger than this, in the float form the copy is built in on the host, is priced from
# its bytes instead: timing it would take that much host memory (a 70B layer is 3.3 GiB in float32).
TIMED_LAYER_BYTES = 1 << 30


def cache_dir() -> Path:
    """The one user cache folder (VRM_CACHE_DIR overrides it), shared with the weights cache."""
    from vramancer.config.paths import cache_root

    return cache_root()


def _median_time(fn: Callable[[], object], sync: Callable[[], None], repeat: int = 15, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    # The least of several repeats: what the device can do, with the noise of other work removed.
    return min(times)


def _syncer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_device(description: ModelDescription, torch_device: torch.device, dtype: torch.dtype, label: str,
                weights: str = "native", graphs: bool = False) -> DeviceTimings:
    """Timings of real layers of this model's architecture on one device, with `weights` as the
    load will hold them (quantized weights run other kernels at other speeds), and decode
    steps replayed from CUDA graphs if `graphs` and the device is a GPU. A model that cannot
    be timed (an architecture whose layers refuse our probe) is priced from its bytes instead,
    with a warning: timing only guides placement, so it never stops a load."""
    from vramancer.runtime.graphs import CudaGraphRecorder, LayerGraphs

    config = description.config
    replay = LayerGraphs() if graphs and CudaGraphRecorder.accepts(torch_device) else None
    too_big = _untimed_layer_size(description, torch_device, dtype, weights)
    if too_big:
        log.info("a layer of %s is %s on the host, more than timing builds; pricing it from its bytes on %s",
                 getattr(config, "model_type", "the model"), too_big, label)
        return _priced_from_bytes(description, torch_device, dtype, label,
                                  why=f"a layer of {too_big} is more than timing builds")
    try:
        return _time_real_layers(description, torch_device, dtype, label, weights, replay)
    except Exception as exc:  # noqa: BLE001 - any failure to time falls back to bytes
        log.warning("could not time %s on %s (%s: %s); pricing it from its bytes instead",
                    getattr(config, "model_type", "the model"), label, type(exc).__name__, _first_line(exc))
        return _priced_from_bytes(description, torch_device, dtype, label)


def _untimed_layer_size(description: ModelDescription, torch_device: torch.device, dtype: torch.dtype,
                        weights: str) -> str:
    """'' where one layer of the model can be timed; else its size in the float form it would
    be built in on the host (quantized weights are built in float first, on the host)."""
    from vramancer.config.units import format_bytes

    if torch_device.type != "cpu" and weights == "native":
        return ""  # built on the device itself, whose memory the plan is about
    largest = _float_layer_bytes(description, dtype)
    return format_bytes(largest) if largest > TIMED_LAYER_BYTES else ""


def _float_layer_bytes(description: ModelDescription, dtype: torch.dtype) -> int:
    """The largest decoder layer's weights in `dtype`, counted from the described modules'
    shapes (the profile counts them as the load holds them, quantized or not)."""
    size = torch.empty((), dtype=dtype).element_size()
    return max(sum(t.numel() for t in layer.parameters()) for layer in description.architecture.layers) * size


def timing_config(config, count: int, weight_bytes: int = 4):
    """The model's config cut to its first `count` layers and, where its embedding table or head
    would be bigger than HEAD_SLICE_BYTES at `weight_bytes` a weight (as the timed copy holds
    it: 1 for the int8 head of quantized weights), to as many vocabulary rows as fit (never
    fewer than its special tokens need). The second value is how many times the real head's
    rows outnumber the copy's: the head's time is scaled by it."""
    small = cut_config(config, count)
    vocab = getattr(small, "vocab_size", None)
    hidden = getattr(small, "hidden_size", None)
    if not isinstance(vocab, int) or not isinstance(hidden, int) or hidden <= 0:
        return small, 1.0
    rows = max(HEAD_SLICE_BYTES // (hidden * weight_bytes), _special_token_rows(small))
    if rows >= vocab:
        return small, 1.0
    small.vocab_size = rows
    return small, vocab / rows


def _special_token_rows(config) -> int:
    """One more than the largest special token id the config names (a padding row must exist)."""
    ids = []
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        value = getattr(config, key, None)
        ids.extend(value if isinstance(value, (list, tuple)) else [value])
    return max((i for i in ids if isinstance(i, int)), default=-1) + 1


class _Segments:
    """Wall time of the three parts of one forward pass, read from hooks: what runs before the
    decoder stack, the stack, and what runs after it (final norm and head)."""

    def __init__(self, model: torch.nn.Module, arch, sync: Callable[[], None]):
        self.marks: dict[str, float] = {}

        def mark(name: str):
            def hook(*_):
                sync()
                self.marks[name] = time.perf_counter()
            return hook

        self.handles = [model.register_forward_pre_hook(mark("start")),
                        arch.layers[0].register_forward_pre_hook(mark("stack")),
                        arch.layers[-1].register_forward_hook(mark("after")),
                        model.register_forward_hook(mark("end"))]

    def run(self, fn: Callable[[], object], repeat: int, warmup: int = 2) -> tuple[float, float, float]:
        """(before, stack, after) seconds of `fn`, each the least over `repeat` runs."""
        for _ in range(warmup):
            fn()
        best = [float("inf")] * 3
        for _ in range(repeat):
            fn()
            m = self.marks
            for i, took in enumerate((m["stack"] - m["start"], m["after"] - m["stack"], m["end"] - m["after"])):
                best[i] = min(best[i], took)
        return best[0], best[1], best[2]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _time_real_layers(description: ModelDescription, torch_device: torch.device, dtype: torch.dtype, label: str,
                      weights: str = "native", graphs=None) -> DeviceTimings:
    """`graphs`: a LayerGraphs that replays the timed decode steps, as the load will."""
    from transformers import AutoModelForCausalLM, DynamicCache, StaticCache

    config, arch = description.config, description.architecture
    sync = _syncer(torch_device)
    # A real pass streams every layer's weights from memory; one layer timed over and over
    # would sit in the CPU's cache and look several times faster than it is. So time a stack
    # of distinct layers larger than any cache, and divide.
    layer_bytes = max(description.profile.layer_bytes)
    count = max(layers_of_every_kind(config), min(len(arch.layers), -(-COLD_STACK_BYTES // max(layer_bytes, 1))))
    # The model's first `count` layers, as the model builds them (layer types, windows, dense
    # or expert MLPs), with its own embeddings, masks, positions and head around them (cut to a
    # slice of the vocabulary at scale).
    head_weight_bytes = torch.empty((), dtype=dtype).element_size() if weights == "native" else 1
    small_config, head_scale = timing_config(config, count, head_weight_bytes)
    if weights == "native":
        with torch.device(torch_device):
            model = AutoModelForCausalLM.from_config(small_config, dtype=dtype).eval()
    else:  # quantized on the host as the load does it, with the same kernels and fused layers
        model = _quantized_copy(small_config, dtype, weights).to(torch_device)
    small = arch.bind(model)  # the description's parts, found in the cut copy
    segments = _Segments(model, small, sync)
    vocab = getattr(small_config, "vocab_size", None) or small.vocab_size  # the cut copy's rows, not the model's
    try:
        with torch.inference_mode():
            if torch_device.type == "cuda":
                _keep_decoding(model, vocab, torch_device, sync, WARM_GPU_S)
            if graphs is not None:  # after the warm-up, which is eager, as prompts are
                for i, layer in enumerate(small.layers):
                    graphs.install(layer, i)

            def decode_cost(kv_length: int) -> tuple[float, float, float]:
                if graphs is not None:  # a cache the recordings can write into, room for the timed steps
                    cache = StaticCache(config=model.config, max_cache_len=kv_length + 16)
                    model(torch.randint(0, vocab, (1, kv_length), device=torch_device), cache=cache, use_cache=True)
                else:
                    cache = DynamicCache(config=model.config)
                    model(torch.randint(0, vocab, (1, SHORT_KV), device=torch_device), cache=cache, use_cache=True)
                    _extend_cache(cache, kv_length - SHORT_KV)
                token = torch.randint(0, vocab, (1, 1), device=torch_device)
                # Each step adds one token to the cache: a handful of steps barely moves its length.
                return segments.run(lambda: model(token, cache=cache, use_cache=True), repeat=7)

            # Learned position tables (GPT-2, OPT) end at max_position_embeddings.
            # (less the tokens the timed steps add to the cache).
            long_kv = min(LONG_KV, (getattr(small_config, "max_position_embeddings", None) or 2 * LONG_KV) - SHORT_KV)
            embed_s, short, head_s = decode_cost(SHORT_KV)
            long = decode_cost(long_kv)[1] if long_kv > SHORT_KV else short
            prompt = torch.randint(0, vocab, (1, min(PREFILL_TOKENS, long_kv)), device=torch_device)
            _, prefill, head_prefill = segments.run(lambda: model(prompt, use_cache=False), repeat=3, warmup=1)
    finally:
        segments.remove()
        if graphs is not None:
            for layer in small.layers:
                graphs.remove(layer)
            graphs.drop()
    return DeviceTimings(
        layer_decode_s=short / count,
        layer_decode_per_kv_s=max(long - short, 0.0) / count / max(long_kv - SHORT_KV, 1),
        layer_prefill_per_token_s=prefill / count / prompt.shape[1],
        embed_s=embed_s,
        # The final norm is timed with the head and scaled with it: a small share of it.
        head_s=head_s * head_scale,
        head_prefill_per_token_s=head_prefill * head_scale / prompt.shape[1],
        timed_as=label + (", CUDA graphs" if graphs is not None else "")
        + (f", head timed on 1/{head_scale:.0f} of its rows" if head_scale > 1 else ""),
    )


def _quantized_copy(config, dtype: torch.dtype, weights: str) -> torch.nn.Module:
    """The cut copy under quantized `weights`, each weight made from random rows and quantized
    a chunk at a time as the streaming load does it (model/loading.py): the float copy of a
    stack of quantized layers (1.4 GB for a 0.5B's 24 layers under q4) never exists whole.
    Where weights cannot be made one at a time (torchao's int4 layout), the float copy is
    quantized whole."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from vramancer.quantization.weights import (
        convert_weight,
        finish_quantized,
        quantize_model,
        streams,
        weight_formats,
    )

    if not streams(weights, dtype):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval().requires_grad_(False)
        quantize_model(model, weights)
        return model
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    model.eval().requires_grad_(False)
    table, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = table is not None and head is not None and head.weight is table.weight
    formats = weight_formats(model, weights)
    generator = torch.Generator().manual_seed(0)
    for name, param in list(model.named_parameters()):
        shape = tuple(param.shape)
        if len(shape) >= 2:  # timing does not depend on the values: random rows at a weight's usual scale
            value = convert_weight(lambda first, end, shape=shape: torch.randn(end - first, *shape[1:],
                                                                                generator=generator) * 0.02,
                                   shape, formats.get(name, "native"), dtype)
        else:
            value = torch.ones(shape, dtype=dtype)
        path, _, leaf = name.rpartition(".")
        owner = model.get_submodule(path) if path else model
        owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    if tied:
        head.weight = table.weight
    finish_quantized(model, weights)
    return model


def _keep_decoding(model, vocab: int, torch_device: torch.device, sync: Callable[[], None], seconds: float) -> None:
    """Short answers, one after another, for `seconds`: the work being timed next."""
    from transformers import DynamicCache

    prompt = torch.randint(0, vocab, (1, SHORT_KV), device=torch_device)
    token = torch.randint(0, vocab, (1, 1), device=torch_device)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        cache = DynamicCache(config=model.config)
        model(prompt, cache=cache, use_cache=True)
        for _ in range(32):
            model(token, cache=cache, use_cache=True)
        sync()


def _extend_cache(cache, tokens: int) -> None:
    """Add `tokens` random tokens to every attention layer of a filled cache, so a decode step
    can be timed against a long cache without a long prefill. Layers of other kinds are left
    as the prefill made them."""
    if tokens <= 0:
        return
    for entry in cache.layers:
        keys, values = getattr(entry, "keys", None), getattr(entry, "values", None)
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor) or keys.dim() != 4:
            continue
        more_keys = torch.randn(*keys.shape[:2], tokens, keys.shape[3], dtype=keys.dtype, device=keys.device)
        more_values = torch.randn(*values.shape[:2], tokens, values.shape[3], dtype=values.dtype, device=values.device)
        entry.update(more_keys, more_values)


def _priced_from_bytes(description: ModelDescription, torch_device: torch.device, dtype: torch.dtype, label: str,
                       why: str = "") -> DeviceTimings:
    """Decode costs from bytes read per token over the rate the device multiplies a matrix of
    HEAD_SLICE_BYTES by a vector (what a decode step does with each weight): a decode step
    streams each layer's weights (and its KV cache) once."""
    profile = description.profile  # in the form the load holds the weights in
    sync = _syncer(torch_device)
    size = torch.empty((), dtype=dtype).element_size()
    matrix = torch.rand(HEAD_SLICE_BYTES // (1024 * size), 1024, dtype=dtype, device=torch_device)
    vector = torch.rand(1024, dtype=dtype, device=torch_device)
    rate = HEAD_SLICE_BYTES / max(_median_time(lambda: torch.mv(matrix, vector), sync, repeat=5, warmup=1), 1e-9)
    layer_s = max(profile.layer_bytes) / rate
    return DeviceTimings(
        layer_decode_s=layer_s,
        layer_decode_per_kv_s=profile.kv_bytes_per_token / rate,
        layer_prefill_per_token_s=layer_s,
        embed_s=profile.hidden_size * profile.dtype_bytes / rate,
        head_s=profile.head_bytes / rate,
        head_prefill_per_token_s=profile.head_bytes / rate,
        timed_as=f"{label}, priced from bytes" + (f" ({why})" if why else ""),
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def time_link(transfer: TransferManager, src: Device, dst: Device, hidden_size: int, head_dim: int, dtype) -> LinkTimings:
    """A decode hand-over (hidden state, cos/sin where the model has attention heads, positions)
    and a 4 MiB copy."""
    def make(device):
        t = device.torch_device
        extra = {"position_embeddings": (torch.randn(1, 1, head_dim, dtype=dtype, device=t),) * 2} if head_dim else {}
        return ((torch.randn(1, 1, hidden_size, dtype=dtype, device=t),),
                {**extra, "position_ids": torch.zeros(1, 1, dtype=torch.long, device=t)})

    small = make(src)
    big = torch.randn(1024 * 1024, dtype=torch.float32, device=src.torch_device)
    sync = lambda: (_syncer(src.torch_device)(), _syncer(dst.torch_device)())
    latency = _median_time(lambda: transfer.move(small, src.name, dst.name, record=False), sync, repeat=30)
    big_s = _median_time(lambda: transfer.move(big, src.name, dst.name, record=False), sync, repeat=5)
    return LinkTimings(latency_s=latency, bytes_per_s=big.numel() * 4 / big_s)


def _time_step_overhead(config, dtype: torch.dtype, torch_device: torch.device = torch.device("cpu"),
                        layer_bytes: int = 0) -> float:
    """The host's cost per generate step outside the model's forward pass (sampling, stopping,
    cache bookkeeping), measured on a copy of the model with one layer of each kind:
    transformers' loop around the forward pass is the same whatever the model's depth (and
    width: the MLP of a layer bigger than COLD_STACK_BYTES is narrowed for this)."""
    from transformers import AutoModelForCausalLM

    small, _ = timing_config(config, layers_of_every_kind(config))
    if layer_bytes > COLD_STACK_BYTES and isinstance(getattr(small, "intermediate_size", None), int):
        small.intermediate_size = min(small.intermediate_size, small.hidden_size)
    with torch.device(torch_device):
        model = AutoModelForCausalLM.from_config(small, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # run the full length whatever the random weights say
    forward_s = []
    started: list[float] = []
    model.register_forward_pre_hook(lambda m, a: started.append(time.perf_counter()))
    model.register_forward_hook(lambda m, a, o: forward_s.append(time.perf_counter() - started[-1]))
    ids = torch.randint(0, small.get_text_config(decoder=True).vocab_size, (1, 16), device=torch_device)
    tokens = 24
    kwargs = dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, **kwargs)  # warm-up
        overheads = []
        for _ in range(3):
            forward_s.clear()
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=tokens, **kwargs)
            total = time.perf_counter() - start
            # The first forward is the prefill; steps after it are what decoding repeats.
            overheads.append((total - sum(forward_s)) / len(forward_s))
    return statistics.median(overheads)


def profile_key(model_key: str, device: Device, dtype: torch.dtype, weights: str = "native",
                graphs: bool = False) -> str:
    timed_as = "host-cpu" if device.torch_device.type == "cpu" else f"{device.name}-{device.label}"
    text = f"v{PROFILE_VERSION}|{model_key}|{timed_as}|{dtype}" + ("" if weights == "native" else f"|{weights}")
    if graphs and device.torch_device.type == "cuda":
        text += "|cuda-graphs"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def measure(
    description: ModelDescription,
    devices: Sequence[Device],
    dtype: torch.dtype,
    model_key: str,
    reprofile: bool = False,
    weights: str = "native",
    graphs: bool = False,
) -> Timings:
    """Timings for every device and link, from the cache where it has them, for the model
    with `weights` as the load holds them (and its GPU layers replayed from CUDA graphs if
    `graphs`)."""
    config = description.config
    folder = profile_folder()
    transfer = TransferManager(list(devices))
    device_timings: dict[str, DeviceTimings] = {}
    measured_here: dict[str, DeviceTimings] = {}  # one timing per physical device
    for device in devices:
        key = profile_key(model_key, device, dtype, weights, graphs)
        path = folder / f"{key}.json"
        timings = None if reprofile else read_cached(path)
        if timings is None:
            if key in measured_here:
                timings = measured_here[key]
            else:
                label = "host CPU" if device.torch_device.type == "cpu" else f"{device.name} ({device.label})"
                timings = time_device(description, device.torch_device, dtype, label, weights, graphs)
                write_cached(path, timings)
        measured_here[key] = timings
        device_timings[device.name] = timings
    links = {}
    arch = description.architecture
    hidden, head_dim = arch.hidden_size, arch.head_dim
    link_cache: dict[tuple[str, str], LinkTimings] = {}
    for src in devices:
        for dst in devices:
            if src.name == dst.name:
                continue
            pair = (str(src.torch_device), str(dst.torch_device))
            if pair not in link_cache:
                link_cache[pair] = time_link(transfer, src, dst, hidden, head_dim, dtype)
            links[(src.name, dst.name)] = link_cache[pair]
    # The sampler runs where the logits come back to, beside the embeddings: the first device
    # in the usual plan. On a GPU its per-step cost (kernel launches, the host waiting on the
    # device for each token) is several times what the same loop costs on the host.
    sampler = devices[0].torch_device
    sampler_key = "cpu" if sampler.type == "cpu" else profile_key(model_key, devices[0], dtype)
    overhead_path = folder / f"{hashlib.sha256(f'v{PROFILE_VERSION}|{model_key}|{dtype}|{sampler_key}|step'.encode()).hexdigest()[:24]}.json"
    overhead = None if reprofile else _read_float(overhead_path)
    if overhead is None:
        try:
            overhead = _time_step_overhead(config, dtype, sampler, _float_layer_bytes(description, dtype))
            _write_text(overhead_path, json.dumps({"step_overhead_s": overhead}))
        except Exception as exc:  # noqa: BLE001 - a prediction without it is still a prediction
            log.warning("could not time a generate step of %s (%s); predictions leave it out",
                        getattr(config, "model_type", "the model"), _first_line(exc))
            overhead = 0.0
    from vramancer.platforms.heap import give_back_freed_memory

    give_back_freed_memory()  # the cut copies' memory goes back to the system, not into glibc's heap
    if any(d.torch_device.type == "cuda" for d in devices):
        # The timing runs' blocks stay in torch's cache otherwise, and the plan made next
        # would see that much less free memory on the GPU.
        torch.cuda.empty_cache()
    return Timings(device_timings, links, overhead)


def read_cached(path: Path) -> DeviceTimings | None:
    """The timings kept in `path`, or None (measure again) when missing, unreadable or holding
    a value no timing has: null, text, a negative, nan or an infinity. A bad entry is said once."""
    values = _read_json(path)
    if values is None:
        return None
    fields = {f.name: f.type for f in dataclasses.fields(DeviceTimings)}
    if not isinstance(values, dict) or set(values) != set(fields):
        return _bad_entry(path, "its fields are not a device's timings")
    for name, value in values.items():
        if name == "timed_as":
            if not isinstance(value, str):
                return _bad_entry(path, f"timed_as is {value!r}")
        elif not _a_duration(value):
            return _bad_entry(path, f"{name} is {value!r}")
    return DeviceTimings(**values)


def _read_float(path: Path) -> float | None:
    values = _read_json(path)
    if values is None:
        return None
    value = values.get("step_overhead_s") if isinstance(values, dict) else None
    return float(value) if _a_duration(value) else _bad_entry(path, f"step_overhead_s is {value!r}")


def _a_duration(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _read_json(path: Path):
    try:
        text = path.read_text()
    except OSError:
        return None  # not there, or the folder cannot be used: the write that follows says so once
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return _bad_entry(path, "it is not JSON")


def _bad_entry(path: Path, why: str) -> None:
    """A cache entry that cannot be used is a miss: said once, then measured afresh."""
    if str(path) not in _CACHE_WARNED:
        _CACHE_WARNED.add(str(path))
        log.warning("ignoring the cached timings in %s (%s); measuring them again.", path, why)
    return None


def write_cached(path: Path, timings: DeviceTimings) -> None:
    _write_text(path, json.dumps(asdict(timings)))


def profile_folder() -> Path:
    """Where timings are kept. The cache only saves time: a folder that cannot be made (the
    cache dir is a file, or HOME cannot be written) is said once, and timings are measured."""
    folder = cache_dir() / "profiles"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _cache_failed(folder, exc)
    return folder


def _write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one per writer
    try:
        temporary.write_text(text)
        temporary.replace(path)  # atomic: a reader never sees half a file
    except OSError as exc:
        _cache_failed(path.parent, exc)
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)  # whatever stopped the write (a signal raises through here)


_CACHE_WARNED: set[str] = set()


def _cache_failed(folder: Path, exc: OSError) -> None:
    if str(folder) not in _CACHE_WARNED:
        _CACHE_WARNED.add(str(folder))
        log.warning("the profile cache in %s cannot be written (%s); timings are measured afresh each run.",
                    folder, exc.strerror or exc)
