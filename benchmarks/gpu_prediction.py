"""Where a GPU prediction and the real decode step part ways, part by part.

The profiler prices a decode step from timings of a cut copy of the model (profiling/timing.py);
the engine then decodes. On the first GPU runs the prediction came out 2-5x pessimistic. This
prints, for a random-weight Llama (~170 M parameters, bfloat16) on cuda:0 and on the host CPU:

- the profiler's timings as the engine's load took them (layer, embeddings, head, the step's
  overhead, links), and the same timings taken again in the warm process;
- the profiler's cut model timed without its hooks (CUDA events around whole decode steps);
- the engine's real decode: tokens/s, and each layer's time from hooks that wait for the device.

One result, `gpu_prediction` (a row per figure, a column per device), recorded as
gpu_prediction.json where `benchmarks.gpu` records gpu.json ($OUT, or benchmarks/results/).

    python -m benchmarks.gpu_prediction [--tokens 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import PROMPT, Result, compare, machine, say
from benchmarks.gpu import record_in, results_folder

PREDICTED, MEASURED = "predicted decode tok/s", "measured decode tok/s (best of 2)"
LAYER_AT_LOAD, LAYER_WARM, LAYER_THIRD = ("layer ms, profiled at load", "layer ms, profiled again warm",
                                          "layer ms, profiled a third time")
CUT_BEST, CUT_MEDIAN = "layer ms, cut model without hooks (best)", "layer ms, cut model without hooks (median)"
ENGINE_LAYER = "layer ms, engine's decode with hooks waiting on the device"
OVERHEAD_AT_LOAD, OVERHEAD_AGAIN = "step overhead ms, profiled at load", "step overhead ms, timed again"


def per_layer_ms(engine, tokens: int) -> tuple[float, float, float]:
    """(median ms of one decoder layer at a decode step, median ms of a whole decode step with
    the hooks on, tok/s) from the engine's own generate, hooks synchronising the device."""
    import torch

    layers = engine.split.stack
    device = next(layers[0].parameters()).device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    starts: dict[int, float] = {}
    took: list[float] = []

    def before(index):
        def hook(_module, args, kwargs=None):
            sync()
            starts[index] = time.perf_counter()
        return hook

    def after(index):
        def hook(_module, args, output):
            sync()
            took.append(time.perf_counter() - starts[index])
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(before(i)))
        handles.append(layer.register_forward_hook(after(i)))
    try:
        result = engine.generate(PROMPT, raw=True, max_new_tokens=tokens)
    finally:
        for handle in handles:
            handle.remove()
    layer = statistics.median(took)  # the prompt's pass is one call per layer among `tokens`
    return 1000 * layer, 1000 * len(layers) * layer, result.decode_tokens_per_s


def unhooked_step_ms(config, device, dtype, count: int, steps: int = 20) -> tuple[float, float]:
    """The profiler's cut model (first `count` layers), decode steps timed whole: (best, median)
    ms per layer."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from vramancer.model.architecture import cut_config

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cut_config(config, count), dtype=dtype).eval()
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(torch.randint(0, 1000, (1, 16), device=device), cache=cache, use_cache=True)
        token = torch.randint(0, 1000, (1, 1), device=device)
        times = []
        for i in range(steps + 3):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            model(token, cache=cache, use_cache=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= 3:
                times.append(time.perf_counter() - start)
    return 1000 * min(times) / count, 1000 * statistics.median(times) / count


def describe_timings(name: str, t) -> str:
    return (f"{name}: layer {t.layer_decode_s * 1000:.3f} ms (+{t.layer_decode_per_kv_s * 1e6:.3f} µs per cached "
            f"token), embed {t.embed_s * 1000:.3f} ms, head {t.head_s * 1000:.3f} ms, timed as {t.timed_as}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args(argv)

    import torch

    from benchmarks.random_llama import MEDIUM, build, save
    from vramancer.engine import Engine
    from vramancer.model.description import describe_model
    from vramancer.model.loading import build_meta_model
    from vramancer.model.source import load_config, resolve_model
    from vramancer.profiling import timing as profiler

    say(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    scratch = Path(tempfile.mkdtemp(prefix="vramancer-predict-"))
    model, tokenizer = build(MEDIUM, torch.bfloat16)
    folder = scratch / "model"
    save(model, tokenizer, folder)
    del model
    config = load_config(resolve_model(str(folder)))
    description = describe_model(build_meta_model(config, torch.bfloat16), torch.bfloat16)
    devices = ["cuda:0", "cpu"] if torch.cuda.is_available() else ["cpu"]
    result = Result("gpu_prediction", "Where a GPU prediction and the real decode part ways (random Llama ~170 M, "
                    "bfloat16)", {"new tokens": args.tokens, "model": str(MEDIUM)},
                    {spec: (spec, 3) for spec in devices})
    figures: dict[str, dict[str, float]] = {}  # figure -> device -> value

    def note(spec: str, name: str, value: float) -> None:
        figures.setdefault(name, {})[spec] = value

    for spec in devices:
        os.environ["VRM_CACHE_DIR"] = str(scratch / f"cache-{spec.replace(':', '')}")  # profile afresh
        start = time.perf_counter()
        engine = Engine.load(str(folder), spec, dtype="bfloat16", context=512)
        say(f"\n== {spec}: loaded in {time.perf_counter() - start:.1f} s")
        timings = engine.pricing.timings
        for name, t in timings.devices.items():
            say(describe_timings("profiled at load", t))
            result.notes.append(describe_timings(f"{spec}, profiled at load, {name}", t))
        links = ", ".join(f"{a}→{b} {l.latency_s * 1e6:.0f} µs" for (a, b), l in timings.links.items())
        say(f"step overhead {timings.step_overhead_s * 1000:.3f} ms; links " + links)
        if links:
            result.notes.append(f"{spec}, links profiled at load: {links}")
        at_load = timings.devices.get(spec) or next(iter(timings.devices.values()))
        note(spec, LAYER_AT_LOAD, at_load.layer_decode_s * 1000)
        note(spec, OVERHEAD_AT_LOAD, timings.step_overhead_s * 1000)
        prediction = engine.predict()
        say(f"predicted {prediction.tokens_per_s:.1f} tok/s (step {prediction.step_s * 1000:.2f} ms)")
        engine.generate(PROMPT, raw=True, max_new_tokens=8)  # warm-up
        measured = max(engine.generate(PROMPT, raw=True, max_new_tokens=args.tokens).decode_tokens_per_s
                       for _ in range(2))
        say(f"measured {measured:.1f} tok/s (step {1000 / measured:.2f} ms); predicted ÷ measured "
            f"{prediction.tokens_per_s / measured:.3f}")
        note(spec, PREDICTED, prediction.tokens_per_s)
        note(spec, MEASURED, measured)
        result.comparisons.append(compare(f"{spec}: predicted ÷ measured decode tok/s", prediction.tokens_per_s / measured))
        layer_ms, stack_ms, hooked_rate = per_layer_ms(engine, args.tokens)
        say(f"engine, hooks waiting on the device: a layer {layer_ms:.3f} ms, the stack {stack_ms:.2f} ms, "
            f"{hooked_rate:.1f} tok/s with the hooks")
        note(spec, ENGINE_LAYER, layer_ms)
        torch_device = torch.device(spec)
        for attempt, figure in (("again, warm", LAYER_WARM), ("a third time", LAYER_THIRD)):
            t = profiler.time_device(description, torch_device, torch.bfloat16, spec)
            say(describe_timings(f"profiled {attempt}", t))
            note(spec, figure, t.layer_decode_s * 1000)
        count = MEDIUM.layers  # its layers are ~22 MiB: the profiler's cold stack holds them all
        best, median = unhooked_step_ms(config, torch_device, torch.bfloat16, count)
        say(f"cut model of {count} layers, whole steps, no hooks: a layer {best:.3f} ms best, {median:.3f} ms median")
        note(spec, CUT_BEST, best)
        note(spec, CUT_MEDIAN, median)
        overhead = profiler._time_step_overhead(config, torch.bfloat16, torch_device)
        say(f"step overhead timed again: {overhead * 1000:.3f} ms")
        note(spec, OVERHEAD_AGAIN, overhead * 1000)
        engine.close()
    order = (PREDICTED, MEASURED, LAYER_AT_LOAD, LAYER_WARM, LAYER_THIRD, CUT_BEST, CUT_MEDIAN, ENGINE_LAYER,
             OVERHEAD_AT_LOAD, OVERHEAD_AGAIN)
    result.add({figure: [figures[figure]] for figure in order if figure in figures})
    print(result.markdown())
    command = " ".join(["python -m benchmarks.gpu_prediction", *(sys.argv[1:] if argv is None else argv)])
    say(f"recorded in {record_in(result, command, machine(), results_folder())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
