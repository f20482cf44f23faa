"""Real scale (issue 29): `plan` of 7B and 72B configs, and 1.5B loads onto simulated devices,
each held to the issue's target.

- `plan` of a Qwen2-7B and a Qwen2-72B config folder (no weights: written by `save_pretrained`
  from their published shapes), first run (an empty cache folder): seconds from spawn to exit
  and the child's peak RSS. Targets: 7B ≤ 20 s and ≤ 1.5 GiB; 72B under 4 GiB.
- A random-weight Qwen2-1.5B (bfloat16 safetensors, benchmarks/load_scale.py builds it) loaded
  by `Engine.load` onto two simulated devices under q4, q8 and native bfloat16, each in a fresh
  process. The child first loads a one-layer copy (every import and the CPU kernels) and plans
  the real model (its timings go to the cache, so the measured load is the load, not the
  first profiling), gives freed memory back and notes its RSS: the runtime's fixed cost. Then
  the peak is reset and the model loaded. Targets: peak RSS q4 ≤ 2.0 GiB, q8 ≤ 2.4 GiB,
  bfloat16 ≤ 1.15 × the checkpoint + 0.7 GiB; after the load, RSS ≤ 1.2 × (the weights the
  plan puts on the host-side devices + the fixed cost).
- The issue's Q4_K_M GGUF row against llama.cpp's own start is benchmarks/gguf_start.py.

    python -m benchmarks.scale [--weights q4,q8,native] [--plans 7B,72B]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import Result, cli, compare, say
from benchmarks.load_scale import GIB, build_model, vm

# Qwen2-7B and Qwen2-72B's published shapes.
PLAN_SHAPES = {
    "7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4),
    "72B": dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8),
}
PLAN_TARGETS = {"7B": (20.0, 1.5), "72B": (None, 4.0)}  # (seconds, GiB) at most
LOAD_DEVICES = {"q4": "sim:2x1000MiB", "q8": "sim:2x1200MiB", "native": "sim:2x1900MiB"}
PEAK_TARGETS = {"q4": 2.0, "q8": 2.4}  # GiB; native: 1.15 x the checkpoint + 0.7 GiB
AFTER_LOAD = 1.2  # RSS after the load ÷ (plan's host-side weights + fixed cost), at most
ROOT = Path(__file__).resolve().parents[1]


def config_folder(folder: Path, size: str) -> Path:
    from transformers import Qwen2Config

    if not (folder / "config.json").is_file():
        Qwen2Config(vocab_size=152064, tie_word_embeddings=False, max_position_embeddings=32768,
                    **PLAN_SHAPES[size]).save_pretrained(folder)
    return folder


_PLAN_CHILD = """
import json, sys
from vramancer.cli.main import main
status = main(["plan", "--model", sys.argv[1], "--json"])
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({"status": status, "peak": peak}), file=sys.stderr)
"""


def plan_once(folder: Path, env: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="vramancer-bench-scale-") as cache:
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", _PLAN_CHILD, str(folder)], capture_output=True, text=True,
                             env=dict(env, VRM_CACHE_DIR=cache), check=False)
        seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"plan of {folder.name} failed:\n{out.stderr[-2000:]}")
    plan = json.loads(out.stdout)
    child = json.loads(out.stderr.strip().splitlines()[-1])
    return {"seconds": seconds, "peak_gib": child["peak"] / GIB, "tokens_per_s": plan["predicted_tokens_per_s"]}


def load_child(folder: str, warm: str, weights: str, devices: str) -> None:
    """One measured Engine.load, reported as a JSON line on stdout."""
    from vramancer.config.options import LoadOptions
    from vramancer.engine import Engine
    from vramancer.engine.loader import prepare
    from vramancer.platforms.heap import give_back_freed_memory

    dtype = "bfloat16" if weights == "native" else "float32"
    Engine.load(LoadOptions(warm, devices, context=512, dtype=dtype, weights=weights)).close()
    prepare(LoadOptions(folder, devices, context=512, dtype=dtype, weights=weights)).close()
    give_back_freed_memory()
    fixed = vm("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak restarts from here
    start = time.perf_counter()
    engine = Engine.load(LoadOptions(folder, devices, context=512, dtype=dtype, weights=weights))
    seconds = time.perf_counter() - start
    host = sum(need.weights for name, need in engine.plan.needs.items() if engine.device(name).local)
    print(json.dumps({"seconds": seconds, "peak": vm("VmHWM"), "after": vm("VmRSS"), "fixed": fixed, "host": host}))


def load_once(folder: Path, warm: Path, weights: str, env: dict) -> dict:
    code = "import sys; from benchmarks.scale import load_child; load_child(*sys.argv[1:])"
    out = subprocess.run([sys.executable, "-c", code, str(folder), str(warm), weights, LOAD_DEVICES[weights]],
                         capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"the load of {folder.name} under {weights} failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"seconds": r["seconds"], "peak_gib": r["peak"] / GIB, "after_gib": r["after"] / GIB,
            "fixed_gib": r["fixed"] / GIB, "host_gib": r["host"] / GIB}


def bench(weights: str, plans: str, models: str | None) -> Result:
    from vramancer.config.paths import cache_root

    result = Result(
        "scale", "Real scale: plan of 7B/72B configs, 1.5B loads (fresh process each)",
        {"load devices": ", ".join(f"{w} {d}" for w, d in LOAD_DEVICES.items() if w in weights.split(","))},
        {"seconds": ("s", 1), "peak_gib": ("peak RSS, GiB", 2), "after_gib": ("RSS after, GiB", 2),
         "fixed_gib": ("fixed cost, GiB", 2), "host_gib": ("plan's host weights, GiB", 2),
         "tokens_per_s": ("predicted tok/s", 2)},
    )
    env = dict(os.environ, TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    store = Path(models) if models else cache_root() / "bench-models"
    for size in filter(None, plans.split(",")):
        say(f"  plan of a Qwen2-{size} config")
        r = plan_once(config_folder(store / f"qwen2-{size}-config", size), env)
        name = f"plan, Qwen2-{size} config, first run"
        result.add({name: [r]})
        seconds, gib = PLAN_TARGETS[size]
        if seconds:
            result.comparisons.append(compare(f"{name}: s ÷ {seconds:g} s", r["seconds"] / seconds, at_most=1.0))
        result.comparisons.append(compare(f"{name}: peak ÷ {gib:g} GiB", r["peak_gib"] / gib, at_most=1.0))
    folder = build_model(store / "qwen2-1.5B-random", "1.5B")
    warm = build_model(store / "qwen2-1.5B-random-1layer", "1.5B", layers=1)
    checkpoint = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / GIB
    for kind in filter(None, weights.split(",")):
        say(f"  1.5B under {kind} on {LOAD_DEVICES[kind]}")
        r = load_once(folder, warm, kind, env)
        name = f"1.5B --weights {kind}, {LOAD_DEVICES[kind]}"
        result.add({name: [r]})
        limit = PEAK_TARGETS.get(kind, 1.15 * checkpoint + 0.7)
        result.comparisons.append(compare(f"{name}: peak ÷ {limit:.2f} GiB", r["peak_gib"] / limit, at_most=1.0))
        result.comparisons.append(compare(f"{name}: RSS after ÷ (host weights + fixed)",
                                          r["after_gib"] / (r["host_gib"] + r["fixed_gib"]), at_most=AFTER_LOAD))
    return result


if __name__ == "__main__":
    cli(bench, __doc__, [("--weights", str, "q4,q8,native"), ("--plans", str, "7B,72B"), ("--models", str, None)])
