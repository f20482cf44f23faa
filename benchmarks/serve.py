"""The OpenAI-compatible server under load: `vramancer serve` on the bundled model split over
`sim:2x1GiB`, with 1, 4 and 8 streaming clients at once, against `vramancer generate`'s own
decode speed on the same prompt and, where a llama-cpp-python is found, llama.cpp's server on
the same GGUF.

Each server is a process of its own on 127.0.0.1; the clients are threads here, speaking raw
HTTP (server-sent events) so the client's own cost stays small. Per round and client count:
aggregate decode tok/s = tokens after each answer's first / (latest last token - earliest first
token), TTFT from sending the request to the first text. Also the round trip of a non-streamed
1-token completion (a short prompt), the server's overhead per request, and two of issue #31's
scheduling targets: a 5-token request's first token with a ~1,600-token prompt answering beside
it (against the same request alone; target <= 2x), and the first token of a request sharing a
~300-token system prompt with the one before it (against that one's; target <= 0.3x).

Both servers run the GGUF at its own width (`--weights auto`: the bundled file is Q4_1) on the
same number of threads (`--threads`, 2 by default). The anchor is llama.cpp's own `llama-server`
with 8 slots (`-np 8`, continuous batching, each slot the same context as ours) where `make
anchors` built it (benchmarks/llama_cpp.py); otherwise its rows are skipped and the notes say so.

    python -m benchmarks.serve [--rounds 2] [--tokens 64] [--threads 2] [--weights auto]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks import llama_cpp
from benchmarks.common import PROMPT, Result, alternate, cli, compare

DEVICES = "sim:2x1GiB"
CONTEXT = 2048
CLIENTS = (1, 4, 8)
ROUND_TRIPS = 20  # 1-token completions per round
SLOTS = 8  # llama-server's parallel slots: as many as our --max-batch
REPO = Path(__file__).resolve().parent.parent
BESIDE = "VRAMancer server, a short request beside a long prompt"
SHARED = "VRAMancer server, two requests sharing a system prompt"
GENERATE = "`vramancer generate` (engine.generate, same prompt and split)"
MESSAGES = [{"role": "user", "content": PROMPT}]
SHORT = [{"role": "user", "content": "Hi"}]  # a few tokens with the chat template around it
SHORT_TOKENS = 5
LONG = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 160}]  # ~1,600 tokens
SYSTEM = "You are a careful assistant who answers in plain words. " * 27  # ~300 tokens


class ServerProcess:
    """A server started as a process; `url` once it answers /health (or /v1/models) with 200."""

    def __init__(self, name: str, argv: list[str], port: int, env: dict | None = None) -> None:
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        env={**os.environ, **(env or {})})
        self.model = ""

    def wait_ready(self, timeout: float = 300.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.process.stderr.read().decode()[-2000:]}")
            try:
                models = httpx.get(f"{self.url}/v1/models", timeout=5)
                if models.status_code == 200:
                    self.model = models.json()["data"][0]["id"]
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not answer within {timeout:g} s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_once(server: ServerProcess, tokens: int, messages: list[dict] = MESSAGES,
                first: threading.Event | None = None) -> dict:
    """One streamed chat completion: send time, each text chunk's arrival, tokens reported
    (`first` is set when its first text arrives)."""
    import httpx

    body = {"model": server.model, "messages": messages, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    times: list[float] = []
    usage = None
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=600) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{server.name}: {response.status_code} {response.read()[:300]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
                if first is not None:
                    first.set()
    return {"sent": sent, "times": times, "tokens": usage if usage is not None else len(times)}


def concurrent_run(server: ServerProcess, clients: int, tokens: int):
    def run() -> dict:
        results: list[dict] = [{}] * clients
        errors: list[Exception] = []

        def client(i: int) -> None:
            try:
                results[i] = stream_once(server, tokens)
            except Exception as exc:  # the round fails loudly below, not silently in a thread
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        first = min(r["times"][0] for r in results)
        last = max(r["times"][-1] for r in results)
        after_first = sum(r["tokens"] - 1 for r in results)
        ttfts = sorted((r["times"][0] - r["sent"]) * 1000 for r in results)
        return {"tok_s": after_first / (last - first), "ttft_p50": statistics.median(ttfts),
                "ttft_p95": _percentile(ttfts, 0.95)}

    return run


def _ttft_ms(server: ServerProcess, messages: list[dict], tokens: int = SHORT_TOKENS) -> float:
    answer = stream_once(server, tokens, messages)
    return (answer["times"][0] - answer["sent"]) * 1000


def long_beside(server: ServerProcess, tokens: int):
    """A short request alone, then the same while a ~1,600-token prompt is answered beside it
    (sent once the long one streams): both first tokens."""
    def run() -> dict:
        alone = _ttft_ms(server, SHORT)
        streaming = threading.Event()
        long = threading.Thread(target=stream_once, args=(server, tokens, LONG, streaming))
        long.start()
        streaming.wait(600)
        beside = _ttft_ms(server, SHORT)
        long.join()
        return {"short_alone_ms": alone, "short_beside_ms": beside}

    return run


def shared_prefix(server: ServerProcess):
    """Two requests with the same ~300-token system prompt, one after the other (a fresh
    question each round, so only the system prompt is shared): both first tokens. Each round's
    system prompt starts with its number, so the first request of a round shares nothing with
    the rounds before it (the server keeps prefixes)."""
    rounds = iter(range(1_000_000))

    def run() -> dict:
        n = next(rounds)
        system = f"Session {n}. {SYSTEM}"
        ask = lambda question: [{"role": "system", "content": system}, {"role": "user", "content": question}]
        first = _ttft_ms(server, ask(f"Round {n}: name a colour."))
        second = _ttft_ms(server, ask(f"Round {n}: name a fruit."))
        return {"first_ms": first, "second_ms": second}

    return run


def round_trips(server: ServerProcess):
    import httpx

    def run() -> dict:
        times = []
        with httpx.Client(timeout=60) as http:
            for _ in range(ROUND_TRIPS):
                start = time.perf_counter()
                answer = http.post(f"{server.url}/v1/completions",
                                   json={"model": server.model, "prompt": "Hi", "max_tokens": 1, "temperature": 0})
                times.append((time.perf_counter() - start) * 1000)
                if answer.status_code != 200:
                    raise RuntimeError(f"{server.name}: {answer.status_code} {answer.text[:300]}")
        return {"rt_ms": statistics.median(times)}

    return run


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile: with few samples, a value that was really measured."""
    index = max(0, min(len(sorted_values) - 1, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


def generate_speed(tokens: int, threads: int, weights: str):
    """`vramancer generate`'s decode tok/s on the same prompt and split (its engine.generate,
    timed by `vramancer bench`: a load, a warm-up, then one answer), as a contender taking its
    turn between the servers' rounds, so a busy machine weighs on both sides alike."""
    def run() -> dict:
        done = subprocess.run([sys.executable, "-m", "vramancer", "bench", "--devices", DEVICES, "--context",
                               str(CONTEXT), "--prompt", PROMPT, "--max-new-tokens", str(tokens), "--rounds", "1",
                               "--json", "--weights", weights, "--threads", str(threads)],
                              cwd=REPO, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"vramancer bench failed: {done.stderr[-1000:]}")
        return {"tok_s": json.loads(done.stdout)["decode_tokens_per_s"][0]}

    return run


def bench(rounds: int = 2, tokens: int = 64, threads: int = 2, weights: str = "auto") -> Result:
    from vramancer.model.source import bundled_model_path

    result = Result(
        "serve", "The OpenAI-compatible server: concurrent streaming clients (bundled SmolLM2-135M, greedy)",
        {"rounds": rounds, "new tokens per answer": tokens, "devices": DEVICES, "context": CONTEXT,
         "threads": threads, "weights": weights, "1-token round trips per round": ROUND_TRIPS},
        {"tok_s": ("aggregate decode tok/s", 1), "ttft_p50": ("TTFT p50 ms", 0), "ttft_p95": ("TTFT p95 ms", 0),
         "rt_ms": ("1-token completion round trip p50 ms", 1), "short_alone_ms": ("5-token TTFT alone ms", 0),
         "short_beside_ms": ("5-token TTFT beside a 1,600-token prompt ms", 0),
         "first_ms": ("TTFT, first of a shared system prompt ms", 0),
         "second_ms": ("TTFT, second sharing it ms", 0)},
    )
    servers = [ServerProcess("VRAMancer", [sys.executable, "-m", "vramancer", "serve", "--devices", DEVICES,
                                           "--context", str(CONTEXT), "--port", str(port := free_port()),
                                           "--max-batch", str(SLOTS), "--weights", weights, "--threads",
                                           str(threads)], port)]
    llama_server = llama_cpp.tool("llama-server")
    if llama_server:
        llama_port = free_port()
        servers.append(ServerProcess("llama.cpp", [str(llama_server), "--model", str(bundled_model_path()),
                                                   "--host", "127.0.0.1", "--port", str(llama_port),
                                                   "--parallel", str(SLOTS), "--ctx-size", str(CONTEXT * SLOTS),
                                                   "--threads", str(threads), "--threads-batch", str(threads)],
                                     llama_port))
    else:
        result.notes.append(llama_cpp.missing("llama.cpp's llama-server"))
    try:
        for server in servers:
            server.wait_ready()
        contenders = {}
        for server in servers:
            for clients in CLIENTS:
                contenders[f"{server.name} server, {clients} streaming client{'s' if clients > 1 else ''}"] = \
                    concurrent_run(server, clients, tokens)
            contenders[f"{server.name} server, non-streamed 1-token completions"] = round_trips(server)
        contenders[BESIDE] = long_beside(servers[0], tokens)
        contenders[SHARED] = shared_prefix(servers[0])
        contenders[GENERATE] = generate_speed(tokens, threads, weights)
        samples = alternate(contenders, rounds)
    finally:
        for server in servers:
            server.stop()
    result.add(samples)
    one, eight = "VRAMancer server, 1 streaming client", "VRAMancer server, 8 streaming clients"
    result.ratio("8 clients ÷ 1 client, aggregate decode tok/s", eight, one, "tok_s", True, at_least=6.0)
    beside = result.contenders[BESIDE]
    result.comparisons.append(compare("a 5-token request's first token beside a 1,600-token prompt ÷ alone",
                                      beside["short_beside_ms"]["median"] / beside["short_alone_ms"]["median"],
                                      at_most=2.0))
    shared = result.contenders[SHARED]
    result.comparisons.append(compare("second request sharing a 300-token system prompt, first token ÷ the first's",
                                      shared["second_ms"]["median"] / shared["first_ms"]["median"], at_most=0.3))
    result.ratio("1 client ÷ `vramancer generate`, decode tok/s", one, GENERATE, "tok_s", True, at_least=0.95)
    if llama_server:
        for clients in CLIENTS:
            s = "s" if clients > 1 else ""
            result.ratio(f"VRAMancer ÷ llama.cpp, {clients} client{s}, aggregate decode tok/s",
                         f"VRAMancer server, {clients} streaming client{s}",
                         f"llama.cpp server, {clients} streaming client{s}", "tok_s", True)
    return result


if __name__ == "__main__":
    cli(bench, __doc__, [("--rounds", int, 2), ("--tokens", int, 64), ("--threads", int, 2), ("--weights", str, "auto")])
