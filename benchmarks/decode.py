"""Decode speed and time to first token: plain transformers unsplit vs VRAMancer split 2-way
and 3-way, vs VRAMancer with a migration every 16 tokens, and (on real GPUs) vs accelerate's
`dispatch_model` with the very same layer→device map.

All contenders live in one process and take turns (A B A B …) after a warm-up; greedy, a
fixed prompt, a fixed number of new tokens. TTFT is from the call to `generate` (prompt
already tokenised) to the first new token; decode tok/s is over the tokens after the first.
Rounds of `generate` spread more than the targets (≥ 0.97 of plain) allow here, so the 2-way
split is also run in turn with plain transformers one decode step, and one prompt, at a time;
the targets are held to the medians of those per-step and per-prompt ratios.

    python -m benchmarks.decode [--rounds 5] [--tokens 128]
"""

from __future__ import annotations

import time

from benchmarks.common import (
    PROMPT,
    Result,
    alternate,
    cli,
    prefill_ratio,
    say,
    stepped_ratio,
)

SPLIT_2, SPLIT_3 = "sim:2x1GiB", "sim:3x1GiB"
MIGRATE_EVERY = 16
PLAIN = "plain transformers, unsplit"


class _Clock:
    """A streamer that only notes when each new token arrives."""

    def __init__(self):
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if value.is_cuda:
            value.cpu()  # wait for the token itself, not just its launch
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass


def _hf_runner(model, inputs: dict, tokens: int):
    """generate() on a transformers model, timed like VRAMancer times itself."""
    import torch

    def run():
        clock = _Clock()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False, streamer=clock,
                                 temperature=None, top_p=None, top_k=None, pad_token_id=model.generation_config.eos_token_id)
        t = clock.times
        return out[0, inputs["input_ids"].shape[1]:].tolist(), t[0] - start, (len(t) - 1) / (t[-1] - t[0])

    return run


def plain_model(device: str, dtype):
    """The bundled model as a transformers user loads it: straight from the GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vramancer.model.source import bundled_model_path

    path = bundled_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).to(device).eval()
    return tokenizer, model


def chat_inputs(tokenizer, device: str) -> dict:
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    return {k: v.to(device) for k, v in inputs.items()}


def vramancer_runner(engine, tokens: int, migrate_every: int | None = None):
    """Engine.generate; with `migrate_every`, the layers just before the first boundary move
    to the next device and back, in turns, every that many tokens (weights and KV cache)."""
    moves: list = []
    if migrate_every:
        blocks = engine.placement.blocks()
        home, away = blocks[0].device, blocks[1].device
        last = blocks[0].layers.last
        first = max(blocks[0].layers.first, last - 4)  # five layers: about 68 MiB in float32

        def on_step(n: int) -> None:
            if n % migrate_every == 0 and n < tokens:
                where = engine.placement.layer_devices[first]
                moves.append(engine.migrate(first, last, away if where == home else home, step=n))
    else:
        on_step = None

    def run():
        moves.clear()
        result = engine.generate(PROMPT, max_new_tokens=tokens, on_step=on_step)
        return result.token_ids, result.ttft_s, result.decode_tokens_per_s

    return run, moves


def accelerate_model(model, engine):
    """`model` dispatched by accelerate over the same devices VRAMancer placed each part on."""
    from accelerate import dispatch_model

    placement = engine.placement
    device_of = {d.name: str(d.torch_device) for d in engine.devices}
    device_map = {"model.embed_tokens": device_of[placement.embed], "model.rotary_emb": device_of[placement.embed],
                  "model.norm": device_of[placement.head], "lm_head": device_of[placement.head]}
    for i, name in enumerate(placement.layer_devices):
        device_map[f"model.layers.{i}"] = device_of[name]
    return dispatch_model(model, device_map=device_map), device_map


def bench(rounds: int = 5, tokens: int = 128) -> Result:
    import torch

    from vramancer.engine import Engine

    result = Result(
        "decode", "Decode and time to first token (bundled SmolLM2-135M, greedy)",
        {"new tokens": tokens, "rounds": rounds, "dtype": "float32 (CPU)"},
        {"decode_tok_s": ("decode tok/s", 1), "ttft_ms": ("TTFT ms", 1), "migration_gb_s": ("migration GB/s", 2)},
    )
    say("decode: loading contenders")
    tokenizer, plain = plain_model("cpu", torch.float32)
    engines = {f"VRAMancer 2-way ({SPLIT_2})": Engine.load("default", SPLIT_2, weights="native"),
               f"VRAMancer 3-way ({SPLIT_3})": Engine.load("default", SPLIT_3, weights="native"),
               f"VRAMancer 2-way, migration every {MIGRATE_EVERY} tokens": Engine.load("default", SPLIT_2, weights="native")}
    runners = {PLAIN: (_hf_runner(plain, chat_inputs(tokenizer, "cpu"), tokens), None)}
    for i, (name, engine) in enumerate(engines.items()):
        runners[name] = vramancer_runner(engine, tokens, MIGRATE_EVERY if i == 2 else None)
    gpu_runners = {}
    if torch.cuda.is_available():
        gpu_runners = _gpu_contenders(tokens, result)
    else:
        reason = "accelerate dispatch_model skipped: no CUDA device here, and on the CPU alone there is no split for it to make"
        say(f"decode: {reason}")
        result.notes.append(reason)

    tokens_seen: dict[str, list[int]] = {}

    def sampler(name, run, moves):
        def sample():
            ids, ttft, rate = run()
            tokens_seen.setdefault(name, ids)
            row = {"decode_tok_s": rate, "ttft_ms": ttft * 1000}
            if moves:
                row["migration_gb_s"] = sum(m.bytes for m in moves) / sum(m.seconds for m in moves) / 1e9
            return row
        return sample

    contenders = {name: sampler(name, run, moves) for name, (run, moves) in runners.items()}
    result.add(alternate(contenders, rounds))
    if gpu_runners:
        gpu = {name: sampler(name, run, moves) for name, (run, moves) in gpu_runners.items()}
        result.add(alternate(gpu, rounds))

    for name in engines:
        short = name.split(" (")[0]
        result.ratio(f"{short}: decode tok/s ÷ plain (generate rounds)", name, PLAIN, "decode_tok_s", True)
        result.ratio(f"{short}: TTFT speed (plain TTFT ÷ its TTFT, generate rounds)", PLAIN, name, "ttft_ms", False)
    # Rounds of `generate` spread wider than the 3 % the targets allow; the decode step and the
    # prompt's forward pass are held to them with the two models run in turn (benchmarks.common).
    split = engines[f"VRAMancer 2-way ({SPLIT_2})"]
    pair = (split.model, split.split.input_device), (plain, torch.device("cpu"))
    prompt_ids = chat_inputs(tokenizer, "cpu")["input_ids"]
    result.comparisons.append(stepped_ratio("VRAMancer 2-way: decode speed ÷ plain, stepped in turn", *pair,
                                            prompt_ids, 3, min(tokens, 64), at_least=0.97))
    result.comparisons.append(prefill_ratio("VRAMancer 2-way: first-token speed ÷ plain, prompts in turn", *pair,
                                            prompt_ids, 3 * rounds + 6, at_least=0.97))
    _gpu_comparisons(result, gpu_runners)
    gpu_plain = next(iter(gpu_runners), None)
    same = {name: ids == tokens_seen[gpu_plain if name.startswith("GPU") else PLAIN]
            for name, ids in tokens_seen.items() if name not in (PLAIN, gpu_plain)}
    result.settings["same tokens as plain"] = "all" if all(same.values()) else ", ".join(n for n, s in same.items() if not s) + " DIFFER"
    for engine in engines.values():
        engine.close()
    return result


def _gpu_contenders(tokens: int, result: Result) -> dict:
    """cuda:0 + cpu: plain on cuda:0, VRAMancer's split, accelerate with the same map."""
    import torch

    from vramancer.engine import Engine

    engine = Engine.load("default", "cuda:0,cpu", weights="native")
    result.settings["GPU dtype"] = str(engine.dtype).removeprefix("torch.")
    tokenizer, plain = plain_model("cuda:0", engine.dtype)
    _, to_dispatch = plain_model("cpu", engine.dtype)
    dispatched, device_map = accelerate_model(to_dispatch, engine)
    say(f"decode: GPU split {sorted(set(device_map.values()))}: "
        + ", ".join(f"{b.device} L{b.layers.first}–{b.layers.last}" for b in engine.placement.blocks()))
    runners = {"GPU plain, unsplit on cuda:0": (_hf_runner(plain, chat_inputs(tokenizer, "cuda:0"), tokens), None),
               "GPU VRAMancer cuda:0 + cpu": vramancer_runner(engine, tokens),
               "GPU accelerate dispatch_model, same map": (_hf_runner(dispatched, chat_inputs(tokenizer, device_map["model.embed_tokens"]), tokens), None)}
    torch.cuda.synchronize()
    return runners


def _gpu_comparisons(result: Result, runners: dict) -> None:
    if not runners:
        return
    plain, vram, acc = list(runners)
    result.ratio("GPU: VRAMancer ÷ plain cuda:0, decode tok/s", vram, plain, "decode_tok_s", True)
    result.ratio("GPU: VRAMancer ÷ accelerate, decode tok/s", vram, acc, "decode_tok_s", True)
    result.ratio("GPU: TTFT speed (accelerate TTFT ÷ VRAMancer TTFT)", acc, vram, "ttft_ms", False)


if __name__ == "__main__":
    cli(bench, __doc__, [("--rounds", int, 5), ("--tokens", int, 128)])
