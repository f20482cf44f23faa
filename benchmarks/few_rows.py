"""The float32 linear layers of a decode batch (kernels/cpu/few_rows.py): our `few_rows_linear`
kernel against torch's `F.linear` (x @ W.T) and MKL's W @ x.T (plus the copy back to
row-major rows), per layer shape of the bundled model and rows per step, one thread.

Every contender cycles through enough distinct weights of a shape (at least 30 layers and
96 MB) that each call reads its weights from memory, as a decode step does. In each round the
contenders take turns on the same layers; the table shows each one's median over the rounds,
in ms per layer and in GB/s of weights read, beside `torch.sum` over the same weights: what
reading memory alone reaches at that moment.

    python -m benchmarks.few_rows [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch.nn import functional as F

from benchmarks.common import say

# The bundled model's (SmolLM2-135M) layers: q/o, k/v, gate/up, down, the output head.
SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576))
ROWS = (1, 2, 4, 8)
MIN_LAYERS, MIN_BYTES = 30, 96_000_000


def mkl_w_xt(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What FewRowsLinear did before our kernel: W @ x.T, then back to row-major rows."""
    return torch.mm(w, x.t()).t().contiguous()


def contenders() -> dict[str, Callable[[torch.Tensor, torch.Tensor], object]]:
    from vramancer.kernels.cpu.build import kernels, unavailable_reason

    ops = kernels()
    if ops is None:
        raise SystemExit(f"our kernels are unavailable: {unavailable_reason()}")
    return {"memory (sum)": lambda x, w: w.sum(), "F.linear": lambda x, w: F.linear(x, w), "W @ x.T": mkl_w_xt,
            "ours": lambda x, w: ops.few_rows_linear(x, w, None)}


def per_layer_s(run: Callable, x: torch.Tensor, layers: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for w in layers:
        run(x, w)
    return (time.perf_counter() - start) / len(layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = contenders()
    names = list(runs)
    print(f"ms per layer (GB/s of weights), median of {args.rounds} rounds, {torch.get_num_threads()} thread(s)")
    print(f"{'shape':>11} {'rows':>4}  " + "  ".join(f"{n:>17}" for n in names) + "  ours ÷ W @ x.T")
    with torch.inference_mode():
        for n_out, n_in in SHAPES:
            size = n_out * n_in * 4
            count = max(MIN_LAYERS if size < MIN_BYTES else 2, -(-MIN_BYTES // size))
            say(f"few_rows: {count} layers of {n_out}x{n_in}")
            layers = [torch.randn(n_out, n_in) for _ in range(count)]
            for rows in ROWS:
                x = torch.randn(rows, n_in)
                for run in runs.values():  # warm-up: pages touched, code loaded
                    per_layer_s(run, x, layers[:3])
                times: dict[str, list[float]] = {n: [] for n in names}
                for _ in range(args.rounds):
                    for name in names:
                        times[name].append(per_layer_s(runs[name], x, layers))
                median = {n: statistics.median(t) for n, t in times.items()}
                cells = "  ".join(f"{median[n] * 1e3:7.3f} ({size / median[n] / 1e9:5.1f})  " for n in names)
                print(f"{n_out:>5}x{n_in:<5} {rows:>4}  {cells}  {median['W @ x.T'] / median['ours']:.2f}x faster",
                      flush=True)
            del layers


if __name__ == "__main__":
    main()
