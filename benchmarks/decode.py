"""Decode speed and time to first token: plain transformers unsplit vs VRAMancer split.

Both contenders live in one process and take turns (A B A B …) after a warm-up, so drift in
machine load hits them alike. Greedy, fixed prompt, fixed token count.

    python -m benchmarks.decode [--rounds 5] [--tokens 128] [--devices sim:2x1GiB]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def plain_contender():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    from vramancer.engine.models import bundled_model_path

    path = bundled_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)

    class Clock(TextStreamer):
        def __init__(self):
            super().__init__(tokenizer, skip_prompt=True)
            self.times = []

        def put(self, value):
            if not self.next_tokens_are_prompt:
                self.times.append(time.perf_counter())
            super().put(value)

        def on_finalized_text(self, text, stream_end=False):
            pass

    def run(tokens):
        clock = Clock()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False, streamer=clock,
                                 temperature=None, top_p=None, top_k=None)
        t = clock.times
        return out[0, inputs["input_ids"].shape[1]:].tolist(), t[0] - start, (len(t) - 1) / (t[-1] - t[0])

    return run


def vramancer_contender(devices: str):
    from vramancer.engine import Engine

    engine = Engine.load("default", devices)

    def run(tokens):
        result = engine.generate(PROMPT, max_new_tokens=tokens)
        return result.token_ids, result.ttft_s, result.decode_tokens_per_s

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--devices", action="append", default=None, help="repeatable; default sim:2x1GiB and sim:3x1GiB")
    parser.add_argument("--out", default=None, help="write the JSON here too")
    args = parser.parse_args()
    specs = args.devices or ["sim:2x1GiB", "sim:3x1GiB"]
    import torch
    import transformers

    contenders = {"plain transformers (unsplit)": plain_contender()}
    for spec in specs:
        contenders[f"vramancer {spec}"] = vramancer_contender(spec)
    for run in contenders.values():
        run(8)  # warm-up
    samples = {name: {"ttft_s": [], "tokens_per_s": [], "tokens": None} for name in contenders}
    for _ in range(args.rounds):
        for name, run in contenders.items():
            tokens, ttft, rate = run(args.tokens)
            samples[name]["ttft_s"].append(ttft)
            samples[name]["tokens_per_s"].append(rate)
            samples[name]["tokens"] = samples[name]["tokens"] or tokens
    base = "plain transformers (unsplit)"
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "transformers": transformers.__version__},
        "rounds": args.rounds, "new_tokens": args.tokens, "results": {},
    }
    for name, s in samples.items():
        report["results"][name] = {
            "tokens_per_s_median": statistics.median(s["tokens_per_s"]),
            "tokens_per_s_range": [min(s["tokens_per_s"]), max(s["tokens_per_s"])],
            "ttft_s_median": statistics.median(s["ttft_s"]),
            "ttft_s_range": [min(s["ttft_s"]), max(s["ttft_s"])],
            "same_tokens_as_plain": s["tokens"] == samples[base]["tokens"],
            "decode_ratio_vs_plain": statistics.median(s["tokens_per_s"]) / statistics.median(samples[base]["tokens_per_s"]),
            "ttft_ratio_vs_plain": statistics.median(s["ttft_s"]) / statistics.median(samples[base]["ttft_s"]),
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print()
    print("| contender | decode tok/s (median, min–max) | ratio | TTFT s (median) | ratio | same tokens |")
    print("|---|---|---|---|---|---|")
    for name, r in report["results"].items():
        lo, hi = r["tokens_per_s_range"]
        print(f"| {name} | {r['tokens_per_s_median']:.1f} ({lo:.1f}–{hi:.1f}) | {r['decode_ratio_vs_plain']:.3f} | "
              f"{r['ttft_s_median']:.3f} | {r['ttft_ratio_vs_plain']:.3f} | {r['same_tokens_as_plain']} |")


if __name__ == "__main__":
    main()
