"""The Engine: one loaded model split across devices, and everything you can do with it.

This is the library face of VRAMancer: the CLI, the worker thread and the tests drive it.
It is not thread-safe by itself; one thread (the EngineWorker, or a script) owns it.
"""

from __future__ import annotations

import dataclasses

import gc
import queue
import threading
from collections.abc import Callable, Iterator

import torch

from vramancer.config.errors import VramancerError
from vramancer.config.options import LoadOptions
from vramancer.engine import factory
from vramancer.engine.loader import graphs_refusal, prepare
from vramancer.model.architecture import cache_bytes
from vramancer.model.architecture import UnsupportedArchitecture
from vramancer.model.loading import check_weights, load_weights
from vramancer.model.source import ModelSource, load_tokenizer
from vramancer.planning.placement import (
    EMBED,
    HEAD,
    ModelProfile,
    Placement,
    Plan,
    device_needs,
    make_plan,
    part_label,
)
from vramancer.planning.pricing import Prediction, Pricing
from vramancer.platforms.devices import (
    Device,
)
from vramancer.platforms.heap import give_back_freed_memory
from vramancer.runtime import recovery
from vramancer.runtime.migration import (
    MigrationRefused,
    MigrationResult,
    check_room,
    migrate,
    parts_of,
    relocate,
)
from vramancer.runtime.rebalance import rebalance as relieve_pressure
from vramancer.planning.tiers import plan_with_tiers, stream_cost, tier_change_refusal
from vramancer.runtime.split_model import SplitModel
from vramancer.runtime.transfer import LinkStats, TransferManager
from vramancer.scheduling.generation import GenerationResult, Messages, SamplingSettings
from vramancer.scheduling.prefix_cache import PrefixCache

ProgressCallback = Callable[[str, float], None]
LONE_REQUEST = -1  # the request id of Engine.generate's answer (the dashboard's ids count from 1)


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
        self.tiers: tuple = ()  # the host and disk tiers with their measured rates (planning/tiers.py)
        self.auto_rebalance = False
        # Told of every automatic move (result, reason) and of pressure nothing could relieve.
        self.on_rebalance: Callable[[MigrationResult | None, str], None] | None = None
        self._warned: set[str] = set()
        self._cache = None  # the KV cache of the generation in progress, if any
        # Keys and values of prompt prefixes kept for later requests (scheduling/prefix_cache.py):
        # the engine's, so every scheduler on it (the worker's, `generate`'s) shares them.
        self.prefix_cache = PrefixCache()
        # Told when a device's machine is lost (recovered=False) and when its layers found new
        # homes (recovered=True): (sentence, node, layers, recovered). May be called on any thread.
        self.on_fault: Callable[[str, str, str, bool], None] | None = None

    # --- loading -----------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        options: LoadOptions | str = "default",
        devices: str = "auto",
        strategy: str = "proportional",
        context: int = 2048,
        dtype: str = "auto",
        progress: ProgressCallback | None = None,
        reprofile: bool = False,
        token_file: str | None = None,
        weights: str = "auto",
        cuda_graphs: str = "auto",
    ) -> Engine:
        """Plan first, then read the weights: a plan that cannot fit is refused before any load.

        `options` is one LoadOptions (what the CLI, the dashboard and the server pass), or a
        model name with the other options as keywords (`Engine.load("default", "sim:2x1GiB")`).
        Remote devices (node:HOST:PORT/DEVICE, or `discover`) are admitted with the cluster
        token from `token_file` or VRM_CLUSTER_TOKEN. `cuda_graphs` (auto, on, off): see
        `engine/loader.prepare`."""
        if not isinstance(options, LoadOptions):
            options = LoadOptions(options, devices, strategy, context, dtype, token_file=token_file, weights=weights,
                                  cuda_graphs=cuda_graphs)
        report = progress or (lambda stage, fraction: None)
        report("reading", 0.0)
        prepared = prepare(options, reprofile=reprofile)
        try:
            source, device_list, torch_dtype, fallback = prepared.source, prepared.devices, prepared.dtype, prepared.fallback
            plan = prepared.plan(options.strategy)
            report("reading", 0.2)
            tokenizer = load_tokenizer(source)
            report("dequantising" if source.gguf_file else "reading weights", 0.4)
            check_weights(source, prepared.config, torch_dtype)  # present, and shaped as the config says
            loaded = load_weights(source, torch_dtype, prepared.weights)
            try:
                description = prepared.description.bound_to(loaded)  # described once, in prepare
            except UnsupportedArchitecture as exc:
                raise VramancerError(str(exc)) from None
            report("placing", 0.8)
            transfer = TransferManager(device_list)
            split = SplitModel(loaded, description, device_list, transfer, prepared.context)
            factory.attach_external_layers(split, source, torch_dtype, prepared.config)
            split.tier_caps = {tier.name: tier.capacity for tier in prepared.tiers}
            split.apply(plan.placement, plan.streamed)
            # What the load freed (each tensor's float rows, the copies placing made) goes back
            # to the system, not into glibc's heap between the weights that stay.
            give_back_freed_memory()
        except BaseException:
            prepared.close()
            raise
        report("placing", 1.0)
        engine = cls(options, source, tokenizer, split, plan, device_list, torch_dtype, fallback)
        engine.pricing = prepared.pricing
        engine.tiers = prepared.tiers
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
        for i, size in enumerate(self.prefix_cache.bytes_by_layer()):  # kept prefixes beside their layers
            if i < len(placement.layer_devices) and size:
                device = placement.layer_devices[i]
                totals[device] = totals.get(device, 0) + size
        return totals

    def layer_torch_devices(self) -> list[torch.device]:
        """The torch device each decoder layer (and so its KV cache) is on now."""
        return [self.split.devices[name].torch_device for name in self.placement.layer_devices]

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
        needs = device_needs(self.profile, self.placement, self.devices, self.context, self.split.streamed)
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
                    "staging": need.staging,
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

        The answer is one request to the scheduler (scheduling/batching.py), driven here on the
        caller's thread: the same path as the worker's and the server's requests.
        `on_step(n)` runs between decode steps after n new tokens; migrations may run there."""
        from vramancer.engine import events as ev
        from vramancer.scheduling.batching import Batch

        SamplingSettings(**sampling).check()
        outcome: list[ev.Event] = []

        def emit(event: ev.Event) -> None:
            if isinstance(event, ev.Token):
                if event.text and on_text is not None:
                    on_text(event.text)
            elif isinstance(event, (ev.GenerationDone, ev.RequestRefused, ev.Error)):
                outcome.append(event)

        scheduler = Batch(self, emit, max_batch=1, max_waiting=1)
        request = ev.Submit(LONE_REQUEST, tuple(prompt) if isinstance(prompt, list) else prompt, sampling,
                            raw=raw, fit_context=True)
        if not scheduler.submit(request):
            raise VramancerError(outcome[0].message)
        told = 0  # steps told to on_step: a step replayed after a lost device is not told twice
        while scheduler.busy:
            if cancel is not None and cancel.is_set():
                scheduler.cancel(LONE_REQUEST)
                break
            scheduler.step()
            made = scheduler.tokens_so_far(LONE_REQUEST)
            if made > told and scheduler.busy:
                told = made
                if on_step is not None:
                    on_step(made)
                if self.auto_rebalance:
                    self.rebalance(made)
        if scheduler.failure is not None:  # a lost device's layers fit nowhere: the answer ended
            raise scheduler.failure
        done = next((e for e in outcome if isinstance(e, ev.GenerationDone)), None)
        if done is None:  # refused on the way
            raise VramancerError(outcome[-1].message)
        return GenerationResult(
            text=done.text,
            token_ids=list(done.token_ids),
            prompt_tokens=done.prompt_tokens,
            new_tokens=done.new_tokens,
            ttft_s=done.ttft_s,
            decode_tokens_per_s=done.decode_tokens_per_s,
            total_s=done.total_s or 0.0,
            cancelled=done.cancelled,
            stats={"node_losses": list(scheduler.losses)} if scheduler.losses else {},
        )

    def lone_cache(self):
        """The KV cache a lone request decodes in under CUDA graphs: a StaticCache allocated for
        the whole context at the first forward pass, so every decode step reads and writes the
        same addresses. It is kept, emptied, for the next lone request, so the layers'
        recordings stay good until the split changes (a rewire drops both). None without
        graphs: the scheduler then makes a cache that grows."""
        from transformers import StaticCache

        graphs = self.split.graphs
        if graphs is None or not graphs.installed():
            return None
        if graphs.cache is None:
            graphs.cache = StaticCache(config=self.model.config, max_cache_len=self.context)
        else:
            with torch.inference_mode():  # its tensors were made in the last answer's inference mode
                graphs.cache.reset()  # in place: the same tensors at the same addresses
        return graphs.cache

    @property
    def cuda_graphs(self) -> bool:
        """Whether decode steps of layers on CUDA devices replay CUDA graphs (runtime/graphs.py)."""
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
        from vramancer.runtime.graphs import LayerGraphs

        self.split.use_graphs(LayerGraphs() if on else None)

    def batch(self, emit: Callable, max_batch: int = 8, max_waiting: int = 64):
        """The scheduler on this engine (scheduling/batching.py), driven step by step by the
        caller's thread; its outcomes go out through `emit` as events. Run no `generate`
        while it holds sequences: it owns the engine's KV cache until it empties."""
        from vramancer.scheduling.batching import Batch

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
        self.prefix_cache.follow(self.layer_torch_devices())
        result.step = step
        self.migrations.append(result)
        self.plan = Plan(self.placement.copy(), self.plan.strategy, self.context,
                         device_needs(self.profile, self.placement, self.devices, self.context, self.split.streamed),
                         {d.name: d.room() for d in self.devices}, dict(self.split.streamed))
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
        placement = placement or self.placement
        prediction = self.pricing.predict(placement)
        if not self.split.streamed:
            return prediction
        # The copies overlap the compute: the step is the slower of the two.
        cost = stream_cost(self.profile, placement, self.split.streamed, self.tiers, prediction.step_s)
        return dataclasses.replace(prediction, step_s=cost.step_s, tokens_per_s=cost.tokens_per_s)

    def stream_seconds(self) -> float:
        """Seconds of copies from the tiers in one decode step, at the measured rates (0: none)."""
        if not self.split.streamed:
            return 0.0
        return stream_cost(self.profile, self.placement, self.split.streamed, self.tiers, 0.0).stream_s

    def tier_snapshots(self) -> tuple:
        """Each tier layers stream from (or that was asked for): what it holds and has streamed."""
        from vramancer.engine.events import TierSnapshot

        split, streamer = self.split, self.split.streamer
        streamed = dict(split.streamed)  # read on the telemetry thread: a copy, as it stands now
        held = streamer.held_bytes() if streamer is not None else {}
        stats = streamer.snapshot() if streamer is not None else {}
        snaps = []
        for name, cap in split.tier_caps.items():
            layers = tuple(sorted(i for i, tier in streamed.items() if tier == name))
            if cap <= 0 and not layers:
                continue
            devices = tuple(dict.fromkeys(self.placement.layer_devices[i] for i in layers))
            tier = stats.get(name, {})
            snaps.append(TierSnapshot(name, cap, held.get(name, 0), layers, devices,
                                      sum(self.profile.layer_bytes[i] for i in layers), tier.get("bytes", 0),
                                      tier.get("gb_per_s", 0.0)))
        return tuple(snaps)

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
        devices = [d for d in self.devices if not d.lost]
        if self.split.streamed:
            # The new plan may move the devices' layers and the device the streamed ones run on;
            # the layers in the tiers must be the same, as no layer leaves a tier or joins one here.
            plan = plan_with_tiers(self.profile, devices, strategy, self.context, self.tiers, self.pricing)
            if plan.streamed != self.split.streamed:
                raise VramancerError(tier_change_refusal(self.split.streamed, plan.streamed, strategy))
        else:
            plan = make_plan(self.profile, devices, strategy, self.context, self.pricing)
        check_room(self.split, plan.placement, "the new plan")
        relocate(self.split, plan.placement, self._cache)
        self.prefix_cache.follow(self.layer_torch_devices())
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
        self.prefix_cache.clear()
        for d in self.devices:
            for category in ("weights", "kv", "workspace"):
                d.ledger.set(category, 0)
        for d in self.devices:
            d.watch(None)
        if self.split.external is not None:
            self.split.external.close()
        if self.split.graphs is not None:
            self.split.graphs.drop()  # recordings and the cache they replay into
        self.split.close_streaming()
        self.split.model = None  # type: ignore[assignment]
        # The split keeps the decoder and its layers too; without these the GPU memory stays
        # held until the engine itself is collected, and empty_cache would free nothing.
        self.split.base = None  # type: ignore[assignment]
        self.split.layer_modules = []
        if torch.cuda.is_available():
            gc.collect()  # modules and their boundary hooks refer to each other
            torch.cuda.empty_cache()


__all__ = ["EMBED", "HEAD", "Engine", "LoadOptions", "prepare"]
