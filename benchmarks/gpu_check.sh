#!/usr/bin/env bash
# The GPU check, in one go: the `cuda` tests, then the GPU benchmark, on a machine with an
# NVIDIA GPU, torch (CUDA build), transformers, accelerate, psutil, nvidia-ml-py, pytest and
# rich, and no network. About 5 minutes on an H100; every stage has its own time limit (11 minutes at most in all).
#
#     bash benchmarks/gpu_check.sh            # from the repository root or anywhere
#
# Everything printed also goes to $OUT/gpu_check.log ($OUT defaults to benchmarks/results);
# the benchmark writes gpu-*.json and gpu-*.md there, and records gpu.json and gpu_prediction.json
# (kept in git; docs/benchmarks.md's tables are generated from them), pytest writes test_cuda.xml.
# Exit status: pytest's if the tests failed, else the benchmark's.
#
# What is missing on such a machine comes as wheels in .whl/ at the repository root (git
# ignores it through .git/info/exclude). Fetch them on a machine with network access:
#
#     PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
#     grep -v '^#' benchmarks/gpu_wheels.txt | xargs -n1 python3 -m pip download --no-deps \
#         --only-binary=:all: --python-version 3.12 --implementation cp $PLAT -d .whl
#     # only if the GPU machine's transformers may predate 5.x's `cache=` keyword (28 MB more):
#     grep -v '^#' benchmarks/gpu_wheels_transformers.txt | xargs -n1 python3 -m pip download --no-deps \
#         --only-binary=:all: --python-version 3.12 --implementation cp $PLAT -d .whl/transformers
#
# They are installed under /tmp (never into the machine's own Python) with
#     pip install --no-index --no-deps --target /tmp/vramancer-site .whl/*.whl
# and put first on PYTHONPATH with the repository root (vramancer itself is not installed).
set -u
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="${PYTHON:-python3}"
OUT="${OUT:-$ROOT/benchmarks/results}"
export OUT
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
START=$(date +%s)
section() { echo; echo "=== $* (at $(( $(date +%s) - START )) s)"; }

section "wheels"
SITE=/tmp/vramancer-site
export PYTHONPATH="$ROOT"
install_wheels() {  # folder
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$1"/*.whl \
        && echo "installed $(ls "$1"/*.whl | wc -l) wheels from $1 into $SITE" \
        || echo "WHEEL INSTALL FAILED from $1"
}
if compgen -G ".whl/*.whl" >/dev/null; then
    install_wheels .whl
    export PYTHONPATH="$SITE:$ROOT"
else
    echo "no .whl/*.whl here: using the packages this Python already has"
fi
# The engine calls transformers with 5.x's `cache=` keyword; an older transformers is
# replaced (under /tmp only) by the one the project is developed with, if it was shipped.
if ! "$PY" - <<'EOF'
import inspect
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
raise SystemExit(0 if "cache" in inspect.signature(LlamaDecoderLayer.forward).parameters else 1)
EOF
then
    echo "this transformers predates the cache= keyword the engine uses"
    if compgen -G ".whl/transformers/*.whl" >/dev/null; then
        install_wheels .whl/transformers
        export PYTHONPATH="$SITE:$ROOT"
    else
        echo "WARNING: no .whl/transformers/ shipped; the engine will fail on this transformers"
    fi
fi
echo "PYTHONPATH=$PYTHONPATH"

section "machine"
nvidia-smi || echo "nvidia-smi: not available"
"$PY" - <<'EOF'
import platform, sys
print("python", sys.version.split()[0], platform.platform())
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available(),
      "devices", torch.cuda.device_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("cuda:0", p.name, f"{p.total_memory / 2**30:.1f} GiB", f"sm_{p.major}{p.minor}", "bf16",
          torch.cuda.is_bf16_supported())
from importlib.metadata import version
for name, dist in (("transformers",) * 2, ("accelerate",) * 2, ("tokenizers",) * 2, ("safetensors",) * 2,
                   ("huggingface_hub",) * 2, ("pynvml", "nvidia-ml-py"), ("psutil",) * 2, ("pytest",) * 2,
                   ("pytest_timeout", "pytest-timeout"), ("rich",) * 2, ("textual",) * 2, ("platformdirs",) * 2,
                   ("gguf",) * 2, ("zeroconf",) * 2):
    try:
        module = __import__(name)
        try:
            found = version(dist)
        except Exception:
            found = getattr(module, "__version__", "?")
        print(f"{name:16} {found:12} {module.__file__}")
    except Exception as exc:
        print(f"{name:16} MISSING ({type(exc).__name__}: {exc})")
import vramancer.engine
print("vramancer.engine imports from", vramancer.engine.__file__)
EOF
"$PY" -m pip list > "$OUT/pip_list.txt" 2>/dev/null

section "CPU kernels (the float32 tests' CPU layers use them; built once, about a minute on 16 cores)"
timeout -k 10 240 "$PY" -m vramancer.kernels.cpu.build
echo "kernel build exit status: $?"

section "pytest -m cuda tests/integration/test_cuda.py"
TIMEOUT_FLAG=()
if "$PY" -c "import pytest_timeout" 2>/dev/null; then TIMEOUT_FLAG=(--timeout 120); fi
timeout -k 10 180 "$PY" -m pytest -m cuda tests/integration/test_cuda.py -v -s -p no:cacheprovider "${TIMEOUT_FLAG[@]}" \
    --junitxml "$OUT/test_cuda.xml"
TESTS=$?
echo "pytest exit status: $TESTS"

section "python -m benchmarks.gpu"
timeout -k 10 220 "$PY" -m benchmarks.gpu
BENCH=$?
echo "benchmark exit status: $BENCH"

section "python -m benchmarks.gpu_prediction (the profiler's timings against the real decode, part by part)"
timeout -k 10 150 "$PY" -m benchmarks.gpu_prediction
echo "prediction breakdown exit status: $?"

section "done: tests $TESTS, benchmark $BENCH; logs and results in $OUT"
ls -la "$OUT"
if [ "$TESTS" -ne 0 ]; then exit "$TESTS"; fi
exit "$BENCH"
