"""A model bigger than its devices: layers streamed from the host and disk tiers, against the
bound the copies allow and against accelerate's disk offload of the same layers.

A random-weight Qwen2-shaped model is saved as a folder and loaded on simulated devices whose
total is half the model, with a host tier (then a disk tier) that takes what they cannot hold.
Contenders, in turns (A B A B …) after a warm-up:

- plain transformers on the unsplit model (the reference tokens);
- VRAMancer with every layer resident on devices large enough (compute alone);
- VRAMancer with the host tier, then with the disk tier;
- accelerate (`from_pretrained(device_map=…, offload_folder=…)`) with the same layers on "disk";
- a batch of 8 sequences on the host tier (aggregate tok/s).

The bound for a tier is min(compute-only tok/s, tier→device rate ÷ bytes streamed per token),
the rate measured in the same run (runtime/streaming.py's probe). Greedy tokens must equal the
unsplit model's. Decode tok/s is (N − 1) ÷ (time for N tokens − time for 1 token).

    python -m benchmarks.offload [--rounds 2] [--tokens 16] [--threads 1] [--size small|1.5b]

Without a GPU, accelerate's "cpu" offload keeps the layers where they run (the CPU), so it is
the unsplit model; its "disk" offload is the one that moves weights, and is what is compared.
The disk tier's file (and accelerate's offload folder) is read through the page cache, which
holds it after the first token on a machine with memory to spare: the disk's own speed shows
only in the probe.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import PROMPT, Result, alternate, cli, say

# Qwen2-1.5B's shape (the target) and a smaller one of the same family that runs in a
# few minutes on two shared cores: same layer layout, a quarter of the depth and width.
SHAPES = {
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936),
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                  num_key_value_heads=2, vocab_size=32000),
}
CONTEXT = 256


def build(size: str, folder: Path):
    """A seeded random Qwen2 of `size`, saved with a word-level tokenizer; (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from benchmarks.random_llama import make_tokenizer

    shape = SHAPES[size]
    tokenizer = make_tokenizer(shape["vocab_size"], PROMPT)
    config = Qwen2Config(**shape, max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=None, pad_token_id=None, initializer_range=0.05)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.requires_grad_(False)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    from transformers import AutoTokenizer

    # As the engine will read it back, so both sides start from the same ids.
    return model, AutoTokenizer.from_pretrained(folder)


def decode_rate(generate, tokens: int) -> tuple[float, list[int], float]:
    """(decode tok/s, token ids, CPU seconds per decoded token of every thread of the process)
    of `generate(n)`, which returns the ids of n new tokens."""
    start, cpu = time.perf_counter(), time.process_time()
    generate(1)
    first, first_cpu = time.perf_counter() - start, time.process_time() - cpu
    start, cpu = time.perf_counter(), time.process_time()
    ids = generate(tokens)
    whole, whole_cpu = time.perf_counter() - start, time.process_time() - cpu
    return (tokens - 1) / max(whole - first, 1e-9), ids, max(whole_cpu - first_cpu, 0.0) / (tokens - 1)


def hf_generate(model, tokenizer):
    inputs = tokenizer(PROMPT, return_tensors="pt")
    inputs.pop("token_type_ids", None)

    def generate(n: int) -> list[int]:
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    return generate


def engine_generate(engine):
    def generate(n: int) -> list[int]:
        return engine.generate(PROMPT, raw=True, max_new_tokens=n).token_ids

    return generate


def memory_rates(nbytes: int = 256 * 2**20, repeat: int = 3) -> dict[str, float]:
    """This machine's memory, as streaming uses it (GB/s): a memcpy alone (the copy thread),
    a matrix-vector product over weights read from memory alone (a decode step's compute), and
    the two at once on two threads; and how many cores' worth of time the pair got (their CPU
    time over the wall time: 2 when each had a core, 1 when they took turns on one)."""
    import ctypes
    import threading

    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    weights = torch.ones(nbytes // 4 // 4096, 4096)
    vector = torch.ones(4096)

    def copy() -> float:
        start = time.perf_counter()
        for _ in range(repeat):
            ctypes.memmove(dst.data_ptr(), src.data_ptr(), nbytes)
        return repeat * nbytes / (time.perf_counter() - start) / 1e9

    def product() -> float:
        start = time.perf_counter()
        for _ in range(repeat):
            torch.mv(weights, vector)
        return repeat * nbytes / (time.perf_counter() - start) / 1e9

    copy(), product()  # pages faulted in
    rates = {"copy": copy(), "product": product()}
    both: dict[str, float] = {}
    helper = threading.Thread(target=lambda: both.__setitem__("copy", copy()))
    start, cpu = time.perf_counter(), time.process_time()
    helper.start()
    both["product"] = product()
    helper.join()
    rates.update({"copy beside": both["copy"], "product beside": both["product"],
                  "cores": (time.process_time() - cpu) / (time.perf_counter() - start)})
    return rates


def accelerate_disk(folder: Path, resident: list[int], layers: int, offload: Path):
    """The model from `folder` with accelerate's hooks: the layers not in `resident` on "disk"."""
    from transformers import AutoModelForCausalLM

    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "cpu" if i in resident else "disk" for i in range(layers)})
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map=device_map,
                                                 offload_folder=str(offload))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model.eval()


def bench(rounds: int = 2, tokens: int = 16, threads: int = 1, size: str = "small") -> Result:
    from benchmarks.batching import batch_runner
    from vramancer.config.options import LoadOptions
    from vramancer.config.units import MiB
    from vramancer.engine import Engine
    from vramancer.runtime.streaming import measure_rate

    if threads:
        torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="vramancer-offload-"))
    engines = []
    try:
        say(f"building a random Qwen2 ({size}) in {work}")
        model, tokenizer = build(size, work / "model")
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        half = weights // 2
        devices = f"sim:2x{half // 2 // MiB}MiB"
        whole = f"{weights * 2 // MiB}MiB"
        say(f"model {weights / 2**30:.2f} GiB; devices {devices}")
        compute = Engine.load(LoadOptions(str(work / "model"), f"sim:2x{weights // MiB}MiB", context=CONTEXT))
        host = Engine.load(LoadOptions(str(work / "model"), devices, context=CONTEXT, host_tier=whole))
        disk = Engine.load(LoadOptions(str(work / "model"), devices, context=CONTEXT, disk_tier=whole))
        engines += [compute, host, disk]
        streamed = sorted(host.split.streamed)
        assert streamed, "the model should not fit the devices"
        per_token = {name: sum(e.profile.layer_bytes[i] for i in e.split.streamed) for name, e in
                     (("host", host), ("disk", disk))}
        say(f"streamed: host tier {streamed}, disk tier {sorted(disk.split.streamed)}")
        layers = host.profile.num_layers
        resident = [i for i in range(layers) if i not in streamed]
        offloaded = accelerate_disk(work / "model", resident, layers, work / "offload")
        runs = {
            "plain transformers, unsplit": hf_generate(model, tokenizer),
            "VRAMancer, all resident (compute only)": engine_generate(compute),
            "VRAMancer, host tier": engine_generate(host),
            "VRAMancer, disk tier": engine_generate(disk),
            "accelerate, same layers on disk": hf_generate(offloaded, tokenizer),
        }
        reference: list[int] = []
        seen: dict[str, list[int]] = {}
        cpu: dict[str, list[float]] = {}
        load = os.getloadavg()[0]

        def contender(name, generate):
            def run() -> dict:
                rate, ids, seconds = decode_rate(generate, tokens)
                seen[name] = ids
                cpu.setdefault(name, []).append(seconds)
                return {"decode_tok_s": rate}
            return run

        contenders = {name: contender(name, generate) for name, generate in runs.items()}
        one = batch_runner(host, 1, tokens)
        eight = batch_runner(host, 8, tokens)
        contenders["VRAMancer, host tier, batch of 1"] = one
        contenders["VRAMancer, host tier, batch of 8"] = eight
        samples = alternate(contenders, rounds)
        load = max(load, os.getloadavg()[0])
        memory = memory_rates()
        reference = seen["plain transformers, unsplit"]
        equal = {name: ids == reference for name, ids in seen.items()}
        rates = {"host": measure_rate("host", torch.device("cpu")), "disk": measure_rate("disk", torch.device("cpu"))}
        result = Result("offload", "Bigger than the devices: host and disk tiers (random Qwen2, simulated devices)",
                        {"model": f"Qwen2-shaped {size}, {weights / 2**30:.2f} GiB float32", "devices": devices,
                         "streamed layers": f"host tier {len(streamed)} of {layers} ({per_token['host'] / 2**20:.0f} MiB "
                                            f"per token), disk tier {len(disk.split.streamed)} "
                                            f"({per_token['disk'] / 2**20:.0f} MiB)",
                         "new tokens": tokens, "rounds": rounds, "torch threads": torch.get_num_threads()},
                        {"decode_tok_s": ("decode tok/s", 2), "bound_tok_s": ("bound tok/s", 2)})
        result.add(samples)
        compute_rate = result.median("VRAMancer, all resident (compute only)", "decode_tok_s")
        for tier in ("host", "disk"):
            bound = min(compute_rate, rates[tier] / per_token[tier])
            name = f"VRAMancer, {tier} tier"
            result.contenders[name]["bound_tok_s"] = {"median": bound, "min": bound, "max": bound, "n": 1,
                                                      "samples": [bound]}
            result.comparisons.append(_against(f"decode tok/s, {tier} tier ÷ bound "
                                               f"(min(compute, {rates[tier] / 1e9:.2f} GB/s ÷ bytes per token))",
                                               result.contenders[name]["decode_tok_s"]["median"] / bound, 0.7))
        result.ratio("decode tok/s, host tier ÷ accelerate disk offload", "VRAMancer, host tier",
                     "accelerate, same layers on disk", "decode_tok_s", True, at_least=2)
        result.ratio("decode tok/s, disk tier ÷ accelerate disk offload", "VRAMancer, disk tier",
                     "accelerate, same layers on disk", "decode_tok_s", True, at_least=2)
        result.ratio("aggregate tok/s, batch of 8 ÷ batch of 1 (host tier)", "VRAMancer, host tier, batch of 8",
                     "VRAMancer, host tier, batch of 1", "decode_tok_s", True, at_least=5)
        result.notes.append("greedy tokens equal to the unsplit model's: "
                            + ", ".join(f"{name} {'yes' if ok else '**no**'}" for name, ok in equal.items()))
        result.notes.append(f"measured tier→device rates: host {rates['host'] / 1e9:.2f} GB/s, disk (page cache "
                            f"dropped) {rates['disk'] / 1e9:.2f} GB/s; the streamer reached "
                            + ", ".join(f"{t} {s['gb_per_s']:.2f} GB/s" for t, s in host.split.streamer.snapshot().items()
                                        if s["copies"]) + " (host engine), "
                            + ", ".join(f"{t} {s['gb_per_s']:.2f} GB/s" for t, s in disk.split.streamer.snapshot().items()
                                        if s["copies"]) + " (disk engine)")
        result.notes.append("compute waited for (or copied beside the copy thread) copies prefetch had not finished: "
                            f"{host.split.streamer.waited_s:.1f} s (host engine), {disk.split.streamer.waited_s:.1f} s "
                            "(disk engine), over every round")
        result.notes.append("CPU time per decoded token, every thread of the process (median of the rounds): "
                            + ", ".join(f"{name} {statistics.median(v[1:]) * 1e3:.0f} ms"  # [0]: the warm-up's
                                        for name, v in cpu.items()) + f"; load average {load:.1f} (the highest "
                            f"of before and after the rounds, on {os.cpu_count()} cores)")
        result.notes.append(f"this machine's memory: a memcpy {memory['copy']:.1f} GB/s alone, a matrix-vector "
                            f"product {memory['product']:.1f} GB/s alone; at once on two threads "
                            f"{memory['copy beside']:.1f} + {memory['product beside']:.1f} GB/s, with "
                            f"{memory['cores']:.2f} cores' worth of time between them")
        result.notes.append("no GPU here: accelerate's \"cpu\" offload would run the layers where they are, so only "
                            "its \"disk\" offload is compared")
        return result
    finally:
        for engine in engines:
            engine.close()
        shutil.rmtree(work, ignore_errors=True)


def _against(what: str, ratio: float, at_least: float):
    from benchmarks.common import compare

    return compare(what, ratio, at_least=at_least)


if __name__ == "__main__":
    cli(bench, __doc__, [("--rounds", int, 2), ("--tokens", int, 16), ("--threads", int, 1), ("--size", str, "small")])
