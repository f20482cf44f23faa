"""The OpenAI-compatible server, spoken to as its users do: OpenAI's own Python client for
answers, raw HTTP for the error cases, Prometheus' parser for /metrics, and `vramancer serve`
in a process of its own for the command line and its signals. Everything on 127.0.0.1."""

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
from prometheus_client.parser import text_string_to_metric_families

from vramancer.config.options import LoadOptions
from vramancer.engine import events as ev

REPO = pathlib.Path(__file__).resolve().parents[2]
DEVICES = "sim:2x1GiB"
CONTEXT = 1024
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def wait_for(condition, timeout: float = 60.0, what: str = "the condition"):
    """Poll `condition` until it is truthy (its value is returned) or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what} did not happen within {timeout:g} s")


class Served:
    """A worker with the tiny model and two servers on its events: one open, one with a key."""

    KEY = "sesame-0123456789"

    def __init__(self, model_dir: str, max_batch: int = 8, max_waiting: int = 64) -> None:
        from vramancer.engine.worker import EngineWorker
        from vramancer.server.service import InferenceServer

        self.open = InferenceServer()
        self.keyed = InferenceServer(api_key=self.KEY.encode())
        self.events: list[ev.Event] = []

        def emit(event: ev.Event) -> None:  # the fan-out the dashboard does too
            self.events.append(event)
            self.open.on_event(event)
            self.keyed.on_event(event)

        self.worker = EngineWorker(emit, telemetry_hz=5.0, max_batch=max_batch, max_waiting=max_waiting)
        for server in (self.open, self.keyed):
            server.submit = self.worker.submit
            server.start("127.0.0.1", 0)
        self.url = self.open.url
        self.health_before_load = httpx.get(f"http://127.0.0.1:{self.open.port}/health")
        self.worker.start()
        self.worker.submit(ev.Load(LoadOptions(model_dir, DEVICES, context=CONTEXT)))
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{self.open.port}/health").status_code == 200,
                 what="the model loading")
        self.model = self.open.bridge.model.name

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.open.port}{path}", timeout=60, **kwargs)

    def post(self, path: str, port: int | None = None, **kwargs) -> httpx.Response:
        return httpx.post(f"http://127.0.0.1:{port or self.open.port}{path}", timeout=60, **kwargs)

    def metrics(self) -> dict:
        """{(name, frozenset(labels)): value} of every sample /metrics shows."""
        text = self.get("/metrics").text
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def close(self) -> None:
        self.open.stop()
        self.keyed.stop()
        self.worker.shutdown()


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    s = Served(tiny_model_dir)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(served):
    import openai

    return openai.OpenAI(base_url=served.url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from vramancer.engine import Engine

    engine = Engine.load(tiny_model_dir, DEVICES, context=CONTEXT)
    yield engine
    engine.close()


# --- the bridge: worker threads -> the server's loop ------------------------------------------


def test_the_bridge_hands_a_requests_events_from_a_worker_thread_to_its_queue_in_order():
    import asyncio

    from vramancer.server.bridge import Bridge
    from vramancer.server.metrics import ServerMetrics

    metrics = ServerMetrics()
    bridge = Bridge(metrics)

    async def scenario() -> list:
        mine = bridge.open("chatcmpl-1")
        pieces = [ev.RequestQueued("chatcmpl-1", "127.0.0.1:1", "hi", 3, 5), ev.RequestStarted("chatcmpl-1")]
        pieces += [ev.Token(t, "chatcmpl-1") for t in ("a", "b", "c")]
        pieces += [ev.Token("not ours", 7), ev.Token("unknown", "chatcmpl-2")]  # the console's, another's
        pieces.append(ev.GenerationDone("chatcmpl-1", "abc", (1, 2, 3), 3, 3, 0.1, 10.0, False, "length", 0.3))
        worker = threading.Thread(target=lambda: [bridge.on_event(e) for e in pieces])
        worker.start()
        got = [(await asyncio.wait_for(mine.next(), 10))[1] for _ in range(6)]
        worker.join()
        return got

    got = asyncio.run(scenario())
    assert [type(e).__name__ for e in got] == ["RequestQueued", "RequestStarted", "Token", "Token", "Token",
                                              "GenerationDone"]
    assert "".join(e.text for e in got if isinstance(e, ev.Token)) == "abc"
    assert bridge.open_requests == 0  # answered: forgotten
    text = metrics.text().decode()
    assert 'vramancer_requests_total{outcome="length"} 1.0' in text
    assert "vramancer_generated_tokens_total 3.0" in text
    assert "vramancer_inter_token_latency_seconds_count 2.0" in text


def test_a_request_whose_client_left_is_still_counted_when_the_engine_lets_it_go():
    import asyncio

    from vramancer.server.bridge import Bridge
    from vramancer.server.metrics import ServerMetrics

    metrics = ServerMetrics()
    bridge = Bridge(metrics)

    async def open_and_leave() -> None:
        bridge.open("cmpl-9")  # the handler then goes away without reading

    asyncio.run(open_and_leave())  # its loop is closed too: nothing may be raised at it
    bridge.on_event(ev.Token("x", "cmpl-9"))
    bridge.on_event(ev.GenerationDone("cmpl-9", "x", (1,), 2, 1, 0.1, None, True, "cancelled", 0.2))
    assert 'vramancer_requests_total{outcome="cancelled"} 1.0' in metrics.text().decode()


def test_a_submit_the_worker_could_not_take_fails_the_requests_still_unanswered():
    import asyncio

    from vramancer.server.bridge import Bridge
    from vramancer.server.metrics import ServerMetrics

    bridge = Bridge(ServerMetrics())

    async def scenario():
        answered, unanswered = bridge.open("a"), bridge.open("b")
        bridge.on_event(ev.RequestQueued("a", "", "", 1, 1))
        bridge.on_event(ev.Error("Submit", "Submit failed: something broke."))
        return (await asyncio.wait_for(unanswered.next(), 10))[1], answered.queue.qsize()

    error, answered_count = asyncio.run(scenario())
    assert isinstance(error, ev.Error) and answered_count == 1 and bridge.open_requests == 1


# --- answers ---------------------------------------------------------------------------------


def test_health_answers_503_while_loading_then_200(served):
    assert served.health_before_load.status_code == 503
    assert served.health_before_load.json()["status"] == "loading"
    answer = served.get("/health")
    assert answer.status_code == 200 and answer.json()["model"] == served.model


def test_models_lists_the_loaded_model(client, served):
    models = client.models.list()
    assert [m.id for m in models.data] == [served.model]
    assert models.data[0].object == "model"


def test_a_chat_answer_is_engine_generates_greedy_text(client, served, engine):
    expected = engine.generate(CHAT, max_new_tokens=24)
    answer = client.chat.completions.create(model=served.model, messages=CHAT, max_tokens=24, temperature=0)
    assert answer.id.startswith("chatcmpl-") and answer.object == "chat.completion"
    assert answer.model == served.model and abs(answer.created - time.time()) < 120
    choice = answer.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == "length"
    assert answer.usage.prompt_tokens == expected.prompt_tokens
    assert answer.usage.completion_tokens == 24
    assert answer.usage.total_tokens == expected.prompt_tokens + 24


def test_a_streamed_chat_answer_is_the_same_text_with_usage_last(client, served, engine):
    expected = engine.generate(CHAT, max_new_tokens=16)
    chunks = list(client.chat.completions.create(model=served.model, messages=CHAT, max_tokens=16, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == expected.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_the_short_id_names_the_model_too(client, served):
    from vramancer.server.bridge import short_id

    answer = client.chat.completions.create(model=short_id(served.model).upper(), messages=CHAT, max_tokens=2)
    assert answer.choices[0].message.content is not None and answer.model == served.model


def test_a_raw_completion_continues_the_prompt_as_generate_raw_does(client, served, engine):
    prompt = "Once upon a time"
    expected = engine.generate(prompt, raw=True, max_new_tokens=12)
    answer = client.completions.create(model=served.model, prompt=prompt, max_tokens=12, temperature=0)
    assert answer.id.startswith("cmpl-") and answer.object == "text_completion"
    assert answer.choices[0].text == expected.text
    streamed = list(client.completions.create(model=served.model, prompt=prompt, max_tokens=12, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected.text
    assert streamed[-1].choices[0].finish_reason == "length"


def test_a_stop_string_ends_the_answer_before_it(client, served, engine):
    full = engine.generate(CHAT, max_new_tokens=24).text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip(), "the tiny model's answer has text to stop at"
    answer = client.chat.completions.create(model=served.model, messages=CHAT, max_tokens=24, stop=stop)
    assert answer.choices[0].message.content == full[:full.index(stop)]
    assert answer.choices[0].finish_reason == "stop"


# --- errors ---------------------------------------------------------------------------------


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"].endswith(".")
    return error


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": CHAT, "max_tokens": -1}, "max_tokens"),
    ({"messages": CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": CHAT, "temperature": 2.5}, "temperature"),
    ({"messages": CHAT, "top_p": 0}, "top_p"),
    ({"messages": CHAT, "seed": -3}, "seed"),
    ({"messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": CHAT, "stream": "yes"}, "stream"),
])
def test_a_bad_value_is_400_naming_it(served, body, param):
    error = _error(served.post("/v1/chat/completions", json={"model": served.model, **body}), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_malformed_json_is_400(served):
    response = served.post("/v1/chat/completions", content=b'{"model": "x", "messages": [',
                           headers={"content-type": "application/json"})
    assert "not valid JSON" in _error(response, 400)["message"]


def test_an_unknown_model_is_404(served):
    error = _error(served.post("/v1/chat/completions", json={"model": "gpt-9", "messages": CHAT}), 404)
    assert error["code"] == "model_not_found" and served.model in error["message"]


def test_a_body_over_one_mib_is_413_by_its_length_and_while_read(served):
    big = json.dumps({"model": served.model, "messages": [{"role": "user", "content": "x" * (1 << 20)}]}).encode()
    _error(served.post("/v1/chat/completions", content=big), 413)

    def chunks():  # no Content-Length: the body is counted as it arrives
        for start in range(0, len(big), 65536):
            yield big[start:start + 65536]

    _error(served.post("/v1/chat/completions", content=chunks()), 413)


def test_a_missing_or_wrong_key_is_401_only_where_a_key_was_given(served):
    body = {"model": served.model, "messages": CHAT, "max_tokens": 1}
    port = served.keyed.port
    assert _error(served.post("/v1/chat/completions", port=port, json=body), 401)["code"] == "invalid_api_key"
    wrong = {"Authorization": "Bearer sesame-0123456788"}
    _error(served.post("/v1/chat/completions", port=port, json=body, headers=wrong), 401)
    right = {"Authorization": f"Bearer {Served.KEY}"}
    assert served.post("/v1/chat/completions", port=port, json=body, headers=right).status_code == 200
    assert served.post("/v1/chat/completions", json=body).status_code == 200  # the open server


def test_a_prompt_too_long_for_the_context_is_400_with_the_numbers(served):
    body = {"model": served.model, "messages": CHAT, "max_tokens": CONTEXT + 10}
    error = _error(served.post("/v1/chat/completions", json=body), 400)
    assert error["code"] == "context_length_exceeded"
    assert str(CONTEXT) in error["message"] and str(CONTEXT + 10) in error["message"]


def test_a_full_queue_is_429_with_retry_after(tiny_model_dir):
    s = Served(tiny_model_dir, max_batch=1, max_waiting=1)
    body = {"model": s.model, "messages": CHAT, "max_tokens": 900, "stream": True}
    try:
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", f"{s.url}/chat/completions", json=body) as running:
                assert running.status_code == 200
                running_lines = running.iter_lines()  # kept: a dropped iterator closes the connection
                next(running_lines)  # it runs
                with http.stream("POST", f"{s.url}/chat/completions", json=body) as waiting:
                    assert waiting.status_code == 200  # queued behind it
                    waiting_lines = waiting.iter_lines()
                    next(waiting_lines)
                    refused = http.post(f"{s.url}/chat/completions", json=body)
                    error = _error(refused, 429)
                    assert refused.headers["retry-after"] == "1" and error["code"] == "queue_full"
    finally:
        s.close()


def test_a_client_that_leaves_mid_stream_cancels_its_sequence(served):
    def cancelled() -> float:
        return served.metrics().get(("vramancer_requests_total", frozenset({("outcome", "cancelled")})), 0.0)

    before = cancelled()
    body = {"model": served.model, "messages": CHAT, "max_tokens": 900, "stream": True}
    with httpx.stream("POST", f"{served.url}/chat/completions", json=body, timeout=60) as response:
        pieces = 0
        for line in response.iter_lines():
            pieces += line.startswith("data: ")
            if pieces == 4:
                break  # hang up after a few tokens of 900
    wait_for(lambda: cancelled() == before + 1, what="the request counting as cancelled")
    done = wait_for(lambda: [e for e in served.events if isinstance(e, ev.GenerationDone) and e.cancelled
                             and isinstance(e.request_id, str)], what="the sequence leaving")
    assert done[-1].new_tokens < 900 and done[-1].finish_reason == "cancelled"
    wait_for(lambda: served.metrics()[("vramancer_running_sequences", frozenset())] == 0,
             what="the batch emptying")


# --- metrics ---------------------------------------------------------------------------------


def test_metrics_show_devices_links_requests_and_latencies(client, served):
    client.chat.completions.create(model=served.model, messages=CHAT, max_tokens=8)
    wait_for(lambda: ("vramancer_device_memory_bytes",
                      frozenset({("device", "sim0"), ("category", "weights"), ("simulated", "true")}))
             in served.metrics(), what="a device reading")
    m = served.metrics()
    for device in ("sim0", "sim1"):
        weights = m[("vramancer_device_memory_bytes",
                      frozenset({("device", device), ("category", "weights"), ("simulated", "true")}))]
        total = m[("vramancer_device_memory_total_bytes", frozenset({("device", device), ("simulated", "true")}))]
        assert 0 < weights < total
        parts = sum(m[("vramancer_device_memory_bytes",
                       frozenset({("device", device), ("category", c), ("simulated", "true")}))]
                    for c in ("weights", "kv", "reserved", "other", "free"))
        assert parts == total
    links = {dict(labels)["src"] + ">" + dict(labels)["dst"]: value for (name, labels), value in m.items()
             if name == "vramancer_link_bytes_total"}
    assert links and all(v > 0 for v in links.values())
    assert all(dict(labels).get("simulated") == "true" for (name, labels) in m
               if name.startswith(("vramancer_device", "vramancer_link")))
    assert m[("vramancer_requests_total", frozenset({("outcome", "length")}))] >= 1
    assert m[("vramancer_generated_tokens_total", frozenset())] >= 8
    assert m[("vramancer_time_to_first_token_seconds_count", frozenset())] >= 1
    assert m[("vramancer_inter_token_latency_seconds_count", frozenset())] >= 7
    assert m[("vramancer_request_duration_seconds_count", frozenset())] >= 1
    assert ("vramancer_waiting_sequences", frozenset()) in m


# --- the command line --------------------------------------------------------------------------


def _serve(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "vramancer", "serve", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_vramancer_serve_says_where_it_serves_and_stops_on_sigterm_within_a_second(tiny_model_dir):
    process = _serve(["--model", tiny_model_dir, "--devices", DEVICES, "--port", "0", "--context", "256"])
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
        reader.start()
        line = wait_for(lambda: next((l for l in lines if "serving" in l), None), timeout=120,
                        what="the ready line")
        url = line.split(" on ", 1)[1].split()[0]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        answer = httpx.post(f"{url}/completions", json={"model": line.split()[2], "prompt": "Hi", "max_tokens": 3},
                            timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert process.wait(timeout=5) == 0
        assert time.monotonic() - started < 1.5
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("args, words", [
    (["--max-batch", "0"], "--max-batch"),
    (["--port", "70000"], "--port"),
    (["--api-key-file", "/nonexistent/key"], "API key file"),
])
def test_bad_serve_flags_are_one_sentence_and_exit_2(args, words):
    process = _serve(args)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 2 and words in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_busy_port_is_refused_before_loading():
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        process = _serve(["--port", str(port)])
        out, err = process.communicate(timeout=60)
    assert process.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in err
    assert "Traceback" not in err


def test_a_host_beyond_loopback_without_a_key_is_warned_about():
    # 192.0.2.1 (TEST-NET-1) is no address of this machine: warned, then refused, nothing listens.
    process = _serve(["--host", "192.0.2.1", "--port", "0"])
    out, err = process.communicate(timeout=60)
    assert "without --api-key-file" in err and "cannot listen on 192.0.2.1" in err
    assert process.returncode == 2


# --- the dashboard with --serve ----------------------------------------------------------------



@pytest.mark.anyio
async def test_the_dashboard_serves_from_its_own_worker_and_stops_serving_when_it_quits(tiny_model_dir):
    from vramancer.app.app import VramancerApp

    app = VramancerApp(LoadOptions(tiny_model_dir, DEVICES, context=CONTEXT), telemetry=False, serve_port=0)
    async with app.run_test(size=(120, 40)) as pilot:
        async with httpx.AsyncClient(timeout=30) as http:
            deadline = time.monotonic() + 120
            health = None
            while health is None or health.status_code != 200:
                assert time.monotonic() < deadline, "the dashboard's server never answered 200"
                await pilot.pause(0.05)
                if app.server is not None:
                    health = await http.get(app.server.url.removesuffix("/v1") + "/health")
            while app.loaded is None:  # the App hears of the load on its own loop
                assert time.monotonic() < deadline
                await pilot.pause(0.05)
            models = await http.get(f"{app.server.url}/models")
            assert models.json()["data"][0]["id"] == app.loaded.model  # the dashboard's own model
            url = app.server.url
        await pilot.press("ctrl+q")
    with pytest.raises(httpx.ConnectError):
        httpx.get(url.removesuffix("/v1") + "/health", timeout=5)
