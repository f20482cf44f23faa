"""Our CPU kernels (kernels/cpu/src/*.cpp: quantized matmuls, fused norms, attention).

torch's and torchao's weight-only kernels run at a fraction of memory speed on AVX2 CPUs
(int4: ~1.9 GB/s, int8: ~3.3 GB/s on one thread here, where a float32 matmul reads 6-8 GB/s),
and they want bfloat16 activations, whose elementwise ops are slow without AVX-512. These
take float32 activations, quantize each row to int16 per block of 32 (as llama.cpp does with
int8; int16 keeps float32's answers on the bundled model, where int8 changed one), and sum
integer products: the q8 output head and q8 layers ran ~2x faster than with float32 math, and
`--weights q8` decoded ~1.5x faster; q4 layers, held by memory access at ~3 GB/s, gained
little (figures and why in kernels/cpu/src/quant_linear.cpp; `python -m benchmarks.kernels`). They
read the quantized weights once per batch of rows.

Where they come from, first found first used:
1. the package: `pip install .` compiles them when torch is importable while it builds
   (setup.py), and writes beside the module the key of that build (identity.py); they are
   used only when the key is this torch's and this Python's.
2. the kernel folder `<cache>/kernels/<key>/`: compiled there on first use (g++ through torch's
   cpp_extension and ninja, two to three minutes on two cores) and loaded in milliseconds
   afterwards. build_folder.py makes that crash-safe: a folder is used only once complete and
   checked, concurrent first runs compile once, an interrupted build is cleaned up.
Where the CPU lacks AVX2/FMA/F16C, the build fails or VRM_CPU_KERNELS=off turns them off,
`kernels()` returns None and says why in `unavailable_reason()`; the engine then uses
torch's and torchao's kernels.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import logging
from pathlib import Path

import torch

from vramancer.config import settings
from vramancer.config.errors import first_line
from vramancer.config.paths import cache_root
from vramancer.kernels.cpu.build_folder import BuildFailed, ensure_built, import_module
from vramancer.kernels.cpu.identity import FLAGS, NAME, build_key, sources
from vramancer.planning.precision import kernels_turned_off

log = logging.getLogger(__name__)

KERNEL_DIR_ENV = "VRM_KERNEL_DIR"  # where the compiled kernels live (default: <cache>/kernels)

_reason: str | None = None


def cpu_supports_kernels() -> bool:
    """AVX2 and FMA (torch reports AVX2 or AVX512 only when both are there; F16C comes with them)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def build_dir() -> Path:
    """The folder for this source, these flags and this torch/Python."""
    chosen = settings.value("kernel_dir")
    root = Path(chosen).expanduser() if chosen else cache_root() / "kernels"
    return root / build_key(torch.__version__)


def installed_module():
    """The kernels `pip install` compiled into the package, if they were built for this torch
    and Python (their key file says so), else None."""
    spec = importlib.util.find_spec(f"{__package__}.{NAME}")
    if spec is None or not spec.origin:
        return None
    origin = Path(spec.origin)
    try:
        stamp = json.loads(origin.with_name(f"{NAME}.key").read_text())
        fits = stamp["key"] == build_key(torch.__version__) and stamp["bytes"] == origin.stat().st_size
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not fits:
        return None
    return importlib.import_module(spec.name)


@functools.lru_cache(maxsize=1)
def kernels():
    """The compiled module (q4_linear, q8_linear, rms_norm, ...), or None where it cannot run here."""
    global _reason
    if kernels_turned_off():
        source = settings.where("cpu_kernels")
        _reason = f"turned off by {source}=off" if source.startswith("VRM_") else f"turned off by {source}"
        return None
    if not cpu_supports_kernels():
        _reason = f"this CPU lacks AVX2/FMA (torch reports {torch.backends.cpu.get_cpu_capability()})"
        return None
    try:
        module = installed_module()
    except ImportError as exc:
        log.debug("the installed kernels do not import: %s", exc)
        module = None
    if module is not None:
        return module
    folder = build_dir()
    try:
        path = ensure_built(folder, NAME, sources(), FLAGS, on_build=lambda: log.warning(
            "compiling the CPU kernels into %s, once (two to three minutes)", folder))
        return import_module(path, NAME)
    except (BuildFailed, ImportError, OSError) as exc:  # no compiler, a damaged module: torch's kernels run instead
        _reason = first_line(exc).rstrip(".") if not isinstance(exc, OSError) else \
            f"the kernel folder {folder.parent} cannot be used: {exc.strerror or exc}"
        log.warning("our CPU kernels are unavailable (%s); torch's kernels run instead.", _reason)
        return None


def unavailable_reason() -> str | None:
    """Why `kernels()` returned None (call it first), else None."""
    return _reason


if __name__ == "__main__":  # `python -m vramancer.kernels.cpu.build`: build now (make setup)
    module = kernels()
    where = Path(module.__file__).parent if module else None
    print(f"CPU kernels (quantized weights, decode batches): {f'ready in {where}' if module else unavailable_reason()}")
