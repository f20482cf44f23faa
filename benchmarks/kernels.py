"""Our quantized matmul kernels (kernels/cpu/build.py), by default on one thread and one
activation row: the time of one call and the weight bytes it reads per second, next to what
memory gives. `--rows 8` times a decode batch's step (8 rows, each weight read once for all);
`--threads 2` shares each call's output rows between two threads.

A decode step multiplies one row by every weight matrix once, so the number that matters is
the out-of-cache one: each call gets a different weight of the same shape, cycling through
enough copies (≥ 64 MB) that none is still in the caches when its turn comes again. The
in-cache figure (the same weight every call) is the kernel's compute speed alone. Shapes are
the bundled model's: a 1536x576 and a 576x1536 projection in q4 and q8, and its 49152x576
output head in q8 rows and in q8 blocks (its GGUF's Q8_0, kept). "memory" is a float32 sum over
256 MB: what one thread can read. "cpu µs" is the calling thread's CPU time per call: on a
machine other work shares, steadier than the wall time (with one thread only; with more, the
others' time is not in it).

    python -m benchmarks.kernels [--rounds 5] [--rows 1] [--threads 1]
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

from benchmarks.common import Result, Sample, alternate, cli

OUT_OF_CACHE_BYTES = 64 * 10**6
SECONDS_PER_ROUND = 0.3
MEMORY = "memory: float32 sum over 256 MB"


@dataclass(frozen=True)
class Case:
    """One weight shape and format, in cache or cycled through enough copies to miss it."""

    weights: str  # "q4", "q8" (rows) or "q8b" (blocks of 32, GGUF's Q8_0)
    out_features: int
    in_features: int
    in_cache: bool

    @property
    def name(self) -> str:
        where = "in cache" if self.in_cache else "out of cache"
        return f"{self.weights} {self.out_features}x{self.in_features}, {where}"

    def nbytes(self) -> int:
        """Bytes one call reads: nibbles + float16 scale and minimum, int8 + float32 row scale,
        or int8 + a float16 scale per block."""
        n, k = self.out_features, self.in_features
        return {"q4": n * k // 2 + n * (k // 32) * 4, "q8": n * k + n * 4, "q8b": n * k + n * (k // 32) * 2}[self.weights]


CASES = [Case(w, n, k, cached) for n, k in ((1536, 576), (576, 1536)) for w in ("q4", "q8") for cached in (True, False)]
CASES += [Case(w, 49152, 576, cached) for w in ("q8", "q8b") for cached in (True, False)]


def make_weights(case: Case) -> list[tuple]:
    """Random weights in the kernel's layout (its speed does not depend on the values), as
    many copies as it takes to read ≥ 64 MB before one comes round again."""
    import torch

    from vramancer.quantization.q4_blocks import to_tiles

    copies = 1 if case.in_cache else max(2, math.ceil(OUT_OF_CACHE_BYTES / case.nbytes()))
    n, k = case.out_features, case.in_features
    made = []
    for _ in range(copies):
        if case.weights == "q4":
            made.append((to_tiles(torch.randint(0, 256, (n, k // 2), dtype=torch.uint8),
                                  (torch.rand(n, k // 32) * 0.01).half(), (-torch.rand(n, k // 32) * 0.1).half()),))
        elif case.weights == "q8b":
            made.append((torch.randint(-127, 128, (n, k), dtype=torch.int8), (torch.rand(n, k // 32) * 0.01).half()))
        else:
            made.append((torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n) * 0.01))
    return made


def kernel_call(weights: str) -> Callable:
    """x, weight tuple → the current `q4_linear` / `q8_linear` / `q8_blocks_linear` (looked up at call time)."""
    from vramancer.kernels.cpu.build import kernels

    name = {"q4": "q4_linear", "q8": "q8_linear", "q8b": "q8_blocks_linear"}[weights]
    return lambda x, w: getattr(kernels(), name)(x, *w)


def timed(call: Callable, case: Case, rows: int = 1) -> Callable[[], Sample]:
    """A contender: calls `call` on its weights in turn for ~0.3 s; µs (wall and this thread's
    CPU) per call and GB/s."""
    import torch

    weights = make_weights(case)
    x = torch.randn(rows, case.in_features)
    nbytes = case.nbytes()

    def run() -> Sample:
        calls, start, cpu = 0, time.perf_counter(), time.thread_time()
        while True:
            for w in weights:
                call(x, w)
            calls += len(weights)
            elapsed = time.perf_counter() - start
            if elapsed >= SECONDS_PER_ROUND:
                return {"us": elapsed / calls * 1e6, "cpu_us": (time.thread_time() - cpu) / calls * 1e6,
                        "gb_s": nbytes * calls / elapsed / 1e9}
    return run


def memory_read() -> Callable[[], Sample]:
    import torch

    data = torch.ones(64 * 2**20)  # 256 MB of float32

    def run() -> Sample:
        start, cpu = time.perf_counter(), time.thread_time()
        data.sum()
        elapsed = time.perf_counter() - start
        return {"us": elapsed * 1e6, "cpu_us": (time.thread_time() - cpu) * 1e6, "gb_s": data.numel() * 4 / elapsed / 1e9}
    return run


def bench(rounds: int = 5, rows: int = 1, threads: int = 1) -> Result:
    import torch

    from vramancer.kernels.cpu.build import kernels, unavailable_reason

    torch.set_num_threads(threads)
    result = Result("kernels", f"Quantized matmul kernels, {rows} activation row{'s' * (rows > 1)}, "
                    f"{threads} thread{'s' * (threads > 1)} (weight bytes read per second)",
                    {"rounds": rounds, "rows": rows, "threads": threads,
                     "out of cache": f"≥ {OUT_OF_CACHE_BYTES // 10**6} MB of distinct weights cycled"},
                    {"us": ("µs per call", 1), "cpu_us": ("cpu µs per call", 1), "gb_s": ("GB/s of weights", 2)})
    if kernels() is None:
        result.notes.append(f"kernels unavailable: {unavailable_reason()}")
        return result
    contenders = {case.name: timed(kernel_call(case.weights), case, rows) for case in CASES}
    contenders[MEMORY] = memory_read()
    result.add(alternate(contenders, rounds))
    return result


if __name__ == "__main__":
    cli(bench, __doc__, [("--rounds", int, 5), ("--rows", int, 1), ("--threads", int, 1)])
