"""`vramancer serve` stops gracefully on a signal: new requests get 503 shutting_down, running
answers finish up to --drain-seconds, the rest end with a last chunk and [DONE] (streams) or
the 503 (whole answers), and nothing prints a traceback."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
DRAIN_S = 2.0


def _wait_for(find, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = find()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {timeout} s")


class Stream(threading.Thread):
    """One streamed completion read on a thread: its chunks, and whether [DONE] came."""

    def __init__(self, url: str, model: str, max_tokens: int):
        super().__init__(daemon=True)
        self.url, self.model, self.max_tokens = url, model, max_tokens
        self.chunks: list[dict] = []
        self.done = False
        self.error: BaseException | None = None

    def run(self) -> None:
        body = {"model": self.model, "prompt": "Once upon a time", "max_tokens": self.max_tokens, "stream": True}
        try:
            with httpx.stream("POST", f"{self.url}/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: "):
                        self.chunks.append(json.loads(line[6:]))
        except BaseException as exc:  # handed to the test
            self.error = exc

    def tokens(self) -> int:
        return sum(1 for c in self.chunks if c.get("choices") and c["choices"][0].get("text"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_signal_drains_running_answers_and_refuses_new_ones(tiny_model_dir, signum):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "vramancer", "serve", "--model", tiny_model_dir,
                                "--devices", "sim:2x1GiB", "--port", "0", "--context", "4096",
                                "--drain-seconds", str(DRAIN_S)],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=_takes_sigint)
    try:
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True).start()
        line = _wait_for(lambda: next((l for l in lines if "serving" in l), None), 120, "ready line")
        url, model = line.split(" on ", 1)[1].split()[0], line.split()[2]
        long = Stream(url, model, 1200)  # outlasts the drain
        short = Stream(url, model, 40)  # finishes within it
        whole: dict = {}
        whole_thread = threading.Thread(target=lambda: whole.update(response=httpx.post(
            f"{url}/completions", json={"model": model, "prompt": "Hello", "max_tokens": 1200}, timeout=60)),
            daemon=True)
        long.start()
        whole_thread.start()
        _wait_for(lambda: long.tokens() > 0, 60, "first streamed token")
        short.start()
        _wait_for(lambda: short.tokens() > 0, 60, "the short stream's first token")
        process.send_signal(signum)
        sent = time.monotonic()
        late = _wait_for(lambda: _try_post(url, model), 10, "an answer to a request sent while draining")
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        assert process.wait(timeout=DRAIN_S + 5) == 0
        took = time.monotonic() - sent
        for thread in (long, short, whole_thread):
            thread.join(5)
        assert short.error is None and short.done and short.tokens() == 40  # it finished, whole
        assert short.chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert long.error is None and long.done and 0 < long.tokens() < 1200  # cut at the deadline...
        assert long.chunks[-1]["choices"][0]["finish_reason"] == "length"  # ...with a last chunk saying so
        response = whole["response"]
        assert response.status_code == 503 and response.json()["error"]["code"] == "shutting_down"
        assert DRAIN_S - 0.5 < took < DRAIN_S + 2.5
        err = process.stderr.read()
        assert "Traceback" not in err and "Exception in ASGI" not in err and "timeout graceful" not in err, err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _takes_sigint() -> None:
    """In the server's process before it starts: SIGINT at its default, as a terminal's
    foreground job has it. A suite run as a background job (`make test &`) hands its children
    SIGINT ignored, which the server rightly keeps (as under `nohup`)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _try_post(url: str, model: str):
    try:
        response = httpx.post(f"{url}/completions", json={"model": model, "prompt": "Hi", "max_tokens": 2}, timeout=5)
    except httpx.HTTPError:
        return None
    return response if response.status_code == 503 else None
