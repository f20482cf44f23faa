"""The loader's first half: everything that can be checked before weights are read (the
source, the model's sizes, the devices, the dtype, the timings), from one LoadOptions."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from vramancer.config.device_spec import DeviceSpec, parse_device_spec
from vramancer.config.errors import VramancerError
from vramancer.config.options import LoadOptions
from vramancer.engine import factory
from vramancer.model.architecture import refuse_config
from vramancer.model.description import ModelDescription, describe_model
from vramancer.model.loading import DTYPES, build_meta_model, resolve_dtype
from vramancer.model.checks import check_config_values
from vramancer.model.checks import check_context as check_model_context
from vramancer.model.source import ModelSource, load_config, resolve_model
from vramancer.model.weights_cache import let_go_of_gguf_reader
from vramancer.planning import precision
from vramancer.planning.placement import (
    ModelProfile,
    Plan,
    split_footprint,
)
from vramancer.planning.pricing import Pricing
from vramancer.planning.tiers import Tier, plan_with_tiers
from vramancer.platforms.devices import (
    Device,
    close_devices,
    resolve_devices,
)
from vramancer.profiling import timing as profiler
from vramancer.quantization.weights import choose_weights, our_kernels

# Each of the two simulated devices of the `auto` fallback holds about this share of the
# model's split footprint, so the split is visible and both devices are needed.
SIMULATED_SHARE = 0.6


@dataclass
class Prepared:
    """Everything known before weights are read: enough to plan and to price a plan."""

    source: ModelSource
    config: object
    description: ModelDescription  # the one description of this load: planner, profiler, runtime and nodes
    devices: list[Device]
    dtype: torch.dtype
    fallback: bool  # `auto` found no accelerator and made a simulated pool
    context: int
    pricing: Pricing
    weights: str = "native"  # native, q8 or q4 (what --weights resolved to)
    dtype_reason: str = ""  # why this dtype, for `plan`
    weights_reason: str = ""  # why these weights, for `plan`
    cuda_graphs: bool = False  # what --cuda-graphs resolved to
    tiers: tuple[Tier, ...] = ()  # the host and disk tiers asked for, with their measured rates

    @property
    def profile(self) -> ModelProfile:
        return self.description.profile

    def plan(self, strategy: str) -> Plan:
        """The devices alone when the model fits them, else with layers kept in the tiers."""
        return plan_with_tiers(self.profile, self.devices, strategy, self.context, self.tiers, self.pricing)

    def close(self) -> None:
        """Let go of the devices' connections (a no-op for this machine's) and of the GGUF
        reader kept for weights that will not be read now."""
        close_devices(self.devices)
        let_go_of_gguf_reader()


def prepare(options: LoadOptions, reprofile: bool = False) -> Prepared:
    """Everything that can be checked before weights are read: the source, the model's sizes,
    the devices, the dtype, the timings. Bad input fails here, in a second or two.

    `cuda_graphs`: `on` replays the decode steps of CUDA layers from graphs, `off` never,
    `auto` (the default) does where this machine has a CUDA device and transformers can run
    the model from a static cache. CUDA devices are timed the way they will run.

    With remote devices, their nodes are admitted here; `Prepared.close()` (or the Engine built
    from it) lets them go."""
    from vramancer.config.validation import check_context, check_cuda_graphs

    model, context, dtype, weights = options.model, options.context, options.dtype, options.weights
    token_file, cuda_graphs = options.token_file, options.cuda_graphs
    check_context(context)
    check_cuda_graphs(cuda_graphs)
    tier_caps = options.tier_caps()
    spec = parse_device_spec(options.devices)
    if spec.clustered and not (spec.requests or spec.auto):
        raise VramancerError("remote devices hold decoder layers only; add a device of this machine "
                             "(cpu, cuda:N or a sim pool) for the embeddings and the head, e.g. cpu,node:HOST:PORT/sim0.")
    local_spec = spec.local()
    source = resolve_model(model)
    config = load_config(source)
    check_config_values(config.to_dict(), source.name)  # a GGUF's or hub model's sizes too
    refuse_config(config)  # what the config alone shows cannot be split is refused before anything else
    probe = resolve_devices(local_spec, simulated_size=1) if spec.auto else None
    fallback = bool(spec.auto and probe and probe[0].simulated)
    kinds = {d.kind for d in probe} if probe else {r.kind for r in spec.requests}
    remote = factory.open_devices(DeviceSpec((), remotes=spec.remotes, discover=spec.discover), token_file=token_file) \
        if spec.clustered else []
    try:
        all_kinds = kinds | {d.kind for d in remote}
        weights_kind, weights_reason = choose_weights(weights, source.gguf_path, all_kinds, remote=bool(remote))
        torch_dtype, dtype_reason = choose_dtype(dtype, weights_kind, all_kinds)
        meta = build_meta_model(config, torch_dtype)
        description = describe_model(meta, torch_dtype, weights_kind)  # refuses what VRAMancer cannot split
        profile = description.profile
        check_model_context(config, context, source.name)
        size = int(split_footprint(profile, context) * SIMULATED_SHARE)
        local = resolve_devices(local_spec, simulated_size=size)
        graphs = use_graphs(cuda_graphs, meta, local)
        model_key = f"{source.display_name}|{hashlib.sha256(config.to_json_string().encode()).hexdigest()}"
        timings = profiler.measure(description, local, torch_dtype, model_key, reprofile=reprofile, weights=weights_kind,
                                   graphs=graphs)
        factory.add_external_timings(timings, config, local, remote, torch_dtype, model_key, source)
    except BaseException:
        close_devices(remote)
        let_go_of_gguf_reader()
        raise
    device_list = local + remote
    # A static cache (what graphs replay into) has every layer attend over the whole context.
    pricing = Pricing(timings, profile, kv_length=context) if graphs else Pricing(timings, profile)
    return Prepared(source, config, description, device_list, torch_dtype, fallback, context, pricing,
                    weights_kind, dtype_reason, weights_reason, graphs, measure_tiers(tier_caps, local))


def measure_tiers(caps: dict[str, int], devices: list[Device]) -> tuple[Tier, ...]:
    """The tiers with a cap, each with its copy rate onto every device of this machine."""
    from vramancer.runtime.streaming import measure_rate

    tiers = []
    for name, cap in caps.items():
        if cap > 0:
            rates: dict = {}  # by torch device: simulated devices and the CPU share one
            for device in devices:
                if device.local and device.torch_device not in rates:
                    rates[device.torch_device] = measure_rate(name, device.torch_device)
            tiers.append(Tier(name, cap, {d.name: rates[d.torch_device] for d in devices if d.local}))
    return tuple(tiers)


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


def choose_dtype(dtype: str, weights: str, kinds: set[str]) -> tuple[torch.dtype, str]:
    """The compute dtype and the reason for it, which `plan` shows. `auto` follows the rule in
    planning/precision.py: what the machine is, never a timing."""
    if dtype != "auto":
        return resolve_dtype(dtype), f"{dtype}: as asked"
    on_cpus = kinds <= precision.CPU_KINDS
    kernels = on_cpus and weights != "native" and our_kernels(torch.float32)  # may build them, once
    cuda_bf16 = "cuda" in kinds and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    choice = precision.auto_dtype(kinds, weights, kernels, precision.cpu_flags(), cuda_bf16)
    return DTYPES[choice.name], choice.reason
