"""Dashboard responsiveness, driven through Textual's Pilot with the bundled model streaming.

- key → screen: while an answer streams (the model decoding on the engine's thread), type into
  the prompt — a character, then backspace, and so on. For each press, the time from handing
  the key event to the App (as the terminal driver does) to the first screen update that shows
  the prompt's new text. The App runs headless,
  where Textual composes each update but writes nothing; the benchmark renders every update
  to terminal output itself (and throws it away), so that cost is counted too.
- start, idle and quit, as a person meets them (benchmarks/terminal.py): `python -m vramancer`
  in a pseudo-terminal at 120x40 and at 200x60: seconds to the first frame, CPU while loaded
  and idle (telemetry on, 1 Hz; every thread of the process, as a share of one core), and
  seconds from ctrl+q to the process having exited.

- key → screen while a server streams: the same presses with no model loaded while eight
  synthetic server requests stream at 20 tokens/s each (RequestQueued, RequestStarted, Token,
  GenerationDone and BatchStatus events, sent through the App's emit on a thread of their own,
  as the engine worker sends them): what showing a busy server costs the UI.

- key → screen while the dashboard serves (`--serve`): the bundled model answers eight HTTP
  clients on 127.0.0.1 at once, each streaming chat completions one after another, while
  the same presses are timed: what a real busy server costs the UI, decoding included.
- a migration from the dashboard and from the CLI: the same block of the bundled model (the
  smallest run of layers ending the first device's block whose float32 weights hold 108 MiB),
  moved back and forth between two simulated devices while an answer streams: from the App
  (as a drop sends it, telemetry on) and from `vramancer generate --migrate` in a process of
  its own, in alternating rounds; each move's milliseconds as the engine logs them.

The App of the key → screen figure runs in this process with torch's default thread count
(every core), so decoding competes with the UI harder than under `vramancer`, whose
`--threads` leaves a core free.

    python -m benchmarks.dashboard [--presses 60] [--idle-s 10] [--moves 12]
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
import time

from benchmarks.common import PROMPT, Result, cli, compare, say
from benchmarks.terminal import session

DEVICES = "auto"  # what `make run` opens: on a CPU-only machine, a simulated pool of two
SIZE = (120, 40)
TERMINALS = ((120, 40), (200, 60))  # the sizes the start / idle / quit figures are taken at
GAPS = (0.03, 0.05, 0.08, 0.12)  # pauses between presses, cycled: presses land at every phase of a decode step
WARMUP_PRESSES = 6
SERVED_STREAMS, SERVED_RATE = 8, 20.0  # server requests streaming at once, tokens/s each
TIMEOUT = 120.0
MOVE_DEVICES = "sim:2x1GiB"  # room on either device for the block: every move there and back fits
MOVE_BYTES = 108 * 2**20  # the move: 108 MiB
# The weights: float32. At the GGUF's own q4 width (`--weights auto`) the first
# device's whole block holds 32 MiB, and "a 108 MiB move" moved that.
MOVE_WEIGHTS = "native"
MOVE_ROUNDS = 3  # the App's moves and the CLI's take turns this many times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def press(app, key: str) -> None:
    """Hand one key to the App as its terminal driver does. (`Pilot.press` would then wait for
    the process to go idle, which it never does while the model decodes on another thread.)"""
    from textual import events

    event = events.Key(key, {"backspace": "\x7f"}.get(key, key))
    event.set_sender(app)
    app._driver.send_message(event)


async def _until(condition, what: str, timeout: float = TIMEOUT, step: float = 0.001):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(step)
    return result


async def time_presses(app, shown: list[tuple[float, str]], presses: int) -> list[float]:
    """Type into the prompt (a character, then backspace, ...); for each press, milliseconds until
    the first screen update that shows its effect."""
    prompt = app.console_panel.prompt
    latencies: list[float] = []
    for i in range(WARMUP_PRESSES + presses):
        key = "x" if prompt.value == "" else "backspace"
        expected = "x" if key == "x" else ""
        since = len(shown)
        start = time.perf_counter()
        press(app, key)
        when = await _until(lambda: next((t for t, v in shown[since:] if v == expected), None),
                            f"the screen to show the effect of {key!r}", timeout=10)
        if i >= WARMUP_PRESSES:
            latencies.append((when - start) * 1000)
        await asyncio.sleep(GAPS[i % len(GAPS)])
    return latencies


def record_screens(app, shown: list[tuple[float, str]]):
    """Render every screen update as a terminal driver would, noting when and the prompt's text."""
    from textual._compositor import CompositorUpdate

    display = app._display
    prompt = app.console_panel.prompt

    def display_and_render(screen, renderable) -> None:
        display(screen, renderable)
        if renderable is None:
            return
        if isinstance(renderable, CompositorUpdate):
            renderable.render_segments(app.console)  # what a real terminal's driver would be sent
        shown.append((time.perf_counter(), prompt.value))

    app._display = display_and_render
    return display


class SyntheticStreams:
    """What a server's continuous batch sends the dashboard: `streams` requests decoding at
    `tokens_per_s` each, a batch status twice a second, and each request replaced by a new one
    when it has its tokens. Sent through the App's emit on a thread, as the engine worker does."""

    def __init__(self, app, streams: int, tokens_per_s: float, tokens_each: int = 100) -> None:
        self.app, self.streams, self.interval, self.tokens_each = app, streams, 1 / tokens_per_s, tokens_each
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="synthetic-streams", daemon=True)

    def start(self) -> "SyntheticStreams":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        from vramancer.engine import events as ev

        emit = self.app._emit
        made = 0
        live: dict[str, int] = {}
        next_status = time.monotonic()
        while not self._stop.is_set():
            while len(live) < self.streams:
                made += 1
                request = f"bench-{made}"
                emit(ev.RequestQueued(request, f"127.0.0.1:{50000 + made % 10000}", "Benchmark prompt", 16,
                                      self.tokens_each))
                emit(ev.RequestStarted(request))
                live[request] = 0
            for request in list(live):
                emit(ev.Token(" tok", request))
                self.sent += 1
                live[request] += 1
                if live[request] >= self.tokens_each:
                    del live[request]
                    emit(ev.GenerationDone(request, "", (), 16, self.tokens_each, 0.05, 1 / self.interval, False,
                                           "length", self.tokens_each * self.interval))
            if time.monotonic() >= next_status:
                next_status += 0.5
                emit(ev.BatchStatus(len(live), 0, len(live) / self.interval, 0, 2048))
            self._stop.wait(self.interval)


async def measure_serving(presses: int, streams: int = 8, tokens_per_s: float = 20.0) -> dict:
    """Key → screen while `streams` synthetic server requests stream (no model: the UI's cost only)."""
    from vramancer.app import VramancerApp

    app = VramancerApp(telemetry=False)
    shown: list[tuple[float, str]] = []
    async with app.run_test(size=SIZE):
        await _until(lambda: app.worker is not None and app._handlers, "the engine to start", step=0.05)
        display = record_screens(app, shown)
        app.console_panel.prompt.focus()
        synthetic = SyntheticStreams(app, streams, tokens_per_s).start()
        await asyncio.sleep(2.0)  # the requests' list fills and settles
        started, sent = time.perf_counter(), synthetic.sent
        latencies = await time_presses(app, shown, presses)
        rate = (synthetic.sent - sent) / (time.perf_counter() - started)
        synthetic.stop()
        app._display = display
    return {"latencies_ms": latencies, "tokens_per_s": rate}


class StreamingClients:
    """`clients` HTTP clients of the dashboard's server, each asking for one streamed chat
    completion after another (OpenAI's wire format, read chunk by chunk as they arrive)."""

    def __init__(self, port: int, clients: int, max_tokens: int = 48) -> None:
        import httpx

        self.base = f"http://127.0.0.1:{port}/v1"
        self.model = httpx.get(f"{self.base}/models", timeout=30).json()["data"][0]["id"]
        self.max_tokens, self.chunks, self.errors = max_tokens, 0, []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), name=f"client-{i}", daemon=True)
                         for i in range(clients)]

    def start(self) -> "StreamingClients":
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _run(self, index: int) -> None:
        import httpx

        body = {"model": self.model, "stream": True, "max_tokens": self.max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": f"{PROMPT} ({index})"}]}
        with httpx.Client(timeout=120) as client:
            while not self._stop.is_set():
                try:
                    with client.stream("POST", f"{self.base}/chat/completions", json=body) as response:
                        for line in response.iter_lines():
                            self.chunks += line.startswith("data: {")
                            if self._stop.is_set():
                                break
                except httpx.HTTPError as exc:
                    self.errors.append(str(exc))
                    return


async def measure_served_model(presses: int, clients: int) -> dict:
    """Key → screen with the dashboard serving `clients` streaming HTTP clients (`--serve`)."""
    import socket

    from vramancer.app import VramancerApp
    from vramancer.config.options import LoadOptions

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = VramancerApp(LoadOptions("default", DEVICES, "proportional", 2048, "auto"), telemetry=True,
                       serve_port=port, serve_settings={"max_batch": clients})
    shown: list[tuple[float, str]] = []
    async with app.run_test(size=SIZE):
        await _until(lambda: app.plan is not None and app.console_panel.ready, "the model to load", step=0.05)
        display = record_screens(app, shown)
        app.console_panel.prompt.focus()
        streams = await asyncio.to_thread(StreamingClients, port, clients)
        streams.start()
        await _until(lambda: streams.chunks >= clients * 4 or streams.errors, "the answers to stream", step=0.05)
        started, chunks = time.perf_counter(), streams.chunks
        latencies = await time_presses(app, shown, presses)
        rate = (streams.chunks - chunks) / (time.perf_counter() - started)
        await asyncio.to_thread(streams.stop)
        app._display = display
    if streams.errors:
        raise RuntimeError(f"a client of the dashboard's server failed: {streams.errors[0]}")
    return {"latencies_ms": latencies, "chunks_per_s": rate}


async def measure(presses: int, idle_s: float) -> dict:
    from vramancer.app import VramancerApp
    from vramancer.config.options import LoadOptions

    app = VramancerApp(LoadOptions("default", DEVICES, "proportional", 2048, "auto", weights="native"), telemetry=True,
                       sampling={"max_new_tokens": 1500})
    shown: list[tuple[float, str]] = []  # (when, the prompt's text in that update)

    async with app.run_test(size=SIZE) as pilot:
        console = app.console_panel
        prompt = console.prompt
        display = record_screens(app, shown)
        say("dashboard: loading the bundled model")
        await _until(lambda: app.plan is not None and console.ready, "the model to load", step=0.05)
        await asyncio.sleep(2.0)  # the first telemetry readings and layout settle

        prompt.focus()
        await pilot.press(*PROMPT, "enter")
        await _until(lambda: len(console.answer_text) > 20, "the answer to stream", step=0.01)
        streamed_from, pressing_from = len(console.answer_text), time.perf_counter()
        latencies = await time_presses(app, shown, presses)
        still_streaming = console.generating
        streamed = len(console.answer_text) - streamed_from
        pressing_s = time.perf_counter() - pressing_from
        await pilot.press("escape")
        await _until(lambda: not console.generating, "the answer to stop", step=0.01)
        app._display = display
    return {"latencies_ms": latencies, "still_streaming": still_streaming,
            "chars_streamed_while_pressing": streamed, "pressing_s": pressing_s}


def move_block(plan) -> tuple[int, int, str, str]:
    """(first, last, home, away): the smallest run of layers ending the first device's block
    that holds MOVE_BYTES, its device and the next block's."""
    blocks = plan.blocks
    last = blocks[0].last_layer
    first = last
    while plan.part_bytes(first, last) < MOVE_BYTES and first > blocks[0].first_layer:
        first -= 1
    if plan.part_bytes(first, last) < MOVE_BYTES:
        raise RuntimeError(f"the first device's block holds {plan.part_bytes(first, last)} bytes, less than the move's")
    return first, last, blocks[0].device, blocks[1].device


async def measure_moves(moves: int, rounds: int) -> tuple[tuple[int, int, str, str], list[float], list[float], int]:
    """Milliseconds of each move of the block, from the App and from the CLI, in alternating
    rounds: the App moves it there and back while an answer streams (as a drop does: the tile
    shows the move, the App sends it; telemetry on), then, with the App idle, `vramancer
    generate --migrate` makes as many moves in a process of its own; and again. The machine's
    load drifts: each side gets a share of every phase of it. Also returns the bytes the App's
    first move copied."""
    from vramancer.app import VramancerApp
    from vramancer.config.options import LoadOptions

    def cli_threads() -> None:  # torch's threads as `vramancer` sets them, the same as the CLI's below
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))

    each = max(2, 2 * round(moves / rounds / 2))  # there and back: the block ends every round at home
    app = VramancerApp(LoadOptions("default", MOVE_DEVICES, "proportional", 2048, "auto", weights=MOVE_WEIGHTS),
                       telemetry=True, sampling={"max_new_tokens": 1500}, prepare=cli_threads)
    from_cli: list[float] = []
    async with app.run_test(size=SIZE) as pilot:
        console = app.console_panel
        await _until(lambda: app.plan is not None and console.ready, "the model to load", step=0.05)
        await asyncio.sleep(2.0)
        block = first, last, home, away = move_block(app.plan)
        for r in range(rounds):
            console.prompt.focus()
            await pilot.press(*PROMPT, "enter")
            await _until(lambda: len(console.answer_text) > 20, "the answer to stream", step=0.01)
            for i in range(each):
                done = len(app.migrations)
                drop(app, first, last, away if i % 2 == 0 else home)
                # Looked for every 0.1 s: the App thread woken every 10 ms to look took the GIL from
                # the move (a person's App waits for input); the engine times the move itself.
                await _until(lambda: len(app.migrations) > done, f"move {i + 1} to be done", timeout=30, step=0.1)
                await _until(lambda: app.placement_panel.shown is app.plan, "the new plan on screen", step=0.1)
                await asyncio.sleep(0.3)  # a few tokens between two moves, as between two drags
            await pilot.press("escape")
            await _until(lambda: not console.generating, "the answer to stop", step=0.01)
            from_cli += await asyncio.to_thread(measure_cli_moves, block, each)
            say(f"dashboard: round {r + 1}/{rounds}: move ms from the dashboard "
                f"{_brief([m.seconds * 1000 for m in app.migrations[-each:]])}, from the CLI {_brief(from_cli[-each:])}")
        from_app = [m.seconds * 1000 for m in app.migrations]
    return block, from_app, from_cli, app.migrations[0].bytes


def drop(app, first: int, last: int, device: str) -> None:
    """What dropping layers first..last on `device` does: their tile says it is moving, and the
    App sends the move to the engine."""
    from vramancer.widgets.placement import BlockTile

    panel = app.placement_panel
    tile = next(t for t in panel.query(BlockTile) if t.is_layers and int(t.first) <= first and last <= int(t.last))
    tile.select(first, last)
    if not panel.request_move(tile, device):
        raise RuntimeError(f"the dashboard refused to move L{first}–{last} to {device}")


def measure_cli_moves(block: tuple[int, int, str, str], moves: int) -> list[float]:
    """Milliseconds of each move of the same block by `vramancer generate --migrate`."""
    first, last, home, away = block
    schedule = [f"--migrate={first}-{last}:{away if i % 2 == 0 else home}@{3 * i + 2}" for i in range(moves)]
    run = subprocess.run([sys.executable, "-m", "vramancer", "generate", "--devices", MOVE_DEVICES, "--context", "2048",
                          "--weights", MOVE_WEIGHTS, "--prompt", PROMPT, "--max-new-tokens", str(3 * moves + 8), *schedule],
                         capture_output=True, text=True, timeout=600)
    found = [float(ms) for ms in re.findall(r"\[migrated .*? in ([0-9.]+) ms", run.stderr)]
    if run.returncode != 0 or len(found) != moves:
        raise RuntimeError(f"vramancer generate --migrate gave {len(found)} of {moves} moves "
                           f"(exit status {run.returncode}): {run.stderr[-500:]}")
    return found


def bench(presses: int = 60, idle_s: float = 10.0, moves: int = 12) -> Result:
    from vramancer.config.units import format_bytes

    runs = {}
    for columns, rows in TERMINALS:
        say(f"dashboard: start, {idle_s:.0f} s idle and quit in a {columns}x{rows} terminal")
        runs[columns, rows] = run = session(["--devices", DEVICES], (columns, rows), idle_s)
        say(f"dashboard: {columns}x{rows}: first frame {run['first_frame_s']:.2f} s, loaded {run['loaded_s']:.1f} s, "
            f"idle CPU {run['idle_cpu_pct']:.2f} %, quit {run['quit_s']:.2f} s (exit status {run['exit_status']})")
    out = asyncio.run(measure(presses, idle_s))
    lat = out["latencies_ms"]
    say(f"dashboard: key → screen with {SERVED_STREAMS} synthetic server streams at {SERVED_RATE:.0f} tok/s each")
    served = asyncio.run(measure_serving(presses, SERVED_STREAMS, SERVED_RATE))
    served_lat = served["latencies_ms"]
    say(f"dashboard: key → screen while its server (--serve) answers {SERVED_STREAMS} streaming HTTP clients")
    real = asyncio.run(measure_served_model(presses, SERVED_STREAMS))
    real_lat = real["latencies_ms"]
    say(f"dashboard: {moves} moves of a 108 MiB block from the dashboard and from the CLI, in {MOVE_ROUNDS} rounds")
    block, dashboard_moves, cli_moves, copied = asyncio.run(measure_moves(moves, MOVE_ROUNDS))
    say(f"dashboard: move ms from the dashboard {_brief(dashboard_moves)}, from the CLI {_brief(cli_moves)}")
    small, large = (runs[size] for size in TERMINALS)
    result = Result(
        "dashboard", "Dashboard: key → screen while streaming (Textual Pilot), start, idle CPU and quit (real terminal)",
        {"presses": len(lat), "terminal": f"{SIZE[0]}x{SIZE[1]}", "devices": DEVICES, "idle window": f"{idle_s:.0f} s"},
        {"p50": ("key → screen p50, ms", 1), "p95": ("key → screen p95, ms", 1), "max": ("max, ms", 1),
         "first_frame_s": ("first frame, s", 2), "quit_s": ("ctrl+q → shell, s", 2),
         "idle_small": (f"idle CPU {TERMINALS[0][0]}x{TERMINALS[0][1]}, % of a core", 2),
         "idle_large": (f"idle CPU {TERMINALS[1][0]}x{TERMINALS[1][1]}, % of a core", 2),
         "served_p95": (f"key → screen p95 with {SERVED_STREAMS} server streams, ms", 1),
         "real_served_p95": (f"key → screen p95 serving {SERVED_STREAMS} HTTP clients (--serve), ms", 1),
         "move_ms": ("108 MiB move, ms", 1)},
    )
    result.contenders["VRAMancer dashboard"] = {
        "p50": _one(percentile(lat, 50)), "p95": _one(percentile(lat, 95)), "max": _one(max(lat)),
        "first_frame_s": _many([r["first_frame_s"] for r in runs.values()]),
        "quit_s": _many([r["quit_s"] for r in runs.values()]),
        "idle_small": _one(small["idle_cpu_pct"]), "idle_large": _one(large["idle_cpu_pct"]),
        "served_p95": _one(percentile(served_lat, 95)), "move_ms": _many(dashboard_moves),
        "real_served_p95": _one(percentile(real_lat, 95)),
    }
    result.contenders["vramancer generate --migrate"] = {"move_ms": _many(cli_moves)}
    result.contenders["VRAMancer dashboard"]["latencies_ms"] = {"samples": lat}
    result.comparisons += [
        compare("key → screen p95, ms (absolute)", percentile(lat, 95), at_most=50),
        compare(f"key → screen p95 with {SERVED_STREAMS} server streams, ms (absolute)",
                percentile(served_lat, 95), at_most=50),
        compare(f"key → screen p95 serving {SERVED_STREAMS} HTTP clients (--serve), ms (absolute)",
                percentile(real_lat, 95), at_most=50),
        compare("first frame, s (absolute, slowest terminal)", max(r["first_frame_s"] for r in runs.values()), at_most=1),
        compare("ctrl+q → shell, s (absolute, slowest terminal)", max(r["quit_s"] for r in runs.values()), at_most=0.5),
        compare("idle CPU, % of one core (absolute, largest of the sizes)",
                max(r["idle_cpu_pct"] for r in runs.values()), at_most=2),
    ]
    result.comparisons.append(compare("108 MiB move from the dashboard ÷ from the CLI, ms (median)",
                                      _median(dashboard_moves) / _median(cli_moves), at_most=1.25))
    first, last, home, away = block
    result.notes.append(f"moves: L{first}–{last} {home} ⇄ {away} ({MOVE_DEVICES}) while an answer streams, "
                        f"{len(dashboard_moves)} from the App (telemetry on) and {len(cli_moves)} from `vramancer generate --migrate`, "
                        f"in {MOVE_ROUNDS} alternating rounds, {MOVE_WEIGHTS} weights; each copies {format_bytes(copied)} "
                        f"(the block's weights and the KV cache filled so far)")
    if not out["still_streaming"]:
        result.notes.append("the answer finished before the last press: some presses were not measured during streaming")
    result.notes.append(f"server streams: {SERVED_STREAMS} synthetic requests at {SERVED_RATE:.0f} tok/s each "
                        f"({served['tokens_per_s']:.0f} tokens/s reached the App) sent through its emit with no model "
                        f"loaded; key → screen p50 {percentile(served_lat, 50):.1f} ms, max {max(served_lat):.1f} ms")
    result.notes.append(f"--serve: {SERVED_STREAMS} HTTP clients streaming chat completions from the bundled model "
                        f"({real['chunks_per_s']:.0f} chunks/s reached them); key → screen p50 "
                        f"{percentile(real_lat, 50):.1f} ms, max {max(real_lat):.1f} ms")
    result.notes.append(f"{out['chars_streamed_while_pressing']} characters of answer streamed during the "
                        f"{out['pressing_s']:.1f} s of presses")
    return result


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _brief(values: list[float]) -> str:
    return f"median {_median(values):.1f} ({', '.join(f'{v:.1f}' for v in values)})"


def _one(value: float) -> dict:
    return {"median": value, "min": value, "max": value, "n": 1, "samples": [value]}


def _many(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"median": ordered[len(ordered) // 2], "min": ordered[0], "max": ordered[-1], "n": len(values), "samples": values}


if __name__ == "__main__":
    cli(bench, __doc__, [("--presses", int, 60), ("--idle-s", float, 10.0), ("--moves", int, 12)])
