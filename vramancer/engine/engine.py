"""The Engine: one loaded model split across devices, and everything you can do with it.

This is the library face of VRAMancer: the CLI, the worker thread and the tests drive it.
It is not thread-safe by itself; one thread (the EngineWorker, or a script) owns it.
"""

from __future__ import annotations

import gc
import hashlib
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from vramancer.engine import factory, recovery
from vramancer.engine.architecture import cache_bytes, refuse_config
from vramancer.engine.devices import Device, DeviceLost, DeviceSpec, close_devices, parse_device_spec, resolve_devices
from vramancer.engine.errors import VramancerError
from vramancer.engine.options import LoadOptions
from vramancer.engine.generation import (
    GenerationResult,
    Messages,
    SamplingSettings,
    encode_prompt,
    run_generate,
)
from vramancer.engine.migration import MigrationRefused, MigrationResult, check_room, migrate, part_label, parts_of, relocate
from vramancer.engine.models import (
    DTYPES,
    ModelSource,
    build_meta_model,
    load_config,
    load_tokenizer,
    let_go_of_gguf_reader,
    load_weights,
    resolve_dtype,
    resolve_model,
    split_refusal,
)
from vramancer.engine.planner import (
    EMBED,
    HEAD,
    ModelProfile,
    Placement,
    Plan,
    device_needs,
    make_plan,
    split_footprint,
)
from vramancer.engine import profiler
from vramancer.engine.options import LoadOptions
from vramancer.engine.profiler import Prediction, Pricing
from vramancer.engine.rebalance import rebalance as relieve_pressure
from vramancer.engine.quantized import compute_dtype, resolve_weights
from vramancer.engine.runtime import SplitModel
from vramancer.engine.transfer import LinkStats, TransferManager

ProgressCallback = Callable[[str, float], None]
# Each of the two simulated devices of the `auto` fallback holds about this share of the
# model's split footprint, so the split is visible and both devices are needed.
SIMULATED_SHARE = 0.6


class Engine:
    """A causal LM placed across devices. Build one with `Engine.load(...)`."""

    def __init__(
        self,
        options: LoadOptions,
        source: ModelSource,
        tokenizer,
        split: SplitModel,
        plan: Plan,
        devices: list[Device],
        dtype: torch.dtype,
        simulated_fallback: bool,
    ):
        self.options = options
        self.source = source
        self.tokenizer = tokenizer
        self.split = split
        self.plan = plan
        self.devices = devices
        self.dtype = dtype
        self.simulated_fallback = simulated_fallback
        self.migrations: list[MigrationResult] = []
        self.weights = "native"  # what --weights resolved to: native, q8 or q4
        self.dtype_reason = ""
        self.pricing: Pricing | None = None  # measured timings, for predictions
        self.auto_rebalance = False
        # Told of every automatic move (result, reason) and of pressure nothing could relieve.
        self.on_rebalance: Callable[[MigrationResult | None, str], None] | None = None
        self._warned: set[str] = set()
        self._cache = None  # the KV cache of the generation in progress, if any
        # Told when a device's machine is lost (recovered=False) and when its layers found new
        # homes (recovered=True): (sentence, node, layers, recovered). May be called on any thread.
        self.on_fault: Callable[[str, str, str, bool], None] | None = None

    # --- loading -----------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        model: str = "default",
        devices: str | DeviceSpec = "auto",
        strategy: str = "proportional",
        context: int = 2048,
        dtype: str = "auto",
        progress: ProgressCallback | None = None,
        reprofile: bool = False,
        token_file: str | None = None,
        weights: str = "native",
        cuda_graphs: str = "auto",
    ) -> "Engine":
        """Plan first, then read the weights: a plan that cannot fit is refused before any load.

        Remote devices in `devices` (node:HOST:PORT/DEVICE, or `discover`) are admitted with
        the cluster token from `token_file` or VRM_CLUSTER_TOKEN. `cuda_graphs` (auto, on,
        off): see `prepare`."""
        report = progress or (lambda stage, fraction: None)
        options = LoadOptions(model, devices if isinstance(devices, str) else "custom", strategy, context, dtype,
                              token_file=token_file, weights=weights, cuda_graphs=cuda_graphs)
        report("reading", 0.0)
        prepared = prepare(model, devices, context, dtype, reprofile=reprofile, token_file=token_file, weights=weights,
                           cuda_graphs=cuda_graphs)
        try:
            source, device_list, torch_dtype, fallback = prepared.source, prepared.devices, prepared.dtype, prepared.fallback
            plan = prepared.plan(strategy)
            report("reading", 0.2)
            tokenizer = load_tokenizer(source)
            report("dequantising" if source.gguf_file else "reading weights", 0.4)
            loaded = load_weights(source, torch_dtype, prepared.weights)
            refusal = split_refusal(loaded)
            if refusal is not None:
                raise VramancerError(refusal)
            report("placing", 0.8)
            profile = ModelProfile.from_model(loaded, torch_dtype, prepared.weights)
            transfer = TransferManager(device_list)
            split = SplitModel(loaded, profile, device_list, transfer, context)
            factory.attach_external_layers(split, source, torch_dtype, prepared.config)
            split.apply(plan.placement)
        except BaseException:
            prepared.close()
            raise
        report("placing", 1.0)
        engine = cls(options, source, tokenizer, split, plan, device_list, torch_dtype, fallback)
        engine.pricing = prepared.pricing
        engine.weights = prepared.weights
        engine.dtype_reason = prepared.dtype_reason
        engine.cuda_graphs = prepared.cuda_graphs
        for device in device_list:
            device.watch(engine._device_went)
        return engine

    # --- facts -------------------------------------------------------------------------

    @property
    def model(self) -> torch.nn.Module:
        return self.split.model

    @property
    def profile(self) -> ModelProfile:
        return self.split.profile

    @property
    def placement(self):
        return self.split.placement

    @property
    def context(self) -> int:
        return self.split.context

    @property
    def simulated(self) -> bool:
        return all(d.simulated for d in self.devices)

    @property
    def connected(self) -> bool:
        """True while the engine holds other machines' devices (they serve one coordinator at
        a time, so a new load lets these go first)."""
        return self.split.external is not None

    def device(self, name: str) -> Device:
        for d in self.devices:
            if d.name == name:
                return d
        raise VramancerError(f"{name} is not one of this model's devices ({', '.join(d.name for d in self.devices)}).")

    @property
    def cache(self):
        """The KV cache of the generation or the batch in progress (None between them):
        migrations move it with its layers, telemetry counts it."""
        return self._cache

    @cache.setter
    def cache(self, cache) -> None:
        self._cache = cache
        graphs = self.split.graphs
        if cache is not None and graphs is not None and graphs.cache is not None and cache is not graphs.cache:
            graphs.drop()  # a batch's cache takes the place of the one kept for replays: let that go

    def link_stats(self) -> list[LinkStats]:
        return self.split.transfer.link_stats()

    def kv_bytes_by_device(self) -> dict[str, int]:
        """KV cache bytes held on each device right now (empty between generations).

        Read from another thread by telemetry: it only reads tensor sizes, never data. A
        device that reports its own KV cache (another machine's) is taken at its word."""
        cache, placement = self._cache, self.placement
        if cache is None and self.split.graphs is not None:
            cache = self.split.graphs.cache  # kept between answers for the recorded layers
        totals: dict[str, int] = {}
        for device in self.devices:
            reported = device.reported_kv()
            if reported is not None and cache is not None:
                totals[device.name] = reported
        for i, entry in enumerate(getattr(cache, "layers", None) or []):
            if i >= len(placement.layer_devices):
                continue
            device = placement.layer_devices[i]
            totals[device] = totals.get(device, 0) + cache_bytes(entry)
        return totals

    def placement_json(self) -> list[dict]:
        """The layer blocks in order, each with its device and weight bytes."""
        blocks = []
        for block in self.placement.blocks():
            blocks.append(
                {
                    "device": block.device,
                    "simulated": self.device(block.device).simulated,
                    "first_layer": block.layers.first,
                    "last_layer": block.layers.last,
                    "bytes": sum(self.profile.layer_bytes[i] for i in block.layers),
                    "host": self.device(block.device).host,
                }
            )
        return blocks

    def needs_json(self) -> list[dict]:
        needs = device_needs(self.profile, self.placement, self.devices, self.context)
        out = []
        for d in self.devices:
            need = needs[d.name]
            out.append(
                {
                    "device": d.name,
                    "simulated": d.simulated,
                    "weights": need.weights,
                    "kv_cache": need.kv,
                    "workspace": need.workspace,
                    "reserve": need.reserve,
                    "need": need.total,
                    "room": d.room(),
                }
            )
        return out

    # --- generation --------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Messages,
        *,
        raw: bool = False,
        on_text: Callable[[str], None] | None = None,
        on_step: Callable[[int], None] | None = None,
        cancel: threading.Event | None = None,
        **sampling,
    ) -> GenerationResult:
        """Generate an answer to `prompt` (text, or chat messages for a conversation).

        `on_step(n)` runs between decode steps after n new tokens; migrations may run there."""
        settings = SamplingSettings(**sampling)
        settings.check()
        inputs = encode_prompt(self.tokenizer, prompt, raw)
        prompt_tokens = inputs["input_ids"].shape[1]
        if prompt_tokens >= self.context:
            raise VramancerError(
                f"the prompt is {prompt_tokens} tokens, longer than the context of {self.context}; "
                "start afresh or load with a larger --context."
            )
        # The KV cache was budgeted for `context` tokens: stop there rather than overrun it.
        settings.max_new_tokens = min(settings.max_new_tokens, self.context - prompt_tokens)
        self.recover_lost_nodes()  # a device lost between answers: re-place its layers first
        inputs = {k: v.to(self.split.input_device) for k, v in inputs.items()}
        self._cache = self._new_cache()

        def between_steps(step: int) -> None:
            if on_step is not None:
                on_step(step)
            if self.auto_rebalance:
                self.rebalance(step)

        def on_lost(lost: DeviceLost, tokens_so_far: int):
            """The guard around the generate loop: re-place what was lost, start a fresh cache."""
            recovery.mark_lost(self, lost)
            recovery.recover_lost_devices(self, replay_tokens=tokens_so_far)
            self._cache = self._new_cache()
            return self._cache

        try:
            return run_generate(
                self.model, self.tokenizer, inputs, settings, self._cache,
                on_text=on_text, on_step=between_steps, cancel=cancel, on_lost=on_lost,
            )
        finally:
            self._cache = None

    def _new_cache(self):
        """A KV cache for one generation: one that grows (DynamicCache), or under CUDA graphs
        one allocated for the whole context at the first forward pass (StaticCache), so every
        decode step reads and writes the same addresses. That one is kept, emptied, for the
        next answer, so the layers' recordings stay good until the split changes (a rewire
        drops both)."""
        from transformers import DynamicCache, StaticCache

        graphs = self.split.graphs
        if graphs is None or not graphs.installed():
            return DynamicCache(config=self.model.config)
        if graphs.cache is None:
            graphs.cache = StaticCache(config=self.model.config, max_cache_len=self.context)
        else:
            with torch.inference_mode():  # its tensors were made in the last answer's inference mode
                graphs.cache.reset()  # in place: the same tensors at the same addresses
        return graphs.cache

    @property
    def cuda_graphs(self) -> bool:
        """Whether decode steps of layers on CUDA devices replay CUDA graphs (engine/cuda_graphs.py)."""
        return self.split.graphs is not None

    @cuda_graphs.setter
    def cuda_graphs(self, on: bool) -> None:
        """VramancerError, graphs left off, for a model transformers cannot run from a static
        KV cache (its `_can_compile_fullgraph` says so: GPT-Neo's local attention, MPT, Mamba)."""
        if on == self.cuda_graphs:
            return
        refusal = graphs_refusal(self.model) if on else None
        if refusal is not None:
            raise VramancerError(refusal)
        from vramancer.engine.cuda_graphs import LayerGraphs

        self.split.use_graphs(LayerGraphs() if on else None)

    def batch(self, emit: Callable, max_batch: int = 8, max_waiting: int = 64):
        """A continuous batch on this engine (engine/batching.py), driven step by step by the
        caller's thread; its outcomes go out through `emit` as events. Run no `generate`
        while it holds sequences: it owns the engine's KV cache until it empties."""
        from vramancer.engine.batching import Batch

        return Batch(self, emit, max_batch, max_waiting)

    def stream(self, prompt: str | Messages, **kwargs) -> Iterator[str]:
        """Yield the answer's text pieces as they are decoded (generation runs on a thread)."""
        pieces: queue.Queue = queue.Queue()
        done = object()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self.generate(prompt, on_text=pieces.put, **kwargs)
            except BaseException as exc:  # handed to the consumer below
                failure.append(exc)
            finally:
                pieces.put(done)

        thread = threading.Thread(target=run, name="vramancer-stream", daemon=True)
        thread.start()
        while (piece := pieces.get()) is not done:
            yield piece
        thread.join()
        if failure:
            raise failure[0]

    # --- changing the split -------------------------------------------------------------

    def migrate(self, first: int | str, last: int | str | None = None, device: str = "", step: int | None = None) -> MigrationResult:
        """Move layers first..last (or `embed` / `head`) with their KV cache to `device`.

        Call it from the thread that owns the engine: between generations, or from an
        `on_step` callback (between two decode steps)."""
        last = first if last is None else last
        result = migrate(self.split, first, last, device, self._cache)
        result.step = step
        self.migrations.append(result)
        self.plan = Plan(self.placement.copy(), self.plan.strategy, self.context,
                         device_needs(self.profile, self.placement, self.devices, self.context),
                         {d.name: d.room() for d in self.devices})
        return result

    def reserve(self, device: str, nbytes: int) -> None:
        """Take `nbytes` of a simulated device as another process would (for tests and demos).

        The device may end up over-committed; `rebalance` (or --auto-rebalance) answers that."""
        self.device(device).squeeze(nbytes)

    def rebalance(self, step: int | None = None) -> list[MigrationResult]:
        """Move layers off devices under memory pressure; warn once when nothing has room."""
        moves, warnings = relieve_pressure(self)
        for result in moves:
            result.step = step
            if self.on_rebalance is not None:
                self.on_rebalance(result, f"{result.src} was short of memory")
        for warning in warnings:
            if warning not in self._warned and self.on_rebalance is not None:
                self.on_rebalance(None, warning)
            self._warned.add(warning)
        if moves:
            self._warned.clear()  # the situation changed: a new shortage may be worth a word
        return moves

    def predict(self, placement: Placement | None = None) -> Prediction:
        """What `placement` (default: the current one) should cost per token, without applying it."""
        if self.pricing is None:
            raise VramancerError("no timings were measured for this model, so nothing can be predicted.")
        return self.pricing.predict(placement or self.placement)

    def would_fit(self, first: int | str, last: int | str, device: str) -> str | None:
        """None if moving first..last to `device` fits, else the sentence a refusal would give."""
        try:
            parts = parts_of(self.split, first, last)
            check_room(self.split, self.placement.moved(parts, device), part_label(first, last))
        except MigrationRefused as exc:
            return str(exc)
        return None

    def replan(self, strategy: str) -> Plan:
        """Plan afresh with `strategy` on the same devices and move what must move."""
        self.recover_lost_nodes()
        plan = make_plan(self.profile, [d for d in self.devices if not d.lost], strategy, self.context, self.pricing)
        check_room(self.split, plan.placement, "the new plan")
        relocate(self.split, plan.placement, self._cache)
        self.plan = plan
        return plan

    # --- lost devices ------------------------------------------------------------------

    def recover_lost_nodes(self) -> bool:
        """Re-place the layers of any device lost since the last look on the devices left.
        True if layers moved; VramancerError (engine unchanged) if they do not fit."""
        return recovery.recover_lost_devices(self)

    def report_fault(self, message: str, node: str = "", layers: str = "", recovered: bool = False) -> None:
        if self.on_fault is not None:
            self.on_fault(message, node, layers, recovered)

    def _device_went(self, where: str, reason: str) -> None:
        """The machine `where` holding some of our devices went away (called on any thread)."""
        held = [i for i, name in enumerate(self.placement.layer_devices) if self.device(name).host == where]
        ranges = recovery.layer_ranges(held) if held else ""
        what = f"; it held {ranges}" if held else ""
        self.report_fault(f"{where} lost: {reason}{what}.", node=where, layers=ranges)

    def close(self) -> None:
        """Release the model's memory and its ledger claims (and the nodes' layers)."""
        for d in self.devices:
            for category in ("weights", "kv", "workspace"):
                d.ledger.set(category, 0)
        for d in self.devices:
            d.watch(None)
        if self.split.external is not None:
            self.split.external.close()
        if self.split.graphs is not None:
            self.split.graphs.drop()  # recordings and the cache they replay into
        self.split.model = None  # type: ignore[assignment]
        # The split keeps the decoder and its layers too; without these the GPU memory stays
        # held until the engine itself is collected, and empty_cache would free nothing.
        self.split.base = None  # type: ignore[assignment]
        self.split.layer_modules = []
        if torch.cuda.is_available():
            gc.collect()  # modules and their boundary hooks refer to each other
            torch.cuda.empty_cache()


@dataclass
class Prepared:
    """Everything known before weights are read: enough to plan and to price a plan."""

    source: ModelSource
    config: object
    profile: ModelProfile
    devices: list[Device]
    dtype: torch.dtype
    fallback: bool  # `auto` found no accelerator and made a simulated pool
    context: int
    pricing: Pricing
    weights: str = "native"  # native, q8 or q4 (what --weights resolved to)
    dtype_reason: str = ""  # why this dtype, for `plan`
    cuda_graphs: bool = False  # what --cuda-graphs resolved to

    def plan(self, strategy: str) -> Plan:
        plan = make_plan(self.profile, self.devices, strategy, self.context, self.pricing)
        return plan

    def close(self) -> None:
        """Let go of the devices' connections (a no-op for this machine's) and of the GGUF
        reader kept for weights that will not be read now."""
        close_devices(self.devices)
        let_go_of_gguf_reader()


def prepare(model: str, devices: str | DeviceSpec, context: int, dtype: str, reprofile: bool = False,
            token_file: str | None = None, weights: str = "native", cuda_graphs: str = "auto") -> Prepared:
    """Everything that can be checked before weights are read: the source, the model's sizes,
    the devices, the dtype, the timings. Bad input fails here, in a second or two.

    `cuda_graphs`: `on` replays the decode steps of CUDA layers from graphs, `off` never,
    `auto` (the default) does where this machine has a CUDA device and transformers can run
    the model from a static cache. CUDA devices are timed the way they will run.

    With remote devices, their nodes are admitted here; `Prepared.close()` (or the Engine built
    from it) lets them go."""
    from vramancer.engine.validation import check_context, check_cuda_graphs

    check_context(context)
    check_cuda_graphs(cuda_graphs)
    spec = parse_device_spec(devices) if isinstance(devices, str) else devices
    if spec.clustered and not (spec.requests or spec.auto):
        raise VramancerError("remote devices hold decoder layers only; add a device of this machine "
                             "(cpu, cuda:N or a sim pool) for the embeddings and the head, e.g. cpu,node:HOST:PORT/sim0.")
    local_spec = spec.local()
    source = resolve_model(model)
    config = load_config(source)
    refuse_config(config)  # what the config alone shows cannot be split is refused before anything else
    probe = resolve_devices(local_spec, simulated_size=1) if spec.auto else None
    fallback = bool(spec.auto and probe and probe[0].simulated)
    kinds = {d.kind for d in probe} if probe else {r.kind for r in spec.requests}
    remote = factory.open_devices(DeviceSpec((), remotes=spec.remotes, discover=spec.discover), token_file=token_file) \
        if spec.clustered else []
    try:
        all_kinds = kinds | {d.kind for d in remote}
        weights_kind = resolve_weights(weights, source.gguf_path, all_kinds)
        if weights_kind != "native" and remote:
            raise VramancerError(f"--weights {weights} quantizes this machine's copy of the model; remote devices "
                                 "load theirs unquantized, so use --weights native with them.")
        torch_dtype, dtype_reason = choose_dtype(dtype, weights_kind, all_kinds, config, reprofile)
        meta = build_meta_model(config, torch_dtype)
        profile = ModelProfile.from_model(meta, torch_dtype, weights_kind)
        size = int(split_footprint(profile, context) * SIMULATED_SHARE)
        local = resolve_devices(local_spec, simulated_size=size)
        graphs = use_graphs(cuda_graphs, meta, local)
        model_key = f"{source.display_name}|{hashlib.sha256(config.to_json_string().encode()).hexdigest()}"
        timings = profiler.measure(config, meta, local, torch_dtype, model_key, reprofile=reprofile, weights=weights_kind,
                                   graphs=graphs)
        factory.add_external_timings(timings, config, local, remote, torch_dtype, model_key, source)
    except BaseException:
        close_devices(remote)
        let_go_of_gguf_reader()
        raise
    device_list = local + remote
    # A static cache (what graphs replay into) has every layer attend over the whole context.
    pricing = Pricing(timings, profile, kv_length=context) if graphs else Pricing(timings, profile)
    return Prepared(source, config, profile, device_list, torch_dtype, fallback, context, pricing,
                    weights_kind, dtype_reason, graphs)


def graphs_refusal(model: torch.nn.Module) -> str | None:
    """Why CUDA graphs cannot replay this model, or None: transformers cannot run it from the
    static KV cache they write into (its `_can_compile_fullgraph` says so: GPT-Neo's local
    attention, MPT, Mamba)."""
    if getattr(type(model), "_can_compile_fullgraph", False):
        return None
    return (f"{model.config.model_type} models cannot run from the static KV cache that CUDA graphs replay "
            "(transformers does not support it for them); run with --no-cuda-graphs.")


def use_graphs(mode: str, model: torch.nn.Module, devices: list[Device]) -> bool:
    """What --cuda-graphs `mode` comes to for this model on these devices; `on` for a model
    graphs cannot replay is refused in one sentence, `auto` quietly runs it eagerly."""
    if mode == "off":
        return False
    refusal = graphs_refusal(model)
    if mode == "on":
        if refusal is not None:
            raise VramancerError(refusal)
        return True
    return refusal is None and any(d.local and d.torch_device.type == "cuda" for d in devices)


def choose_dtype(dtype: str, weights: str, kinds: set[str], config, reprofile: bool) -> tuple[torch.dtype, str]:
    """The compute dtype and the reason for it, which `plan` shows."""
    if dtype != "auto":
        return resolve_dtype(dtype, kinds), f"{dtype}: as asked"
    if weights != "native":
        chosen = compute_dtype(weights, torch.float32, kinds)
        name = str(chosen).removeprefix("torch.")
        return chosen, f"{name}: the activations the {weights} kernels run fast with"
    if kinds <= {"cpu", "sim"}:
        text = config.get_text_config(decoder=True)
        hidden = getattr(text, "hidden_size", None) or 1024
        # A config may hold the field with None (GPT-Neo's): the model then uses 4 × hidden.
        inner = getattr(text, "intermediate_size", None) or 4 * hidden
        choice = profiler.cpu_dtype_choice(hidden, inner, reprofile)
        return DTYPES[choice.dtype], choice.reason
    chosen = resolve_dtype(dtype, kinds)
    return chosen, f"{str(chosen).removeprefix('torch.')}: the GPU's half type"


__all__ = ["Engine", "LoadOptions", "prepare", "EMBED", "HEAD"]
