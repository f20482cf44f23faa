"""Loading at scale: peak host memory and seconds to read a model's weights, per --weights.

Random-weight Qwen2-shaped models (0.5B and 1.5B, bfloat16 safetensors written by
`save_pretrained`) are built once into a cache folder. Each load runs in a fresh process:
it first loads a one-layer copy of the same architecture (so every import and the CPU
kernels are in place), notes its resident memory (the fixed overhead), resets the peak
(/proc/self/clear_refs), then times `load_weights` and reads the peak (VmHWM). The weights'
resident bytes are summed from the loaded tensors. One load per model and `--weights`.

    python -m benchmarks.load_scale [--sizes 0.5B,1.5B] [--weights q4,q8,native] [--tree PATH]

`--tree` runs the children on another checkout of VRAMancer (for before/after figures).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.common import Result, cli, say

# Qwen2-0.5B and Qwen2-1.5B's shapes (their published config.json files).
SHAPES = {
    "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2),
    "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2),
}
VOCAB = 151936
GIB = 1 << 30


def qwen2_config(size: str, layers: int | None = None):
    """The model's config; with `layers`, a small copy (that many layers, a 1024-token
    vocabulary) whose load brings in every import and kernel the real one needs."""
    from transformers import Qwen2Config

    shape = dict(SHAPES[size])
    if layers is not None:
        shape["num_hidden_layers"] = layers
    return Qwen2Config(vocab_size=VOCAB if layers is None else 1024, tie_word_embeddings=True, initializer_range=0.02,
                       max_position_embeddings=4096, **shape)


def build_model(folder: Path, size: str, layers: int | None = None) -> Path:
    """A random-weight model saved in bfloat16, made once (a finished folder holds a marker)."""
    done = folder / ".complete"
    if done.is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(qwen2_config(size, layers), dtype=torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    done.write_text("")
    return folder


def vm(field: str) -> int:
    """A /proc/self/status memory figure, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def child(folder: str, warm_folder: str, weights: str, dtype_name: str) -> None:
    """One measured load, reported as a JSON line on stdout."""
    import time

    import torch

    from vramancer.model.loading import load_weights
    from vramancer.model.source import resolve_model
    from vramancer.quantization.weights import stored_bytes

    dtype = getattr(torch, dtype_name)
    warm = load_weights(resolve_model(warm_folder), dtype, weights)
    del warm
    overhead = vm("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak restarts from here
    start = time.perf_counter()
    model = load_weights(resolve_model(folder), dtype, weights)
    seconds = time.perf_counter() - start
    seen, resident = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            resident += stored_bytes(tensor)
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"seconds": seconds, "peak": vm("VmHWM"), "rss_after": vm("VmRSS"), "overhead": overhead,
                      "resident": resident, "params": params}))


def measure(folder: Path, warm: Path, weights: str, dtype: str, tree: Path | None) -> dict:
    env = dict(os.environ, TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    root = tree or Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(Path(__file__).resolve().parents[1])])
    code = ("import sys; from benchmarks.load_scale import child; child(*sys.argv[1:])")
    out = subprocess.run([sys.executable, "-c", code, str(folder), str(warm), weights, dtype],
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"the load of {folder.name} under {weights} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench(sizes: str = "0.5B,1.5B", weights: str = "q4,q8,native", models: Path | None = None,
          tree: Path | None = None) -> Result:
    if models is None:
        from vramancer.config.paths import cache_root

        models = cache_root() / "bench-models"
    settings = {"sizes": sizes, "weights": weights, "dtype": "bfloat16 for native, float32 around q4/q8's kernels"}
    if tree is not None:
        settings["loaded with"] = "another checkout (--tree)"  # its path is one machine's
    result = Result("load_scale", "Loading at scale: peak host memory and seconds per --weights "
                    "(random Qwen2-shaped models, one fresh process per load)", settings,
                    {"params": ("params, B", 2), "resident": ("resident weights, GiB", 2),
                     "overhead": ("fixed overhead, GiB", 2), "peak": ("peak RSS, GiB", 2),
                     "extra": ("peak − overhead − weights, GiB", 2), "seconds": ("load s", 1)})
    for size in sizes.split(","):
        folder = build_model(models / f"qwen2-{size}-random", size)
        warm = build_model(models / f"qwen2-{size}-random-1layer", size, layers=1)
        for kind in weights.split(","):
            # Quantized weights run on our float32 kernels; native keeps the file's bfloat16.
            dtype = "bfloat16" if kind == "native" else "float32"
            say(f"load_scale: {size} --weights {kind} ({dtype})")
            r = measure(folder, warm, kind, dtype, tree)
            result.add({f"{size} {kind}": [{
                "params": r["params"] / 1e9, "resident": r["resident"] / GIB, "overhead": r["overhead"] / GIB,
                "peak": r["peak"] / GIB, "extra": (r["peak"] - r["overhead"] - r["resident"]) / GIB,
                "seconds": r["seconds"]}]})
    result.notes.append("the seconds depend on how busy the machine was; the memory figures do not")
    return result


if __name__ == "__main__":
    cli(bench, __doc__, [("--sizes", str, "0.5B,1.5B"), ("--weights", str, "q4,q8,native"),
                         ("--models", Path, None, {"help": "where the random models are kept"}),
                         ("--tree", Path, None, {"help": "a VRAMancer checkout to load with"})])
