"""What `--dtype auto` computes in: decided by what the machine is, never by a stopwatch.

The rule, for every choice that changes what is computed (the compute dtype, which kernels run
quantized weights, which quantized layout is stored): it depends only on the device kinds, the
CPU's capability flags, whether our kernels are available (built, and not turned off) and the
flags given — never on a measured time. Timings may choose *where* things run (placement,
threads), which does not change tokens. So the same command gives the same dtype in every run
and in every process of a cluster (the coordinator sends its choice to the nodes).

- CPU and simulated devices, native weights: float32 on every CPU. It is what plain transformers
  computes in on a CPU, so split and unsplit answers agree token for token on any machine;
  bfloat16 is one flag away (`--dtype bfloat16`). On CPUs with native bfloat16 (AVX512_BF16,
  AMX) bfloat16 prompts run 2-5× faster, but decode steps measured anywhere from 0.6× to 1.8×
  float32 from one run to the next on the same machine (docs/design/memory-model.md has the
  figures): no speed-up worth changing every answer for.
- Quantized weights on CPU and simulated devices: float32 where our kernels run (they take
  float32 activations), else bfloat16, which torchao's CPU kernels want.
- A GPU among the devices: bfloat16 where the CUDA devices support it, else float16 (MPS too);
  bfloat16 under quantized weights, which torchao's GPU kernels take.
"""

from __future__ import annotations

from dataclasses import dataclass

from vramancer.config import settings

KERNELS_ENV = "VRM_CPU_KERNELS"  # `off` turns our compiled CPU kernels off (torch's/torchao's run)
DTYPE_NAMES = ("float32", "float16", "bfloat16")
CPU_KINDS = frozenset({"cpu", "sim"})


@dataclass(frozen=True)
class DtypeChoice:
    """The compute dtype's name and the sentence `plan` shows for it."""

    name: str
    reason: str


def kernels_turned_off() -> bool:
    """Whether the user (or a test run) turned our CPU kernels off with VRM_CPU_KERNELS=off."""
    return settings.value("cpu_kernels").strip().lower() in ("off", "0", "no", "false")


def cpu_flags() -> frozenset[str]:
    """The CPU's capability flags as the kernel reports them (`avx2`, `avx512_bf16`, `amx_bf16`
    …); empty where /proc/cpuinfo is absent (macOS, Windows)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_summary(flags: frozenset[str]) -> str:
    """The CPU's widest vector units in a few words, for `plan`'s reason."""
    named = [name for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512_BF16"),
                                     ("avx512f", "AVX512"), ("avx2", "AVX2"), ("asimd", "NEON"))
             if flag in flags]
    return "+".join(named[:2]) if named else "no vector units reported"


def auto_dtype(device_kinds: set[str], weights: str, our_kernels: bool, flags: frozenset[str],
               cuda_bf16: bool = False) -> DtypeChoice:
    """The dtype `--dtype auto` computes in, from what the machine is (see the module's rule).

    `our_kernels`: our CPU kernels are available here (built, CPU able, not turned off);
    `cuda_bf16`: every CUDA device supports bfloat16."""
    cpu = cpu_summary(flags)
    if not set(device_kinds) <= CPU_KINDS:
        if weights != "native":
            return DtypeChoice("bfloat16", f"bfloat16: the activations torchao's kernels take for {weights} weights")
        name = "bfloat16" if "cuda" in device_kinds and cuda_bf16 else "float16"
        return DtypeChoice(name, f"{name}: the GPU's half type")
    if weights == "native":
        return DtypeChoice("float32", f"float32: on every CPU ({cpu} here), the dtype plain transformers "
                                      "answers in; --dtype bfloat16 to trade that for speed")
    if our_kernels:
        return DtypeChoice("float32", f"float32: the activations VRAMancer's CPU kernels take for {weights} weights")
    return DtypeChoice("bfloat16", f"bfloat16: the activations torchao's CPU kernels take for {weights} weights "
                                   "(VRAMancer's own are unavailable here)")
