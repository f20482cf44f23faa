"""The float32 linear layers of a decode batch (kernels/cpu/few_rows.py): our `few_rows_linear`
kernel against torch's `F.linear` (x @ W.T) and MKL's W @ x.T (plus the copy back to
row-major rows), per layer shape of the bundled model and rows per step, one thread.

Every contender cycles through enough distinct weights of a shape (at least 30 layers and
96 MB) that each call reads its weights from memory, as a decode step does. In each round the
contenders take turns on the same layers; the table shows each one's median over the rounds,
in ms per layer at each number of rows and in GB/s of weights read at the most rows, beside
`torch.sum` over the same weights: what reading memory alone reaches at that moment.

    python -m benchmarks.few_rows [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch.nn import functional as F

from benchmarks.common import Result, cli, say

# The bundled model's (SmolLM2-135M) layers: q/o, k/v, gate/up, down, the output head.
SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576))
ROWS = (1, 2, 4, 8)
MIN_LAYERS, MIN_BYTES = 30, 96_000_000
MEMORY, F_LINEAR, MKL, OURS = "memory (sum)", "F.linear", "W @ x.T", "ours"


def mkl_w_xt(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What FewRowsLinear did before our kernel: W @ x.T, then back to row-major rows."""
    return torch.mm(w, x.t()).t().contiguous()


def contenders() -> dict[str, Callable[[torch.Tensor, torch.Tensor], object]]:
    from vramancer.kernels.cpu.build import kernels, unavailable_reason

    ops = kernels()
    if ops is None:
        raise SystemExit(f"our kernels are unavailable: {unavailable_reason()}")
    return {MEMORY: lambda x, w: w.sum(), F_LINEAR: lambda x, w: F.linear(x, w), MKL: mkl_w_xt,
            OURS: lambda x, w: ops.few_rows_linear(x, w, None)}


def per_layer_s(run: Callable, x: torch.Tensor, layers: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for w in layers:
        run(x, w)
    return (time.perf_counter() - start) / len(layers)


def shape_samples(runs: dict[str, Callable], n_out: int, n_in: int, rounds: int) -> dict[str, list[dict]]:
    """Each contender's rounds on one shape: round i holds its ms per layer at every number of
    rows (their round i) and its GB/s of weights read at the most rows."""
    size = n_out * n_in * 4
    count = max(MIN_LAYERS if size < MIN_BYTES else 2, -(-MIN_BYTES // size))
    say(f"few_rows: {count} layers of {n_out}x{n_in}")
    layers = [torch.randn(n_out, n_in) for _ in range(count)]
    samples = {name: [{} for _ in range(rounds)] for name in runs}
    for rows in ROWS:
        x = torch.randn(rows, n_in)
        for run in runs.values():  # warm-up: pages touched, code loaded
            per_layer_s(run, x, layers[:3])
        for r in range(rounds):
            for name, run in runs.items():
                seconds = per_layer_s(run, x, layers)
                samples[name][r][f"ms_{rows}"] = seconds * 1e3
                if rows == ROWS[-1]:
                    samples[name][r]["gb_s"] = size / seconds / 1e9
    return samples


def bench(rounds: int = 5, threads: int = 1) -> Result:
    torch.set_num_threads(threads)
    metrics = {f"ms_{rows}": (f"ms at {rows} row{'s' * (rows > 1)}", 3) for rows in ROWS}
    metrics["gb_s"] = (f"GB/s at {ROWS[-1]} rows", 1)
    result = Result("few_rows", f"Float32 linear layers of a decode batch, {threads} thread{'s' * (threads > 1)} "
                    "(ms per layer, weights out of cache)",
                    {"rounds": rounds, "threads": torch.get_num_threads(),
                     "weights cycled per shape": f"≥ {MIN_LAYERS} layers and ≥ {MIN_BYTES // 10**6} MB"}, metrics)
    runs = contenders()
    with torch.inference_mode():
        for n_out, n_in in SHAPES:
            shape = f"{n_out} × {n_in}"
            result.add({f"{shape}: {name}": rows for name, rows in shape_samples(runs, n_out, n_in, rounds).items()})
            for other in (F_LINEAR, MKL):
                result.ratio(f"{shape}: ours' speed ÷ {other}'s at {ROWS[-1]} rows", f"{shape}: {other}",
                             f"{shape}: {OURS}", f"ms_{ROWS[-1]}", False)
    result.notes.append(f"`{MEMORY}`: torch.sum over the same weights, what reading memory alone reaches")
    return result


if __name__ == "__main__":
    cli(bench, __doc__, [("--rounds", int, 5), ("--threads", int, 1)])
