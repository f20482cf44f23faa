"""What every benchmark shares: alternating rounds, summaries, ratios against targets, the
machine description, and the JSON / markdown output.

A benchmark runs its contenders in turns (A B A B …) after a warm-up round, so slow drift in
the machine's load (other processes, thermal state, page cache) hits every contender alike;
each turn starts after a full garbage collection, so none pays for another's garbage.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."

Sample = dict[str, float]  # metric name -> value, one per contender per round


def say(text: str) -> None:
    """Progress goes to stderr, so stdout stays the table."""
    print(text, file=sys.stderr, flush=True)


def alternate(contenders: dict[str, Callable[[], Sample]], rounds: int, warmup: int = 1) -> dict[str, list[Sample]]:
    """Run every contender once per round, in the same order, after `warmup` unrecorded rounds."""
    samples: dict[str, list[Sample]] = {name: [] for name in contenders}
    for r in range(warmup + rounds):
        recorded = r >= warmup
        for name, run in contenders.items():
            gc.collect()  # the previous contender's garbage is not collected on this one's clock
            start = time.perf_counter()
            sample = run()
            label = f"round {r - warmup + 1}/{rounds}" if recorded else "warm-up"
            say(f"  {label:<11} {name:<40} {_brief(sample)}  ({time.perf_counter() - start:.1f} s)")
            if recorded:
                samples[name].append(sample)
    return samples


def interleaved_steps(models: dict[str, tuple[object, object]], prompt_ids, tokens: int) -> dict[str, list[float]]:
    """Seconds per decode step of each model, the models stepped in turn one token at a time
    (A B, then B A, …) from the same prompt, so that the machine's drift, which moves whole
    rounds of one contender by ±15 % here, lands on every model alike within ~50 ms.

    `models`: name → (a transformers causal LM, the device its input ids go to). A step is
    the model's forward over one new token with its KV cache, as `generate` runs it, greedy;
    `generate`'s own loop around it is the same for every model, so it is left out. Raises
    if the models' greedy tokens part (they are meant to be one model, placed differently).
    For CPU models: a step is timed without waiting for a GPU to finish it."""
    import torch
    from transformers import DynamicCache

    caches = {name: DynamicCache(config=model.config) for name, (model, _) in models.items()}
    ids = {name: prompt_ids.to(device) for name, (_, device) in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    gc.collect()
    gc.disable()  # a collection inside one model's step would land on that model alone
    try:
        with torch.inference_mode():
            for step in range(tokens + 1):  # step 0 is the prompt, not timed
                chosen = {}
                for name in (names if step % 2 == 0 else names[::-1]):
                    model, device = models[name]
                    start = time.perf_counter()
                    out = model(input_ids=ids[name], past_key_values=caches[name], use_cache=True)
                    chosen[name] = out.logits[:, -1:].argmax(-1)
                    if step:
                        times[name].append(time.perf_counter() - start)
                    ids[name] = chosen[name].to(device)
                if len({int(token) for token in chosen.values()}) != 1:
                    raise RuntimeError(f"greedy tokens parted at step {step}: {chosen}")
    finally:
        gc.enable()
    return times


def interleaved_prefills(models: dict[str, tuple[object, object]], prompt_ids, times: int) -> dict[str, list[float]]:
    """Seconds of each model's forward over the whole prompt into an empty KV cache (the work
    of a first token, less `generate`'s loop around it, which is the same for every model),
    the models in turn (A B, then B A), `times` each after one untimed pass, with the GC off.
    For CPU models, as `interleaved_steps`."""
    import torch
    from transformers import DynamicCache

    ids = {name: prompt_ids.to(device) for name, (_, device) in models.items()}
    seconds: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    gc.collect()
    gc.disable()
    try:
        with torch.inference_mode():
            for turn in range(times + 1):
                for name in (names if turn % 2 == 0 else names[::-1]):
                    model = models[name][0]
                    cache = DynamicCache(config=model.config)
                    start = time.perf_counter()
                    model(input_ids=ids[name], past_key_values=cache, use_cache=True, logits_to_keep=1)
                    if turn:
                        seconds[name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return seconds


def prefill_ratio(what: str, a: tuple[object, object], b: tuple[object, object], prompt_ids, times: int,
                  **target) -> "Comparison":
    """a ÷ b in prompt speed (b's prefill time ÷ a's), prefilled in turn (`interleaved_prefills`):
    the median of the per-turn ratios."""
    seconds = interleaved_prefills({"a": a, "b": b}, prompt_ids, times)
    ratios = [tb / ta for ta, tb in zip(seconds["a"], seconds["b"])]
    detail = (f" (median of {len(ratios)} per-turn ratios; prompt of {prompt_ids.shape[-1]} tokens, "
              f"{1000 * statistics.median(seconds['a']):.1f} vs {1000 * statistics.median(seconds['b']):.1f} ms)")
    return compare(what + detail, statistics.median(ratios), **target)


def stepped_ratio(what: str, a: tuple[object, object], b: tuple[object, object], prompt_ids, rounds: int,
                  tokens: int, **target) -> "Comparison":
    """a ÷ b in decode speed, the two stepped in turn token by token (`interleaved_steps`):
    the median over every token of every round of (b's step time ÷ a's)."""
    ratios: list[float] = []
    steps: dict[str, list[float]] = {"a": [], "b": []}
    for r in range(rounds):
        times = interleaved_steps({"a": a, "b": b}, prompt_ids, tokens)
        ratios += [tb / ta for ta, tb in zip(times["a"], times["b"])]
        for side in steps:
            steps[side] += times[side]
        say(f"  stepped in turn, round {r + 1}/{rounds}: {what}: {1000 * statistics.median(times['a']):.2f} vs "
            f"{1000 * statistics.median(times['b']):.2f} ms a step")
    detail = (f" (median of {len(ratios)} per-token ratios; steps {1000 * statistics.median(steps['a']):.2f} "
              f"vs {1000 * statistics.median(steps['b']):.2f} ms)")
    return compare(what + detail, statistics.median(ratios), **target)


def _brief(sample: Sample) -> str:
    return "  ".join(f"{k} {v:.4g}" for k, v in sample.items() if isinstance(v, (int, float)))


def summarise(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values), "samples": values}


@dataclass
class Comparison:
    """One ratio between two contenders on one metric, and the target it is held to."""

    what: str  # e.g. "decode tok/s, 2-way split ÷ plain"
    ratio: float  # of the medians: what the target is held to
    target: str  # e.g. "≥ 0.97"
    met: bool | None  # None: informative, no target
    best_ratio: float | None = None  # of each side's best round: on a shared machine, the least disturbed

    def to_json(self) -> dict:
        return {"what": self.what, "ratio": round(self.ratio, 4), "target": self.target, "met": self.met,
                "ratio_of_bests": None if self.best_ratio is None else round(self.best_ratio, 4)}

    @classmethod
    def from_json(cls, data: dict) -> "Comparison":
        return cls(data["what"], data["ratio"], data["target"], data["met"], data["ratio_of_bests"])


def compare(what: str, ratio: float, *, at_least: float | None = None, at_most: float | None = None,
            best: float | None = None) -> Comparison:
    if at_least is not None:
        return Comparison(what, ratio, f"≥ {at_least:g}", ratio >= at_least, best)
    if at_most is not None:
        return Comparison(what, ratio, f"≤ {at_most:g}", ratio <= at_most, best)
    return Comparison(what, ratio, "", None, best)


@dataclass
class Result:
    """What one benchmark hands to the report."""

    name: str
    title: str
    settings: dict
    metrics: dict[str, tuple[str, int]]  # metric key -> (column heading, decimals)
    contenders: dict[str, dict[str, dict]] = field(default_factory=dict)  # name -> metric -> summary
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # skipped contenders and why, caveats

    def add(self, samples: dict[str, list[Sample]]) -> None:
        for name, rows in samples.items():
            self.contenders[name] = {m: summarise([row[m] for row in rows]) for m in self.metrics if m in rows[0]}

    def median(self, contender: str, metric: str) -> float:
        return self.contenders[contender][metric]["median"]

    def ratio(self, what: str, a: str, b: str, metric: str, higher_is_better: bool, **target) -> Comparison:
        """a ÷ b on `metric` (medians, and best rounds: max if higher is better, else min)."""
        pick = max if higher_is_better else min
        sa, sb = self.contenders[a][metric], self.contenders[b][metric]
        best = pick(sa["samples"]) / pick(sb["samples"])
        comparison = compare(what, sa["median"] / sb["median"], best=best, **target)
        self.comparisons.append(comparison)
        return comparison

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "title": self.title,
            "settings": self.settings,
            "metrics": {key: list(head) for key, head in self.metrics.items()},
            "contenders": self.contenders,
            "comparisons": [c.to_json() for c in self.comparisons],
            "notes": self.notes,
        }

    @classmethod
    def from_json(cls, data: dict) -> "Result":
        return cls(data["name"], data["title"], data["settings"], {k: tuple(v) for k, v in data["metrics"].items()},
                   data["contenders"], [Comparison.from_json(c) for c in data["comparisons"]], data["notes"])

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        settings = ", ".join(f"{k} {v}" for k, v in self.settings.items())
        if settings:
            lines += [f"Settings: {settings}.", ""]
        heads = [self.metrics[m][0] for m in self.metrics]
        lines.append("| contender | " + " | ".join(heads) + " |")
        lines.append("|---|" + "---|" * len(heads))
        for name, metrics in self.contenders.items():
            cells = []
            for m, (_, decimals) in self.metrics.items():
                s = metrics.get(m)
                if s is None:
                    cells.append("—")
                elif s["n"] == 1:
                    cells.append(f"{s['median']:.{decimals}f}")
                else:
                    cells.append(f"{s['median']:.{decimals}f} ({s['min']:.{decimals}f}–{s['max']:.{decimals}f})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if self.comparisons:
            lines += ["", "| ratio | of medians | target | met | of best rounds |", "|---|---|---|---|---|"]
            for c in self.comparisons:
                met = "" if c.met is None else ("yes" if c.met else "**no**")
                best = "" if c.best_ratio is None else f"{c.best_ratio:.3f}"
                lines.append(f"| {c.what} | {c.ratio:.3f} | {c.target} | {met} | {best} |")
        for note in self.notes:
            lines += ["", f"Note: {note}"]
        return "\n".join(lines)


def machine() -> dict:
    """CPU, cores, memory, GPUs and the versions that decide the numbers."""
    import psutil
    import torch
    import transformers

    info = {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [],
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import accelerate

        info["accelerate"] = accelerate.__version__
    except ImportError:
        pass
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(info: dict) -> str:
    gpus = ", ".join(info["gpus"]) or "no GPU"
    return (f"{info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, {gpus}; {info['os']}; "
            f"Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}")


def cli(bench: Callable[..., Result], doc: str, options: list[tuple]) -> Result:
    """A benchmark module's command line: its own options, and `--result PATH` for
    `benchmarks.run`, which runs every benchmark in a fresh process of its own. An option is
    (flag, type, default), or (flag, type, default, more of argparse's keywords: nargs, help…).
    Returns the result, once recorded, for a caller whose exit status depends on it."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    for flag, kind, default, *more in options:
        parser.add_argument(flag, type=kind, default=default, **(more[0] if more else {}))
    parser.add_argument("--result", help="write the result here as JSON instead of printing it")
    args = vars(parser.parse_args())
    out = args.pop("result")
    before = load_average()
    result = bench(**args)
    # How busy the machine was, for every run: on a shared machine it says how much of a
    # timing was the machine's.
    result.notes.append(f"{before} at the start, {load_average().removeprefix('load average ')} at the end")
    if out:
        Path(out).write_text(json.dumps(result.to_json(), ensure_ascii=False))
        return result
    info = machine()
    print(json.dumps({"machine": info, result.name: result.to_json()}, indent=2, ensure_ascii=False))
    print()
    print(result.markdown())
    from benchmarks.report import record, write_doc  # the run is kept, and the doc's table follows it

    command = " ".join(["python -m", f"benchmarks.{result.name}", *sys.argv[1:]])
    say(f"recorded in {record(result, command, info).name}; updated {write_doc().name}")
    return result


def missed(result: Result) -> bool:
    """Whether any of the result's targets was not met (for a benchmark run as a check)."""
    return any(c.met is False for c in result.comparisons)


def load_average() -> str:
    """The machine's load average now (1, 5 and 15 minutes), for a result's notes: on a shared
    machine it says how much of a timing was the machine's."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} {five:.1f} {fifteen:.1f} on {os.cpu_count()} cores"
