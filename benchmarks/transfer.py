"""Migration bandwidth: moving a block of layers (≥ 64 MiB of weights) between two simulated
devices with `Engine.migrate`, next to the bound set by memory itself.

Contenders, taking turns:
- VRAMancer `migrate` of the block, alternately there and back (all-or-nothing moves with
  room checks, ledgers and hook rewiring included: what a user's drag costs);
- `dst.copy_(src)` of the same byte count into a buffer allocated and touched beforehand —
  the memcpy bound;
- the block's own tensors copied one by one into tensors allocated and touched beforehand
  (informative: the bound for a migration that needs no new memory);
- `src.clone()`, the same copy into fresh memory (informative: what allocating costs).

On a GPU machine the same is done between cuda:0 and the CPU when both are present.

    python -m benchmarks.transfer [--rounds 15]
"""

from __future__ import annotations

import time

from benchmarks.common import Result, alternate, cli

DEVICES = "sim:2x1GiB"
MIN_BLOCK = 64 * 2**20
MEMCPY = "tensor.copy_ (memcpy bound)"
PER_TENSOR = "copy_ tensor by tensor, into memory already touched"
CLONE = "tensor.clone (fresh memory)"


def _block(engine, at_least: int) -> tuple[int, int]:
    """The smallest run of layers ending at the first device boundary that holds ≥ at_least bytes."""
    blocks = engine.placement.blocks()
    last = blocks[0].layers.last
    first, size = last, engine.profile.layer_bytes[last]
    while size < at_least and first > blocks[0].layers.first:
        first -= 1
        size += engine.profile.layer_bytes[first]
    return first, last


def bench(rounds: int = 15) -> Result:
    import torch

    from vramancer.engine import Engine

    engine = Engine.load("default", DEVICES, context=512, weights="native")
    first, last = _block(engine, MIN_BLOCK)
    home, away = engine.placement.blocks()[0].device, engine.placement.blocks()[1].device
    nbytes = sum(engine.profile.layer_bytes[i] for i in range(first, last + 1))
    result = Result(
        "transfer", "Migration bandwidth between simulated devices vs memcpy",
        {"rounds": rounds, "block": f"L{first}–{last} ({nbytes / 2**20:.0f} MiB, float32)", "devices": DEVICES},
        {"gb_s": ("GB/s", 2), "ms": ("ms per move", 2)},
    )
    engine.generate("Hello", max_new_tokens=2)  # every weight page touched once, as in use
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src).fill_(0)
    layers = engine.model.get_decoder().layers
    sources = [p.detach().clone() for i in range(first, last + 1) for p in layers[i].parameters()]
    targets = [torch.zeros_like(t) for t in sources]

    def tensor_by_tensor():
        for target, source in zip(targets, sources):
            target.copy_(source)

    def migrate():
        target = away if engine.placement.layer_devices[first] == home else home
        moved = engine.migrate(first, last, target)
        assert moved.bytes >= nbytes
        return {"gb_s": moved.bytes / moved.seconds / 1e9, "ms": moved.seconds * 1000}

    def timed(fn):
        def run():
            start = time.perf_counter()
            out = fn()
            seconds = time.perf_counter() - start
            del out
            return {"gb_s": nbytes / seconds / 1e9, "ms": seconds * 1000}
        return run

    name = f"VRAMancer migrate {result.settings['block'].split(' (')[0]} {home} ⇄ {away}"
    contenders = {name: migrate, MEMCPY: timed(lambda: dst.copy_(src)),
                  PER_TENSOR: timed(tensor_by_tensor), CLONE: timed(src.clone)}
    result.add(alternate(contenders, rounds, warmup=2))
    result.ratio("migrate GB/s ÷ memcpy GB/s", name, MEMCPY, "gb_s", True, at_least=0.7)
    result.ratio("migrate GB/s ÷ tensor-by-tensor copy_ GB/s", name, PER_TENSOR, "gb_s", True)
    result.ratio("migrate GB/s ÷ clone GB/s", name, CLONE, "gb_s", True)
    engine.close()
    if torch.cuda.is_available():
        _gpu(result, rounds)
    else:
        result.notes.append("no CUDA device here: the cuda:0 ⇄ cpu migration was not measured")
    return result


def _gpu(result: Result, rounds: int) -> None:
    """The same between cuda:0 and the CPU; the bound is a pinned-host ⇄ device copy_."""
    import torch

    from vramancer.engine import Engine

    engine = Engine.load("default", "cuda:0,cpu", context=512, weights="native")
    blocks = engine.placement.blocks()
    if len(blocks) < 2:
        result.notes.append("cuda:0 holds the whole model, so there was no cuda:0 ⇄ cpu block to move")
        engine.close()
        return
    first, last = _block(engine, MIN_BLOCK)
    home, away = blocks[0].device, blocks[1].device
    nbytes = sum(engine.profile.layer_bytes[i] for i in range(first, last + 1))
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(1)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")

    def migrate():
        target = away if engine.placement.layer_devices[first] == home else home
        moved = engine.migrate(first, last, target)
        return {"gb_s": moved.bytes / moved.seconds / 1e9, "ms": moved.seconds * 1000}

    def copy():
        torch.cuda.synchronize()
        start = time.perf_counter()
        device.copy_(host)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return {"gb_s": nbytes / seconds / 1e9, "ms": seconds * 1000}

    name = f"GPU: VRAMancer migrate L{first}–{last} {home} ⇄ {away}"
    bound = "GPU: pinned host → cuda:0 copy_"
    result.add(alternate({name: migrate, bound: copy}, rounds, warmup=2))
    result.ratio("GPU: migrate GB/s ÷ pinned copy_ GB/s", name, bound, "gb_s", True)
    engine.close()


if __name__ == "__main__":
    cli(bench, __doc__, [("--rounds", int, 15)])
