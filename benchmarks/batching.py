"""Continuous batching at the engine (no HTTP): aggregate decode tok/s with 1, 4 and 8
sequences decoding together on the bundled model split 2-way, against `Engine.generate` alone.

Each round runs every contender once, in turns (A B A B …) after a warm-up: `generate` on one
prompt, then a batch of 1, 4 and 8 requests submitted at once (different story prompts,
greedy, the same number of new tokens each). Aggregate decode tok/s counts the tokens every
sequence made after the last of them joined, over the time from that join to the last token:
the batch at full size, without the prefills. TTFT is from submitting to a request's first
token (the prefills run one after another, so the last request waits for the others').

    python -m benchmarks.batching [--rounds 3] [--tokens 48] [--threads N] [--compare 1]

`--threads` sets torch's threads (0: torch's default, one per core). On a machine other work
shares, 1 thread is steadier: threads that wait for a busy core spin. `--compare 1` adds, in the
same turns, batches of 4 and 8 on torch's own paths instead of our kernels (kernels/cpu/few_rows.py:
linear layers on MKL's W @ x.T, RMSNorm eager, attention SDPA), and a batch of 8 with only our
linear-layer kernel.
"""

from __future__ import annotations

import statistics
import time

from benchmarks.common import PROMPT, Result, alternate, cli, say

SPLIT = "sim:2x1GiB"
SIZES = (1, 4, 8)
SUBJECTS = ("a lighthouse keeper", "a baker in Lyon", "two sisters on a farm", "a robot gardener",
            "a lost cat", "a sailor and a whale", "a clockmaker's apprentice", "a mountain village")


def prompts(count: int) -> list[str]:
    return [f"Write a long story about {subject} who finds a message in a bottle." for subject in SUBJECTS[:count]]


def batch_runner(engine, count: int, tokens: int):
    from vramancer.engine import events as ev

    def run() -> dict:
        done: list[ev.GenerationDone] = []
        batch = engine.batch(lambda event: done.append(event) if isinstance(event, ev.GenerationDone) else None)
        for i, prompt in enumerate(prompts(count)):
            batch.submit(ev.Submit(f"r{i}", prompt, {"max_new_tokens": tokens}))
        joined, members, steps = None, [], []
        while batch.busy:
            start = time.perf_counter()
            batch.step()
            if joined is None and not batch.waiting:  # the last one has just joined
                members = list(batch.running)
                joined = max(s.token_times[0] for s in members)
            elif joined is not None:
                steps.append(time.perf_counter() - start)
        after = [t for s in members for t in s.token_times if t > joined]
        last = max(after)
        return {"decode_tok_s": len(after) / (last - joined), "ttft_ms": statistics.median(d.ttft_s for d in done) * 1000,
                "step_ms": statistics.median(steps) * 1000 if steps else float("nan"),
                "new_tokens": sum(d.new_tokens for d in done)}

    return run


def without(kernels: set[str], run):
    """`run` with a batch's rows on torch's own paths instead of these of our kernels
    (kernels/cpu/few_rows.py: linear layers on MKL's W @ x.T, RMSNorm and attention eager/SDPA)."""
    from vramancer.kernels.cpu import few_rows

    def plain() -> dict:
        few_rows.enabled.difference_update(kernels)
        try:
            return run()
        finally:
            few_rows.enabled.update(kernels)

    return plain


def generate_runner(engine, tokens: int):
    def run() -> dict:
        result = engine.generate(PROMPT, max_new_tokens=tokens)
        return {"decode_tok_s": result.decode_tokens_per_s, "ttft_ms": result.ttft_s * 1000,
                "new_tokens": result.new_tokens}

    return run


def bench(rounds: int = 3, tokens: int = 48, threads: int = 0, compare: int = 0) -> Result:
    import torch

    from vramancer.engine import Engine
    from vramancer.kernels.cpu.few_rows import KERNELS

    if threads:
        torch.set_num_threads(threads)

    result = Result(
        "batching", "Continuous batching at the engine (bundled SmolLM2-135M, 2-way split, greedy)",
        {"new tokens": tokens, "rounds": rounds, "split": SPLIT, "dtype": "float32 (CPU)",
         "torch threads": torch.get_num_threads()},
        {"decode_tok_s": ("aggregate decode tok/s", 1), "ttft_ms": ("TTFT ms (median)", 0),
         "step_ms": ("decode step ms", 1)},
    )
    say("batching: loading the bundled model")
    engine = Engine.load("default", SPLIT, context=2048, weights="native")
    solo = "Engine.generate, alone"
    contenders = {solo: generate_runner(engine, tokens)}
    for count in SIZES:
        contenders[f"batch of {count}"] = batch_runner(engine, count, tokens)
        if compare and count > 1:
            contenders[f"batch of {count}, torch only"] = without(set(KERNELS), batch_runner(engine, count, tokens))
        if compare and count == 8:
            contenders[f"batch of {count}, our linear kernel only"] = without({"rms_norm", "attention"},
                                                                            batch_runner(engine, count, tokens))
    result.add(alternate(contenders, rounds))
    result.ratio("batch of 1 ÷ generate, decode tok/s", "batch of 1", solo, "decode_tok_s", True, at_least=0.95)
    result.ratio("batch of 4 ÷ batch of 1, aggregate decode tok/s", "batch of 4", "batch of 1", "decode_tok_s", True)
    result.ratio("batch of 8 ÷ batch of 1, aggregate decode tok/s", "batch of 8", "batch of 1", "decode_tok_s", True,
                 at_least=4.0)
    if compare:
        for count in SIZES[1:]:
            result.ratio(f"batch of {count}: our kernels ÷ torch only, decode step ms", f"batch of {count}",
                         f"batch of {count}, torch only", "step_ms", False)
        result.ratio("batch of 8: our linear kernel only ÷ torch only, decode step ms",
                     "batch of 8, our linear kernel only", "batch of 8, torch only", "step_ms", False)
    engine.close()
    return result


if __name__ == "__main__":
    cli(bench, __doc__, [("--rounds", int, 3), ("--tokens", int, 48), ("--threads", int, 0), ("--compare", int, 0)])
