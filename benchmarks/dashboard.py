"""Dashboard responsiveness, driven through Textual's Pilot with the bundled model streaming.

- key → screen: while an answer streams (the model decoding on the engine's thread), type into
  the prompt — a character, then backspace, and so on. For each press, the time from handing
  the key event to the App (as the terminal driver does) to the first screen update that shows
  the prompt's new text. The App runs headless,
  where Textual composes each update but writes nothing; the benchmark renders every update
  to terminal output itself (and throws it away), so that cost is counted too.
- idle CPU: the loaded App with telemetry on (2 Hz) and nothing to do, as a share of one core
  (process CPU time over wall time, every thread of the process).

The App runs in this process with torch's default thread count (every core), so decoding
competes with the UI harder than under `vramancer`, whose `--threads` leaves a core free.

    python -m benchmarks.dashboard [--presses 60] [--idle-s 10]
"""

from __future__ import annotations

import asyncio
import time

from benchmarks.common import PROMPT, Result, cli, compare, say

DEVICES = "auto"  # what `make run` opens: on a CPU-only machine, a simulated pool of two
SIZE = (120, 40)
GAPS = (0.03, 0.05, 0.08, 0.12)  # pauses between presses, cycled: presses land at every phase of a decode step
WARMUP_PRESSES = 6
TIMEOUT = 120.0


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


async def measure(presses: int, idle_s: float) -> dict:
    from textual._compositor import CompositorUpdate

    from vramancer.app import VramancerApp
    from vramancer.engine.engine import LoadOptions

    app = VramancerApp(LoadOptions("default", DEVICES, "proportional", 2048, "auto"), telemetry=True,
                       sampling={"max_new_tokens": 1500})
    shown: list[tuple[float, str]] = []  # (when, the prompt's text in that update)

    async with app.run_test(size=SIZE) as pilot:
        console = app.console_panel
        prompt = console.prompt
        display = app._display

        def display_and_render(screen, renderable) -> None:
            display(screen, renderable)
            if renderable is None:
                return
            if isinstance(renderable, CompositorUpdate):
                renderable.render_segments(app.console)  # what a real terminal's driver would be sent
            shown.append((time.perf_counter(), prompt.value))

        app._display = display_and_render
        say("dashboard: loading the bundled model")
        await _until(lambda: app.plan is not None and console.ready, "the model to load", step=0.05)
        await asyncio.sleep(2.0)  # the first telemetry readings and layout settle

        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(idle_s)
        idle_cpu = (time.process_time() - cpu0) / (time.perf_counter() - wall0) * 100
        say(f"dashboard: idle CPU {idle_cpu:.2f} % of one core over {idle_s:.0f} s")

        prompt.focus()
        await pilot.press(*PROMPT, "enter")
        await _until(lambda: len(console.answer_text) > 20, "the answer to stream", step=0.01)
        streamed_from, pressing_from = len(console.answer_text), time.perf_counter()
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
        still_streaming = console.generating
        streamed = len(console.answer_text) - streamed_from
        pressing_s = time.perf_counter() - pressing_from
        await pilot.press("escape")
        await _until(lambda: not console.generating, "the answer to stop", step=0.01)
        app._display = display
    return {"latencies_ms": latencies, "idle_cpu_pct": idle_cpu, "still_streaming": still_streaming,
            "chars_streamed_while_pressing": streamed, "pressing_s": pressing_s}


def bench(presses: int = 60, idle_s: float = 10.0) -> Result:
    out = asyncio.run(measure(presses, idle_s))
    lat = out["latencies_ms"]
    result = Result(
        "dashboard", "Dashboard responsiveness (Textual Pilot, bundled model streaming)",
        {"presses": len(lat), "terminal": f"{SIZE[0]}x{SIZE[1]}", "devices": DEVICES, "idle window": f"{idle_s:.0f} s"},
        {"p50": ("key → screen p50, ms", 1), "p95": ("key → screen p95, ms", 1), "max": ("max, ms", 1),
         "idle_cpu_pct": ("idle CPU, % of a core", 2)},
    )
    result.contenders["VRAMancer dashboard"] = {
        "p50": _one(percentile(lat, 50)), "p95": _one(percentile(lat, 95)), "max": _one(max(lat)),
        "idle_cpu_pct": _one(out["idle_cpu_pct"]),
    }
    result.contenders["VRAMancer dashboard"]["latencies_ms"] = {"samples": lat}
    result.comparisons += [compare("key → screen p95, ms (absolute)", percentile(lat, 95), at_most=50),
                           compare("idle CPU, % of one core (absolute)", out["idle_cpu_pct"], at_most=3)]
    if not out["still_streaming"]:
        result.notes.append("the answer finished before the last press: some presses were not measured during streaming")
    result.notes.append(f"{out['chars_streamed_while_pressing']} characters of answer streamed during the "
                        f"{out['pressing_s']:.1f} s of presses")
    return result


def _one(value: float) -> dict:
    return {"median": value, "min": value, "max": value, "n": 1, "samples": [value]}


if __name__ == "__main__":
    cli(bench, __doc__, [("--presses", int, 60), ("--idle-s", float, 10.0)])
