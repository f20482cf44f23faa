"""A Q4_K_M GGUF: VRAMancer's load against llama.cpp's own start on the same file (issue 29).

The file: a random-weight Qwen2-0.5B (benchmarks/load_scale.py builds it) with the bundled
model's tokenizer, converted by llama.cpp's converter and quantized to Q4_K_M by
`llama-quantize`, once (the converter is told the tokenizer's pre-tokenizer, which its table
of known tokenizers cannot recognise in a random model, and that it is byte-level BPE). Then, each in a fresh process, on the
CPU, two threads, a context of 512:
- llama.cpp: `llama-server` on the file; "load" is its own model-load time (the log's
  `load_tensors`-to-ready span is not printed, so: spawn until /health answers 200, which for
  a C++ program is its load), peak RSS its VmHWM then.
- VRAMancer, first load: `Engine.load` of the file with an empty cache folder (K-quants
  dequantized and quantized again per tensor, layers profiled, the weights cache written); our
  CPU kernels are the ones already compiled, as after an install.
- VRAMancer, cached load: the same again, the cache filled by the first.
For ours, "load" is `Engine.load` alone, and "start" adds the Python and torch imports.
Targets: first load ≤ 2×, cached load ≤ 1.2× llama.cpp's; peak RSS ≤ 1.5× its.

    python -m benchmarks.gguf_start [--rounds 3]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import llama_cpp
from benchmarks.common import Result, cli, say
from benchmarks.load_scale import GIB, build_model

LLAMA = "llama.cpp llama-server start"
FIRST, CACHED = "VRAMancer Engine.load, first (empty cache)", "VRAMancer Engine.load, cached"
CONTEXT, THREADS = 512, 2
ROOT = Path(__file__).resolve().parents[1]

# Runs llama.cpp's converter with our Python, telling it the tokenizer's pre-tokenizer, and that
# the folder has no SentencePiece model (the converter imports sentencepiece, which we do not
# install, before it looks for one).
_CONVERT = """
import sys
folder, out = sys.argv[1:3]
import conversion.base

def no_sentencepiece_model(self):
    raise FileNotFoundError("no tokenizer.model: a byte-level BPE tokenizer")

conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "smollm"
conversion.base.TextModel._create_vocab_sentencepiece = no_sentencepiece_model
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", folder, "--outfile", out, "--outtype", "f16"]
convert_hf_to_gguf.main()
"""

_LOAD = """
import json, sys, time
started = time.perf_counter()
from vramancer.config.options import LoadOptions
from vramancer.engine import Engine
imported = time.perf_counter()
engine = Engine.load(LoadOptions(sys.argv[1], "cpu", context=int(sys.argv[2]), weights="auto"))
loaded = time.perf_counter()
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({"load": loaded - imported, "imports": imported - started, "peak": peak}))
"""


def q4_k_m_file(store: Path) -> Path:
    """The 0.5B model as a Q4_K_M GGUF, made once."""
    target = store / "qwen2-0.5B-random-Q4_K_M.gguf"
    if target.is_file():
        return target
    from transformers import AutoTokenizer

    from vramancer.model.source import bundled_model_path

    folder = build_model(store / "qwen2-0.5B-random", "0.5B")
    if not (folder / "tokenizer.json").is_file():
        bundled = bundled_model_path()
        AutoTokenizer.from_pretrained(bundled.parent, gguf_file=bundled.name).save_pretrained(folder)
    f16 = store / "qwen2-0.5B-random-f16.gguf"
    source = llama_cpp.source()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(source / "gguf-py"), str(source)]))
    say("  converting the 0.5B model to GGUF (llama.cpp's converter)")
    subprocess.run([sys.executable, "-c", _CONVERT, str(folder), str(f16)], env=env, check=True,
                   capture_output=True)
    say("  quantizing it to Q4_K_M (llama-quantize)")
    partial = target.with_suffix(".partial")
    subprocess.run([str(llama_cpp.tool("llama-quantize")), str(f16), str(partial), "Q4_K_M"], check=True,
                   capture_output=True)
    partial.rename(target)
    f16.unlink()
    return target


def llama_start(gguf: Path) -> dict:
    """llama-server from spawn until it answers /health: its load; its peak RSS then."""
    import httpx

    from benchmarks.serve import free_port

    port = free_port()
    start = time.perf_counter()
    server = subprocess.Popen([str(llama_cpp.tool("llama-server")), "--model", str(gguf), "--host", "127.0.0.1",
                               "--port", str(port), "--ctx-size", str(CONTEXT), "--threads", str(THREADS)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"llama-server exited with status {server.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        seconds = time.perf_counter() - start
        status = Path(f"/proc/{server.pid}/status").read_text()
        peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
    finally:
        server.terminate()
        server.wait(10)
    return {"load_s": seconds, "start_s": seconds, "peak_gib": peak / GIB}


def our_load(gguf: Path, cache: str, kernels: str) -> dict:
    # The cache folder is fresh, not the kernels: an install compiles them once (setup.py), and
    # a first load is the model's, not a compiler's.
    env = dict(os.environ, VRM_CACHE_DIR=cache, VRM_KERNEL_DIR=kernels, TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error",
               HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS=str(THREADS))
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _LOAD, str(gguf), str(CONTEXT)], capture_output=True, text=True,
                         env=env, check=False)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"the load of {gguf.name} failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"load_s": r["load"], "start_s": wall, "peak_gib": r["peak"] / GIB}


def bench(rounds: int = 3, models: str | None = None) -> Result:
    from vramancer.config.paths import cache_root

    result = Result(
        "gguf_start", "A Q4_K_M GGUF: our load against llama.cpp's start (random Qwen2-0.5B, CPU, 2 threads)",
        {"rounds": rounds, "context": CONTEXT, "threads": THREADS, "weights": "auto (the file's width)"},
        {"load_s": ("load s", 2), "start_s": ("spawn to loaded s", 2), "peak_gib": ("peak RSS GiB", 2)},
    )
    if not (llama_cpp.tool("llama-server") and llama_cpp.tool("llama-quantize")):
        result.notes.append(llama_cpp.missing("This comparison"))
        return result
    gguf = q4_k_m_file(Path(models) if models else cache_root() / "bench-models")
    result.settings["file"] = f"{gguf.name}, {gguf.stat().st_size / 2**20:.0f} MiB"
    from vramancer.kernels.cpu.build import build_dir, kernels

    kernels()  # built here once if this checkout's are not yet: never inside a measured load
    kernel_root = str(build_dir().parent)
    samples: dict[str, list[dict]] = {LLAMA: [], FIRST: [], CACHED: []}
    for n in range(rounds):
        with tempfile.TemporaryDirectory(prefix="vramancer-bench-gguf-") as cache:
            for name, run in ((LLAMA, lambda: llama_start(gguf)), (FIRST, lambda: our_load(gguf, cache, kernel_root)),
                              (CACHED, lambda: our_load(gguf, cache, kernel_root))):
                samples[name].append(run())
                say(f"  round {n + 1}/{rounds}  {name:45s} " + "  ".join(f"{k} {v:.2f}" for k, v in samples[name][-1].items()))
    result.add(samples)
    for name, limit in ((FIRST, 2.0), (CACHED, 1.2)):
        result.ratio(f"{name.split(', ')[1]} load ÷ llama.cpp's", name, LLAMA, "load_s", False, at_most=limit)
        result.ratio(f"{name.split(', ')[1]} spawn to loaded ÷ llama.cpp's", name, LLAMA, "start_s", False)
    result.ratio("peak RSS, first load ÷ llama.cpp's", FIRST, LLAMA, "peak_gib", False, at_most=1.5)
    result.ratio("peak RSS, cached load ÷ llama.cpp's", CACHED, LLAMA, "peak_gib", False, at_most=1.5)
    return result


if __name__ == "__main__":
    cli(bench, __doc__, [("--rounds", int, 3), ("--models", str, None)])
