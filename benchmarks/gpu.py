"""GPU benchmark: one GPU, a random-weight Llama-architecture model of about 1.1 B parameters
in bfloat16 built on the device (no download), and three ways to run it.

- decode tok/s and time to first token: plain transformers unsplit on cuda:0; VRAMancer
  `cuda:0,cpu` with half the layers on each, as loaded (CUDA graphs left to auto) and with
  `--no-cuda-graphs`; accelerate's `dispatch_model` with the very same
  device map (accelerate keeps "cpu" entries' weights in host memory and streams them to the
  GPU for every forward pass, while VRAMancer computes those layers on the CPU);
- host ⇄ device GB/s of VRAMancer's TransferManager (pinned staging) against torch's `copy_`
  between pinned host memory and the GPU (the bound);
- migration GB/s of a block of at least 256 MiB of layers, cuda:0 → cpu and back.

One result, `gpu`: recorded as gpu.json (benchmarks.report's record: when, where, by which
command) in $OUT, or in benchmarks/results/ when OUT is unset, where docs/benchmarks.md's table
is regenerated from it; a run elsewhere hands its gpu.json back to be copied there. While it
runs, each stage also rewrites gpu-<UTC time>.json and .md (and gpu-latest.*) in the same
folder, so a run cut short leaves what it measured. Prints the markdown. About 2 minutes on an
H100.

    python -m benchmarks.gpu [--rounds 3] [--tokens 32] [--model-size 1b|medium]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.common import (
    PROMPT,
    Result,
    alternate,
    compare,
    machine,
    machine_line,
    say,
)

PLAIN = "plain transformers, unsplit on cuda:0"
PLAIN_BESIDE_GRAPHS = "plain transformers, unsplit on cuda:0 (beside the graphs)"
VRAMANCER = "VRAMancer cuda:0 + cpu, half the layers each"
VRAMANCER_EAGER = "VRAMancer cuda:0 + cpu, --no-cuda-graphs"
ACCELERATE = "accelerate dispatch_model, same device map"
TRANSFER_BYTES = 8 * 2**20  # the pinned-staging path (TransferManager stages up to 16 MiB)
TRANSFERS_PER_SAMPLE = 20
HAND_OVER_ELEMENTS = 2048  # a decode step's hidden state in the 1.1 B model: 4 KiB in bfloat16
MIGRATION_BYTES = 256 * 2**20


def results_folder() -> Path:
    out = os.environ.get("OUT")
    return Path(out) if out else Path(__file__).resolve().parent / "results"


def gpu_result(rounds: int, tokens: int) -> Result:
    """The run's one result: each stage adds its contenders (decode and first token, or GB/s
    and ms of a copy) and its comparisons."""
    return Result("gpu", "GPU: decode split cuda:0 + cpu against plain transformers and accelerate, CUDA graphs, "
                  "transfers (random Llama, bfloat16, greedy)", {"new tokens": tokens, "rounds": rounds},
                  {"decode_tok_s": ("decode tok/s", 1), "ttft_ms": ("TTFT ms", 1), "gb_s": ("GB/s", 2),
                   "ms": ("ms per copy or move", 4)})


def bench(rounds: int, tokens: int, model_size: str, setup: dict, result: Result, failures: list[str],
          publish) -> None:
    """Fills `setup` and `result`, calling `publish()` after each stage, so a run cut short
    still leaves what it measured. A stage that breaks is recorded in `failures` and the
    next stage still runs."""
    import torch

    from benchmarks.random_llama import MEDIUM, ONE_B, build, save
    from vramancer.engine import Engine

    shape = {"1b": ONE_B, "medium": MEDIUM}[model_size]
    setup["model"] = f"random Llama, {shape.params() / 1e9:.2f} B parameters, {shape}"
    scratch = Path(tempfile.mkdtemp(prefix="vramancer-gpu-"))
    os.environ.setdefault("VRM_CACHE_DIR", str(scratch / "cache"))  # profile afresh: part of the load
    try:
        say(f"gpu: building {setup['model']} on cuda:0")
        start = time.perf_counter()
        plain, tokenizer = build(shape, torch.bfloat16, device="cuda:0")
        torch.cuda.synchronize()
        setup["build_s"] = round(time.perf_counter() - start, 2)
        folder = scratch / "model"
        setup["save_s"] = round(save(plain, tokenizer, folder), 2)
        say(f"gpu: built in {setup['build_s']} s, saved in {setup['save_s']} s")

        start = time.perf_counter()
        engine = Engine.load(str(folder), "cuda:0,cpu", context=1024)
        setup["vramancer_load_s"] = round(time.perf_counter() - start, 2)
        setup["vramancer_dtype (auto)"] = str(engine.dtype).removeprefix("torch.")
        moved = engine.migrate(shape.layers // 2, shape.layers - 1, "cpu")
        setup["split"] = ", ".join(f"{b.device} L{b.layers.first}–{b.layers.last}" for b in engine.placement.blocks())
        setup["split_migration"] = moved.describe()
        setup["predicted_tok_s"] = round(engine.predict().tokens_per_s, 2)
        say(f"gpu: VRAMancer loaded in {setup['vramancer_load_s']} s ({setup['vramancer_dtype (auto)']}); "
            f"{setup['split']}; {setup['split_migration']}")
        publish()

        dispatched = device_map = None
        try:
            start = time.perf_counter()
            from transformers import AutoModelForCausalLM

            from benchmarks.decode import accelerate_model

            to_dispatch = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).eval()
            dispatched, device_map = accelerate_model(to_dispatch, engine)
            setup["accelerate_load_s"] = round(time.perf_counter() - start, 2)
        except Exception:
            failures.append("accelerate dispatch_model: " + traceback.format_exc())
            say(failures[-1])
        stage(failures, publish, "decode",
              lambda: decode_result(result, rounds, tokens, plain, tokenizer, engine, dispatched, device_map, setup))
        dispatched = to_dispatch = None
        stage(failures, publish, "transfer", lambda: transfer_result(result, max(rounds, 5), engine))
        stage(failures, publish, "graphs",
              lambda: graphs_result(result, rounds, tokens, plain, tokenizer, engine, shape.layers))
        engine.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def stage(failures: list[str], publish, name: str, run) -> None:
    try:
        run()
    except Exception:
        failures.append(f"{name}: " + traceback.format_exc())
        say(failures[-1])
    publish()


def decode_result(result: Result, rounds, tokens, plain, tokenizer, engine, dispatched, device_map, setup) -> None:
    """Decode and first token: plain unsplit, VRAMancer split as loaded and eager, accelerate."""
    import torch

    from benchmarks.decode import _hf_runner, vramancer_runner

    inputs = dict(tokenizer(PROMPT, return_tensors="pt"))
    vram_run, _ = vramancer_runner(engine, tokens)
    graphs = engine.cuda_graphs  # as loaded: --cuda-graphs left to auto
    setup["vramancer_cuda_graphs (auto)"] = graphs
    runners = {PLAIN: _hf_runner(plain, {k: v.to("cuda:0") for k, v in inputs.items()}, tokens),
               VRAMANCER: switched(engine, vram_run, graphs), VRAMANCER_EAGER: switched(engine, vram_run, False)}
    if dispatched is not None:
        embed_device = device_map["model.embed_tokens"]
        runners[ACCELERATE] = _hf_runner(dispatched, {k: v.to(embed_device) for k, v in inputs.items()}, tokens)
    seen: dict[str, list[int]] = {}
    torch.cuda.synchronize()
    result.add(alternate({name: sampler(seen, name, run) for name, run in runners.items()}, rounds))
    engine.cuda_graphs = graphs
    result.ratio("VRAMancer ÷ plain unsplit, decode tok/s", VRAMANCER, PLAIN, "decode_tok_s", True)
    result.ratio("VRAMancer as loaded ÷ --no-cuda-graphs, decode tok/s", VRAMANCER, VRAMANCER_EAGER,
                 "decode_tok_s", True)
    if dispatched is not None:
        result.ratio("VRAMancer ÷ accelerate, decode tok/s", VRAMANCER, ACCELERATE, "decode_tok_s", True, at_least=1.0)
        result.ratio("TTFT speed, accelerate TTFT ÷ VRAMancer TTFT", ACCELERATE, VRAMANCER, "ttft_ms", False)
        result.notes.append("accelerate runs the layers mapped to \"cpu\" on the GPU, streaming their weights from "
                            "host memory every forward pass; VRAMancer computes them on the CPU. Same map, different work.")
    else:
        result.notes.append("accelerate dispatch_model could not be set up (see the failures)")
    predicted = setup.get("predicted_tok_s")
    if predicted:
        # Informative here; tests/integration/test_cuda.py holds predictions to within 25 %.
        result.comparisons.append(compare("VRAMancer predicted ÷ measured decode tok/s",
                                          predicted / result.median(VRAMANCER, "decode_tok_s")))
    differ = {name: next(i for i, (a, b) in enumerate(zip(ids, seen[PLAIN])) if a != b)
              for name, ids in seen.items() if name != PLAIN and ids != seen[PLAIN]}
    # bfloat16 rounds differently on the CPU and the GPU, so a difference can be a near-tie:
    # say how far apart plain transformers' two best logits were where the tokens part.
    result.settings["same tokens as plain"] = "all" if not differ else ", ".join(
        f"{name} differs from token {i} (plain's two best logits there {logit_gap(plain, inputs, seen[PLAIN][:i]):.3f} apart)"
        for name, i in differ.items())


def logit_gap(model, inputs: dict, new_tokens: list[int]) -> float:
    """How far apart `model`'s two best logits are after the prompt and `new_tokens`."""
    import torch

    device = next(model.parameters()).device
    ids = torch.cat([inputs["input_ids"].to(device), torch.tensor([new_tokens], dtype=torch.long, device=device)], dim=1)
    with torch.inference_mode():
        top = torch.topk(model(input_ids=ids).logits[0, -1].float(), 2).values
    return float(top[0] - top[1])


def sampler(seen: dict, name: str, run):
    """One round of `run` as the table's cells; the first round's tokens go into `seen`."""
    def sample():
        ids, ttft, rate = run()
        seen.setdefault(name, ids)
        return {"decode_tok_s": rate, "ttft_ms": ttft * 1000}
    return sample


def switched(engine, run, graphs: bool):
    """`run` with the engine's CUDA graphs on or off; turned on, a short answer records them
    first, as the first answer after a load or a migration would."""
    def switched_run():
        if engine.cuda_graphs != graphs:
            engine.cuda_graphs = graphs
            if graphs:
                engine.generate(PROMPT, max_new_tokens=4)
        return run()
    return switched_run


def graphs_result(result: Result, rounds, tokens, plain, tokenizer, engine, layers: int) -> None:
    """Every layer back on cuda:0, then VRAMancer's decode step eager and replayed from CUDA
    graphs (--cuda-graphs), with plain transformers beside them."""
    import torch

    from benchmarks.decode import _hf_runner, vramancer_runner

    engine.migrate(0, layers - 1, "cuda:0")
    inputs = {k: v.to("cuda:0") for k, v in tokenizer(PROMPT, return_tensors="pt").items()}
    vram_run, _ = vramancer_runner(engine, tokens)
    eager, graphed = "VRAMancer cuda:0, eager", "VRAMancer cuda:0, --cuda-graphs"
    seen: dict[str, list[int]] = {}
    torch.cuda.synchronize()
    result.add(alternate({PLAIN_BESIDE_GRAPHS: sampler(seen, PLAIN, _hf_runner(plain, inputs, tokens)),
                          eager: sampler(seen, eager, switched(engine, vram_run, False)),
                          graphed: sampler(seen, graphed, switched(engine, vram_run, True))}, rounds))
    result.ratio("CUDA graphs ÷ eager, decode tok/s", graphed, eager, "decode_tok_s", True, at_least=1.0)
    result.ratio("CUDA graphs ÷ plain unsplit, decode tok/s", graphed, PLAIN_BESIDE_GRAPHS, "decode_tok_s", True)
    result.ratio("eager ÷ plain unsplit, decode tok/s", eager, PLAIN_BESIDE_GRAPHS, "decode_tok_s", True)
    result.notes.append("Turning graphs on records them in the next answer's first decode step; they are kept, with "
                        "the static KV cache, until the split changes. Each graphs round after an eager one first "
                        "runs a 4-token answer (the recording one), then the timed answer.")
    result.settings["layers recorded"] = engine.split.graphs.recordings if engine.split.graphs else None
    engine.cuda_graphs = False
    result.settings["same tokens, graphs and eager"] = "yes" if seen.get(graphed) == seen.get(eager) else (
        f"differ from token {next(i for i, (a, b) in enumerate(zip(seen[graphed], seen[eager])) if a != b)}"
        " (bfloat16; the static cache attends with a mask)")


def transfer_result(result: Result, rounds: int, engine) -> None:
    """TransferManager's host ⇄ cuda:0 copies against copy_ with pinned memory, and migrations."""
    import torch

    from vramancer.runtime.transfer import TransferManager

    result.settings["transfer rounds"] = rounds
    result.settings["transfer size"] = f"{TRANSFER_BYTES // 2**20} MiB × {TRANSFERS_PER_SAMPLE} per sample"
    transfer = TransferManager(engine.devices)
    elements = TRANSFER_BYTES // 2
    host = torch.randn(elements).to(torch.bfloat16)  # pageable, as a hidden state on the CPU is
    gpu_tensor = torch.randn(elements, device="cuda:0").to(torch.bfloat16)
    pinned = torch.empty(elements, dtype=torch.bfloat16, pin_memory=True).copy_(host)
    gpu_target = torch.empty_like(gpu_tensor)

    hidden = torch.randn(1, 1, HAND_OVER_ELEMENTS).to(torch.bfloat16)  # one decode step's hidden state
    hidden_pinned = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True).copy_(hidden)
    hidden_gpu = torch.empty_like(hidden, device="cuda:0")

    def timed(copy, nbytes=TRANSFER_BYTES):
        def run():
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(TRANSFERS_PER_SAMPLE):
                copy()
            torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / TRANSFERS_PER_SAMPLE
            return {"gb_s": nbytes / seconds / 1e9, "ms": seconds * 1000}
        return run

    names = {
        "h2d": "TransferManager host → cuda:0 (pinned staging)",
        "h2d_bound": "copy_ pinned host → cuda:0 (bound)",
        "d2h": "TransferManager cuda:0 → host",
        "d2h_bound": "copy_ cuda:0 → pinned host (bound)",
        "h2d_pageable": "tensor.to(cuda:0) from pageable host (informative)",
        "hand_over": f"TransferManager host → cuda:0, one hidden state ({HAND_OVER_ELEMENTS * 2 // 1024} KiB)",
        "hand_over_bound": f"copy_ pinned host → cuda:0, {HAND_OVER_ELEMENTS * 2 // 1024} KiB (bound)",
    }
    hand_over_bytes = HAND_OVER_ELEMENTS * 2
    contenders = {
        names["h2d"]: timed(lambda: transfer.move(host, "cpu", "cuda:0", record=False)),
        names["h2d_bound"]: timed(lambda: gpu_target.copy_(pinned)),
        names["d2h"]: timed(lambda: transfer.move(gpu_tensor, "cuda:0", "cpu", record=False)),
        names["d2h_bound"]: timed(lambda: pinned.copy_(gpu_tensor)),
        names["h2d_pageable"]: timed(lambda: host.to("cuda:0")),
        names["hand_over"]: timed(lambda: transfer.move(hidden, "cpu", "cuda:0", record=False), hand_over_bytes),
        names["hand_over_bound"]: timed(lambda: hidden_gpu.copy_(hidden_pinned), hand_over_bytes),
    }
    result.add(alternate(contenders, rounds, warmup=1))
    result.ratio("host → cuda:0: TransferManager ÷ pinned copy_", names["h2d"], names["h2d_bound"], "gb_s", True, at_least=0.8)
    result.ratio("cuda:0 → host: TransferManager ÷ pinned copy_", names["d2h"], names["d2h_bound"], "gb_s", True, at_least=0.8)
    result.ratio("host → cuda:0: TransferManager ÷ pageable tensor.to", names["h2d"], names["h2d_pageable"], "gb_s", True)
    result.ratio("one hidden state host → cuda:0: TransferManager ÷ pinned copy_", names["hand_over"],
                 names["hand_over_bound"], "gb_s", True)
    migrations(result, rounds, engine)


def migrations(result: Result, rounds: int, engine) -> None:
    """A block of layers on cuda:0 (at least MIGRATION_BYTES) to the CPU and back, against
    copy_ of the same bytes between the GPU and pinned host memory."""
    import torch

    profile = engine.profile
    on_gpu = [i for i, d in enumerate(engine.placement.layer_devices) if d == "cuda:0"]
    block = []
    for i in on_gpu:
        block.append(i)
        if sum(profile.layer_bytes[j] for j in block) >= MIGRATION_BYTES:
            break
    first, last = block[0], block[-1]
    nbytes = sum(profile.layer_bytes[j] for j in block)
    result.settings["migration block"] = f"L{first}–{last}, {nbytes / 2**20:.0f} MiB"
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")

    def migrate(dst):
        def run():
            if engine.placement.layer_devices[first] == dst:  # a failed round left it there
                engine.migrate(first, last, "cuda:0" if dst == "cpu" else "cpu")
            moved = engine.migrate(first, last, dst)
            return {"gb_s": moved.bytes / moved.seconds / 1e9, "ms": moved.seconds * 1000}
        return run

    def copy(fn):
        def run():
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            return {"gb_s": nbytes / seconds / 1e9, "ms": seconds * 1000}
        return run

    down, up = f"VRAMancer migrate L{first}–{last} cuda:0 → cpu", f"VRAMancer migrate L{first}–{last} cpu → cuda:0"
    down_bound, up_bound = "copy_ cuda:0 → pinned host, same bytes", "copy_ pinned host → cuda:0, same bytes"
    result.add(alternate({down: migrate("cpu"), up: migrate("cuda:0"),
                          down_bound: copy(lambda: pinned.copy_(device)), up_bound: copy(lambda: device.copy_(pinned))},
                         rounds, warmup=1))
    result.ratio("migrate cuda:0 → cpu ÷ pinned copy_", down, down_bound, "gb_s", True)
    result.ratio("migrate cpu → cuda:0 ÷ pinned copy_", up, up_bound, "gb_s", True)


def render(report: dict, result: Result) -> str:
    setup = report["setup"]
    lines = [f"Measured {report['started']} on {machine_line(report['machine'])}.",
             f"Reproduce: `python -m benchmarks.gpu` (took {report['duration_s']:.0f} s). Cells: median (min–max) over "
             "the rounds; contenders alternate A B A B after a warm-up.", "",
             "Setup: " + "; ".join(f"{k} {v}" for k, v in setup.items()) + ".", ""]
    lines += [result.markdown(), ""]
    for failure in report["failures"]:
        lines += ["", "### failed", "", "```", failure.rstrip(), "```"]
    return "\n".join(lines).rstrip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--model-size", choices=("1b", "medium"), default="1b")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("benchmarks.gpu needs a CUDA GPU, and torch sees none on this machine.", file=sys.stderr)
        return 2
    if args.rounds < 1 or args.tokens < 2:
        print("--rounds must be at least 1 and --tokens at least 2.", file=sys.stderr)
        return 2
    started = datetime.now(timezone.utc)
    folder = results_folder()
    folder.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    json_path, md_path = folder / f"gpu-{stamp}.json", folder / f"gpu-{stamp}.md"
    info = machine()
    setup: dict = {}
    result = gpu_result(args.rounds, args.tokens)
    failures: list[str] = []

    def publish() -> str:
        report = {"machine": info, "started": started.isoformat(timespec="seconds"), "setup": setup,
                  "benchmarks": {result.name: result.to_json()}, "failures": failures,
                  "duration_s": round((datetime.now(timezone.utc) - started).total_seconds(), 1)}
        markdown = render(report, result)
        json_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        md_path.write_text(markdown + "\n")
        shutil.copyfile(json_path, folder / "gpu-latest.json")
        shutil.copyfile(md_path, folder / "gpu-latest.md")
        return markdown

    try:
        bench(args.rounds, args.tokens, args.model_size, setup, result, failures, publish)
    except Exception:  # keep what was measured, and say what broke
        failures.append(traceback.format_exc())
        say(failures[-1])
    print(publish())
    say(f"wrote {json_path} and {md_path.name}")
    command = " ".join(["python -m benchmarks.gpu", *(sys.argv[1:] if argv is None else argv)])
    say(f"recorded in {keep(result, setup, failures, command, info, folder)}")
    return 1 if failures else 0


def keep(result: Result, setup: dict, failures: list[str], command: str, info: dict, folder: Path) -> str:
    """Record the run as gpu.json in `folder`, the setup among its settings and each broken
    stage as a note."""
    result.settings = {**setup, **result.settings}
    result.notes += [f"failed: {failure.strip().splitlines()[0]} … {failure.strip().splitlines()[-1]}"
                     for failure in failures]
    return record_in(result, command, info, folder)


def record_in(result: Result, command: str, info: dict, folder: Path) -> str:
    """Record `result` as <name>.json in `folder`; in benchmarks/results/ the doc's table is
    regenerated from it. Says where it went."""
    from benchmarks.report import RESULTS, record, write_doc

    path = record(result, command, info, folder)
    if folder.resolve() == RESULTS.resolve():
        return f"{path.name}; updated {write_doc().name}"
    return f"{path} (copy it into benchmarks/results/ and run python -m benchmarks.report)"


if __name__ == "__main__":
    sys.exit(main())
