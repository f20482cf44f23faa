"""Our CPU kernels (kernels/cpu/src/*.cpp: quantized matmuls, fused norms, attention), built on first use.

torch's and torchao's weight-only kernels run at a fraction of memory speed on AVX2 CPUs
(int4: ~1.9 GB/s, int8: ~3.3 GB/s on one thread here, where a float32 matmul reads 6-8 GB/s),
and they want bfloat16 activations, whose elementwise ops are slow without AVX-512. These
take float32 activations, quantize each row to int16 per block of 32 (as llama.cpp does with
int8; int16 keeps float32's answers on the bundled model, where int8 changed one), and sum
integer products: the q8 output head and q8 layers ran ~2x faster than with float32 math, and
`--weights q8` decoded ~1.5x faster; q4 layers, held by memory access at ~3 GB/s, gained
little (figures and why in kernels/cpu/src/quant_linear.cpp; `python -m benchmarks.kernels`). They
read the quantized weights once per batch of rows.

The extension is compiled once (g++ through torch's cpp_extension and ninja, two to three
minutes on two cores) into `<cache>/kernels/<key>/`, keyed by the source, the flags and the torch and
Python versions, and later loaded in milliseconds. `make setup` builds it ahead of time. The
build is locked (torch's own lock file in that folder), so parallel test processes compile it
once. Where the CPU lacks AVX2/FMA/F16C, the build fails or VRM_CPU_KERNELS=off turns them off, `kernels()` returns None and says
why in `unavailable_reason()`; the engine then uses torchao's kernels.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

from vramancer.config import settings
from vramancer.config.paths import cache_root
from vramancer.planning.precision import kernels_turned_off

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).with_name("src")


def sources() -> list[Path]:
    """Every C++ source of the extension (bindings.cpp binds what kernels.h declares)."""
    return sorted(SOURCE_DIR.glob("*.cpp"))
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-std=c++17"]
KERNEL_DIR_ENV = "VRM_KERNEL_DIR"  # where the compiled kernels live (default: <cache>/kernels)
NAME = "vramancer_quant_linear"

_reason: str | None = None


def cpu_supports_kernels() -> bool:
    """AVX2 and FMA (torch reports AVX2 or AVX512 only when both are there; F16C comes with them)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def build_dir() -> Path:
    """The folder for this source, these flags and this torch/Python."""
    text = b"".join(path.name.encode() + path.read_bytes() for path in sorted(SOURCE_DIR.glob("*.[ch]*")))
    key = hashlib.sha256(text + " ".join(FLAGS).encode()
                         + f"{torch.__version__} {sys.version_info[:2]}".encode()).hexdigest()[:16]
    chosen = settings.value("kernel_dir")
    root = Path(chosen).expanduser() if chosen else cache_root() / "kernels"
    return root / key


@functools.lru_cache(maxsize=1)
def kernels():
    """The compiled module (q4_linear, q8_linear, rms_norm), or None where it cannot run here."""
    global _reason
    if kernels_turned_off():
        source = settings.where("cpu_kernels")
        _reason = f"turned off by {source}=off" if source.startswith("VRM_") else f"turned off by {source}"
        return None
    if not cpu_supports_kernels():
        _reason = f"this CPU lacks AVX2/FMA (torch reports {torch.backends.cpu.get_cpu_capability()})"
        return None
    folder = build_dir()
    built = folder / f"{NAME}.so"
    if built.is_file() and not (folder / "lock").exists():  # the key names the source and flags
        try:
            spec = importlib.util.spec_from_file_location(NAME, built)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        except ImportError as exc:  # half-written by a build in progress: wait for it below
            log.debug("kernels not loadable yet: %s", exc)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        from torch.utils.cpp_extension import load

        _put_ninja_on_path()

        log.warning("compiling the CPU kernels into %s, once (two to three minutes)", folder)
        return load(name=NAME, sources=[str(path) for path in sources()], extra_cflags=FLAGS, build_directory=str(folder),
                    verbose=False)
    except Exception as exc:  # no compiler, no ninja, no Python headers: torchao's kernels run instead
        first = (str(exc).strip().splitlines() or [""])[0]
        _reason = f"the kernels could not be built ({type(exc).__name__}: {first})"
        log.warning("our CPU kernels unavailable: %s", _reason)
        return None


def _put_ninja_on_path() -> None:
    """torch's cpp_extension runs `ninja` from PATH; the copy our `ninja` dependency installs
    sits in the virtual environment's bin folder, on PATH only while the environment is active."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return  # the build then fails and says so; torchao's kernels run
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def unavailable_reason() -> str | None:
    """Why `kernels()` returned None (call it first), else None."""
    return _reason


if __name__ == "__main__":  # `python -m vramancer.kernels.cpu.build`: build now (make setup)
    module = kernels()
    print(f"CPU kernels (quantized weights, decode batches): {'ready in ' + str(build_dir()) if module else unavailable_reason()}")
