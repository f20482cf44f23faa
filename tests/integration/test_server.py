"""The OpenAI-compatible server, spoken to as its users do: OpenAI's own Python client for
answers, raw HTTP for the error cases, Prometheus' parser for /metrics, and `vramancer serve`
in a process of its own for the command line and its signals. Everything on 127.0.0.1."""

from __future__ import annotations

import json
import math
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
            server.tokenizer_source = lambda: getattr(self.worker.engine, "tokenizer", None)
            server.start("127.0.0.1", 0)
        self.url = self.open.url
        self.health_before_load = httpx.get(f"http://127.0.0.1:{self.open.port}/health")
        self.worker.start()
        self.worker.submit(ev.Load(LoadOptions(model_dir, DEVICES, context=CONTEXT)))
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{self.open.port}/health").status_code == 200,
                 timeout=240, what="the model loading")  # a shared, busy machine loads slowly
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
    json_body = {"content-type": "application/json"}
    _error(served.post("/v1/chat/completions", content=big, headers=json_body), 413)

    def chunks():  # no Content-Length: the body is counted as it arrives
        for start in range(0, len(big), 65536):
            yield big[start:start + 65536]

    _error(served.post("/v1/chat/completions", content=chunks(), headers=json_body), 413)


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


# --- fields: each honoured or refused by name ---------------------------------------------------

# Every field a client may send that this server does not serve, and fields no API has: each
# must be a 400 naming it, never silently ignored. Add a row when a field is found that slips by.
A_TOOL = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}
UNSERVED = [
    ("chat", "functions", [A_TOOL["function"]]),
    ("chat", "function_call", "auto"),
    ("completions", "response_format", {"type": "json_object"}),  # chat's field, not completions'
    ("chat", "audio", {"voice": "alloy", "format": "wav"}),
    ("chat", "modalities", ["text", "audio"]),
    ("chat", "prediction", {"type": "content", "content": "x"}),
    ("chat", "web_search_options", {}),
    ("chat", "store", True),
    ("chat", "metadata", {"k": "v"}),
    ("chat", "service_tier", "flex"),
    ("chat", "reasoning_effort", "low"),
    ("chat", "frobnicate", 1),
    ("chat", "echo", True),  # completions' field, not chat's
    ("completions", "suffix", "and so on"),
    ("completions", "best_of", 2),
    ("completions", "top_logprobs", 2),  # chat's field, not completions'
    ("completions", "frobnicate", 1),
]


@pytest.mark.parametrize("endpoint, name, value", UNSERVED)
def test_a_field_this_server_does_not_serve_is_400_naming_it(served, endpoint, name, value):
    body = {"model": served.model, "max_tokens": 1, name: value}
    body.update({"messages": CHAT} if endpoint == "chat" else {"prompt": "Hi"})
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    error = _error(served.post(path, json=body), 400)
    assert error["param"] == name and f"'{name}'" in error["message"]
    assert error["code"] in ("unsupported_parameter", "unknown_parameter")


@pytest.mark.parametrize("message, param", [
    ({"role": "user", "content": "hi", "name": "alice"}, "messages[1].name"),
    ({"role": "user", "content": "hi", "tool_call_id": "c"}, "messages[1].tool_call_id"),  # a tool message's
    ({"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
     "messages[1].tool_calls[0]"),
])
def test_a_message_field_this_server_does_not_serve_is_400_naming_it(served, message, param):
    body = {"model": served.model, "max_tokens": 1, "messages": [CHAT[0], message]}
    assert _error(served.post("/v1/chat/completions", json=body), 400)["param"] == param


def test_fields_that_ask_for_what_is_done_anyway_or_are_null_pass(client, served):
    answer = client.chat.completions.create(
        model=served.model, messages=CHAT, max_tokens=2, response_format={"type": "text"},
        extra_body={"store": False, "top_k": None, "user": "alice"})
    assert answer.choices[0].finish_reason == "length"
    text = client.completions.create(model=served.model, prompt="Hi", max_tokens=2, echo=False, best_of=1)
    assert text.choices[0].finish_reason == "length"


def _nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize("body, param", [
    ({"logprobs": "yes"}, "logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs: true
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_p": 1.5}, "min_p"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"response_format": {"type": "bogus"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "deep", "schema": _nested(40)}}},
     "response_format.json_schema.schema"),
])
def test_a_bad_sampling_value_is_400_naming_it(served, body, param):
    full = {"model": served.model, "messages": CHAT, **body}
    assert _error(served.post("/v1/chat/completions", json=full), 400)["param"] == param


def test_a_logit_bias_on_a_token_the_model_lacks_is_400(served):
    body = {"model": served.model, "messages": CHAT, "logit_bias": {"999999999": 5}}
    assert "999999999" in _error(served.post("/v1/chat/completions", json=body), 400)["message"]


# --- sampling fields, the same streamed, whole, batched and alone ---------------------------------


def _content_logprobs(choice_logprobs) -> list[tuple[str, float, list]]:
    return [(e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs]) for e in choice_logprobs.content]


def test_chat_logprobs_are_the_models_own_softmax(client, served, engine):
    import torch

    answer = client.chat.completions.create(model=served.model, messages=CHAT, max_tokens=6, logprobs=True,
                                            top_logprobs=20)
    entries = answer.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == answer.choices[0].message.content
    ids = engine.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)["input_ids"]
    with torch.inference_mode():
        logits = engine.model(input_ids=ids.to(engine.split.input_device)).logits[0, -1].float()
    expected = torch.log_softmax(logits, dim=-1)
    values, top_ids = torch.topk(expected, 20)
    first = entries[0]
    assert [t.token for t in first.top_logprobs] == [engine.tokenizer.decode([i]) for i in top_ids.tolist()]
    assert [t.logprob for t in first.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)
    assert first.logprob == pytest.approx(values[0].item(), abs=1e-4)  # greedy: the likeliest
    for e in entries:
        mass = sum(math.exp(t.logprob) for t in e.top_logprobs)
        assert mass <= 1 + 1e-5 and e.logprob <= 0
        assert e.bytes == list(e.token.encode())


def test_logprobs_are_the_same_streamed_and_whole(client, served):
    body = dict(model=served.model, messages=CHAT, max_tokens=10, logprobs=True, top_logprobs=3)
    whole = _content_logprobs(client.chat.completions.create(**body).choices[0].logprobs)
    chunks = list(client.chat.completions.create(**body, stream=True))
    streamed = [x for c in chunks if c.choices and c.choices[0].logprobs for x in
                _content_logprobs(c.choices[0].logprobs)]
    assert [t for t, _, _ in streamed] == [t for t, _, _ in whole]
    assert [lp for _, lp, _ in streamed] == pytest.approx([lp for _, lp, _ in whole], abs=1e-6)

    text = client.completions.create(model=served.model, prompt="Once upon a time", max_tokens=8, logprobs=2)
    lp = text.choices[0].logprobs
    assert "".join(lp.tokens) == text.choices[0].text and len(lp.top_logprobs[0]) == 2
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    pieces = list(client.completions.create(model=served.model, prompt="Once upon a time", max_tokens=8, logprobs=2,
                                            stream=True))
    streamed_tokens = [t for c in pieces if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    streamed_offsets = [o for c in pieces if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert streamed_tokens == lp.tokens and streamed_offsets == lp.text_offset


def test_echo_gives_the_prompt_back_scored_by_plain_transformers(client, served, engine, tiny_model_dir):
    """A completion with `echo` and logprobs (how evaluation harnesses score a text): the prompt
    comes first, each of its tokens with its log probability given the ones before (none for
    the first), then the answer as without echo; streamed alike; max_tokens 0 scores alone."""
    import torch
    from transformers import AutoModelForCausalLM

    from vramancer.scheduling.generation import encode_prompt

    prompt = "Once upon a time there was"
    plain = client.completions.create(model=served.model, prompt=prompt, max_tokens=4, logprobs=2)
    echoed = client.completions.create(model=served.model, prompt=prompt, max_tokens=4, logprobs=2, echo=True)
    choice, lp = echoed.choices[0], echoed.choices[0].logprobs
    n = echoed.usage.prompt_tokens
    assert choice.text == prompt + plain.choices[0].text
    assert len(lp.tokens) == n + echoed.usage.completion_tokens and lp.tokens[n:] == plain.choices[0].logprobs.tokens
    assert lp.token_logprobs[n:] == pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=1e-6)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.top_logprobs[1]) == 2

    ids = encode_prompt(engine.tokenizer, prompt, raw=True)["input_ids"]
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = torch.log_softmax(reference(input_ids=ids).logits[0].float(), dim=-1)
    want = [expected[i - 1, ids[0, i]].item() for i in range(1, n)]
    assert lp.token_logprobs[1:n] == pytest.approx(want, abs=1e-4)
    assert lp.tokens[:n] == [engine.tokenizer.decode([i]) for i in ids[0].tolist()]

    pieces = list(client.completions.create(model=served.model, prompt=prompt, max_tokens=4, logprobs=2, echo=True,
                                            stream=True))
    assert "".join(c.choices[0].text for c in pieces) == choice.text
    assert [t for c in pieces if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == lp.tokens

    scored = client.completions.create(model=served.model, prompt=prompt, max_tokens=0, logprobs=0, echo=True)
    assert scored.choices[0].text == prompt and scored.usage.completion_tokens == 0
    assert scored.choices[0].logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    text_only = client.completions.create(model=served.model, prompt=prompt, max_tokens=2, echo=True)
    assert text_only.choices[0].text.startswith(prompt) and text_only.choices[0].logprobs is None


ADJUSTED = {"presence_penalty": 1.5, "frequency_penalty": 1.0, "repetition_penalty": 1.3}


def test_penalties_and_bias_answer_as_generate_does_with_the_same_settings(client, served, engine):
    token = engine.tokenizer.encode(" Paris")[0]
    biased = client.chat.completions.create(model=served.model, messages=CHAT, max_tokens=4, logit_bias={str(token): 100})
    assert biased.choices[0].message.content == engine.tokenizer.decode([token] * 4)

    # A bias of 6 makes " Paris" the likeliest token every time; the penalties grow with each
    # time it is said, until another token wins: an answer that shows both at work.
    bias = {token: 6.0}
    repeated = engine.generate(CHAT, max_new_tokens=16, logit_bias=bias).text
    expected = engine.generate(CHAT, max_new_tokens=16, logit_bias=bias, **ADJUSTED).text
    assert expected.count(" Paris") < repeated.count(" Paris")
    body = dict(model=served.model, messages=CHAT, max_tokens=16, logit_bias={str(token): 6.0}, presence_penalty=1.5,
                frequency_penalty=1.0, extra_body={"repetition_penalty": 1.3})
    assert client.chat.completions.create(**body).choices[0].message.content == expected
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**body, stream=True)
                       if c.choices)
    assert streamed == expected


def test_min_p_of_one_samples_only_the_likeliest_token(client, served, engine):
    greedy = engine.generate(CHAT, max_new_tokens=12).text
    answer = client.chat.completions.create(model=served.model, messages=CHAT, max_tokens=12, temperature=2.0,
                                            seed=7, extra_body={"min_p": 1.0})
    assert answer.choices[0].message.content == greedy


def test_requests_answer_the_same_inside_a_batch_as_alone(client, served):
    asks = [dict(logprobs=True, top_logprobs=2), dict(extra_body=ADJUSTED), dict(logit_bias={"28": 8}),
            dict(temperature=0.9, seed=11, extra_body={"min_p": 0.05, "repetition_penalty": 1.2})]

    def ask(kwargs):
        a = client.chat.completions.create(model=served.model, messages=CHAT, max_tokens=12, **kwargs)
        lp = a.choices[0].logprobs
        return a.choices[0].message.content, (_content_logprobs(lp) if lp else None)

    alone = [ask(k) for k in asks]
    together: list = [None] * len(asks)
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(asks[i]))) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (text, lp), (text_b, lp_b) in zip(alone, together):
        assert text_b == text
        if lp is not None:
            assert [t for t, _, _ in lp_b] == [t for t, _, _ in lp]
            assert [v for _, v, _ in lp_b] == pytest.approx([v for _, v, _ in lp], abs=1e-3)


def test_an_assistant_prefill_is_continued_not_closed(client, served, engine):
    prefill = "The capital of France is"
    text = engine.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) + prefill
    expected = client.completions.create(model=served.model, prompt=text, max_tokens=8).choices[0].text
    answer = client.chat.completions.create(model=served.model, max_tokens=8,
                                            messages=[*CHAT, {"role": "assistant", "content": prefill}])
    assert answer.choices[0].message.content == expected


CITY = {"type": "object", "additionalProperties": False, "required": ["city", "population", "tags"],
        "properties": {"city": {"type": "string", "maxLength": 24}, "population": {"type": "integer", "minimum": 0},
                       "tags": {"type": "array", "maxItems": 3, "items": {"enum": ["big", "old", "coastal"]}}}}


def test_a_json_schema_answer_always_parses_and_validates(client, served):
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    for seed in range(20):
        answer = client.chat.completions.create(model=served.model, messages=CHAT, max_tokens=200, temperature=1.0,
                                                seed=seed, response_format=fmt)
        jsonschema.validate(json.loads(answer.choices[0].message.content), CITY)
        assert answer.choices[0].finish_reason == "stop"
    body = dict(model=served.model, messages=CHAT, max_tokens=200, temperature=1.0, seed=3, response_format=fmt)
    whole = client.chat.completions.create(**body).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**body, stream=True)
                       if c.choices)
    assert streamed == whole
    anything = client.chat.completions.create(model=served.model, messages=CHAT, max_tokens=200,
                                              response_format={"type": "json_object"})
    assert isinstance(json.loads(anything.choices[0].message.content), dict)


def test_a_schema_that_cannot_be_followed_is_400(served):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5,
                                                                          "maximum": 1, "$ref": "#/nowhere"}}}
    body = {"model": served.model, "messages": CHAT, "response_format": fmt}
    assert "cannot be followed" in _error(served.post("/v1/chat/completions", json=body), 400)["message"]


# --- tool calls -------------------------------------------------------------------------------

# The Hermes / Qwen2.5 way of showing tools and writing calls, as a tiny model's own template.
HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call functions. Their signatures:\n<tools>"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>\nFor each call, write "
    "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant"
    "{%- if message.content %}\n{{ message.content }}{%- endif %}"
    "{%- for call in message.tool_calls %}\n<tool_call>\n{\"name\": \"{{ call.function.name }}\", "
    "\"arguments\": {{ call.function.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")
# Llama 3's way: the calls are bare JSON with "parameters", taught in the system turn.
LLAMA3_TEMPLATE = (
    "{%- if tools %}<|start_header_id|>system<|end_header_id|>Respond in the format {\"name\": function name, "
    "\"parameters\": dictionary of argument name and its value}. Functions:"
    "{%- for tool in tools %} {{ tool | tojson }}{%- endfor %}<|eot_id|>{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|start_header_id|>assistant<|end_header_id|>"
    "{%- for call in message.tool_calls %}{\"name\": \"{{ call.function.name }}\", \"parameters\": "
    "{{ call.function.arguments | tojson }}}{%- endfor %}<|eot_id|>"
    "{%- elif message.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>{{ message.content }}<|eot_id|>"
    "{%- else %}<|start_header_id|>{{ message.role }}<|end_header_id|>{{ message.content }}<|eot_id|>{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>{%- endif %}")
WEATHER = {"type": "function", "function": {
    "name": "weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 16}}}}}
CLOCK = {"type": "function", "function": {"name": "clock", "parameters": {"type": "object", "properties": {},
                                                                           "additionalProperties": False}}}


@pytest.fixture(scope="module", params=[HERMES_TEMPLATE, LLAMA3_TEMPLATE], ids=["hermes", "llama3"])
def tool_served(tiny_model_dir, tmp_path_factory, request):
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-tools")
    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = request.param
    tokenizer.save_pretrained(folder)
    s = Served(str(folder))
    yield s
    s.close()


@pytest.fixture(scope="module")
def tool_client(tool_served):
    import openai

    return openai.OpenAI(base_url=tool_served.url, api_key="unused", max_retries=0, timeout=60)


def test_tools_for_a_template_without_them_are_400(served):
    body = {"model": served.model, "messages": CHAT, "tools": [WEATHER]}
    error = _error(served.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == "tools" and error["code"] == "tools_not_supported"


@pytest.mark.parametrize("choice, param", [("sometimes", "tool_choice"), ({"type": "function", "function": {"name": "x"}},
                                                                           "tool_choice"), ("required", "tool_choice")])
def test_a_bad_tool_choice_is_400(tool_served, choice, param):
    body = {"model": tool_served.model, "messages": CHAT, "tool_choice": choice}
    if choice != "required":
        body["tools"] = [WEATHER]
    assert _error(tool_served.post("/v1/chat/completions", json=body), 400)["param"] == param


def test_a_required_tool_call_round_trip(tool_client, tool_served):
    import jsonschema

    first = tool_client.chat.completions.create(model=tool_served.model, messages=CHAT, tools=[WEATHER, CLOCK],
                                                tool_choice={"type": "function", "function": {"name": "weather"}},
                                                parallel_tool_calls=False, max_tokens=100)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    chunks = list(tool_client.chat.completions.create(
        model=tool_served.model, messages=CHAT, tools=[WEATHER, CLOCK],
        tool_choice={"type": "function", "function": {"name": "weather"}}, parallel_tool_calls=False,
        max_tokens=100, stream=True))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    # The call is announced with its id and name, then its arguments come in pieces.
    assert deltas[0].index == 0 and deltas[0].id.startswith("call_") and deltas[0].function.name == "weather"
    assert all(d.index == 0 and d.id is None for d in deltas[1:]) and len(deltas) > 2
    json.loads("".join(d.function.arguments for d in deltas))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]

    # The call and its result go back; the template shows both to the model.
    conversation = [*CHAT, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                    {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}]
    second = tool_client.chat.completions.create(model=tool_served.model, messages=conversation, tools=[WEATHER],
                                                 tool_choice="none", max_tokens=4)
    assert second.choices[0].message.content is not None and second.choices[0].finish_reason == "length"
    tokenizer = tool_served.worker.engine.tokenizer
    shown = [*CHAT, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "weather", "arguments": json.loads(call.function.arguments)}}]},
             {"role": "tool", "content": "Sunny, 21 C"}]
    text = tokenizer.apply_chat_template(shown, add_generation_prompt=True, tokenize=False)
    assert "Sunny, 21 C" in text and call.function.arguments.replace(" ", "") in text.replace(" ", "")
    assert second.usage.prompt_tokens == len(tokenizer(text, add_special_tokens=False)["input_ids"])


# --- routes beyond completions ---------------------------------------------------------------------


def test_a_model_is_retrieved_by_its_names_and_an_unknown_one_is_404(client, served):
    import openai

    from vramancer.server.bridge import short_id

    assert client.models.retrieve(served.model).id == served.model
    assert client.models.retrieve(short_id(served.model)).id == served.model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")


def test_trailing_slashes_are_served_not_redirected(served):
    body = {"model": served.model, "messages": CHAT, "max_tokens": 1}
    answer = served.post("/v1/chat/completions/", json=body, follow_redirects=False)
    assert answer.status_code == 200 and answer.json()["object"] == "chat.completion"
    assert served.get("/v1/models/", follow_redirects=False).status_code == 200


def test_tokenize_and_detokenize_in_llama_servers_shapes(served, engine):
    text = "Hello, VRAMancer!"
    ids = served.post("/tokenize", json={"content": text}).json()["tokens"]
    assert ids == engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = served.post("/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == ids and "".join(p["piece"] for p in pieces) == text
    assert served.post("/detokenize", json={"tokens": ids}).json() == {"content": text}
    assert _error(served.post("/detokenize", json={"tokens": [-1]}), 400)["param"] == "tokens"
    assert _error(served.post("/tokenize", json={"text": text}), 400)["param"] == "text"


# --- malformed requests and browsers ---------------------------------------------------------------


def _raw(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """What the server answers to `data` sent as is, up to its closing the connection."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def _raw_error(answer: bytes, status: int) -> dict:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), head
    assert b"content-type: application/json" in head.lower()
    return json.loads(body)["error"]


def test_a_nested_json_bomb_is_400(served):
    bomb = b"[" * 200_000 + b"]" * 200_000
    response = served.post("/v1/chat/completions", content=bomb, headers={"content-type": "application/json"})
    assert "too deeply" in _error(response, 400)["message"]


def test_malformed_http_and_oversized_headers_get_openai_errors(served):
    assert "not valid HTTP" in _raw_error(_raw(served.open.port, b"GARBAGE\x00 / HTTP/9\r\n\r\n"), 400)["message"]
    huge = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 20_000  # still going past 16 KiB
    _raw_error(_raw(served.open.port, huge), 400)


@pytest.mark.parametrize("headers, status, code", [
    ({"content-type": "text/plain"}, 415, "unsupported_media_type"),
    ({"content-type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type"),
    ({"content-type": ""}, 415, "unsupported_media_type"),
    ({"content-type": "application/json", "host": "evil.example:8000"}, 403, "host_not_allowed"),
    ({"content-type": "application/json", "origin": "https://evil.example"}, 403, "origin_not_allowed"),
])
def test_what_a_web_page_could_send_is_refused(served, headers, status, code):
    body = json.dumps({"model": served.model, "messages": CHAT, "max_tokens": 1}).encode()
    response = served.post("/v1/chat/completions", content=body, headers=headers)
    assert _error(response, status)["code"] == code


def test_cors_origins_given_get_preflight_answers_and_others_do_not():
    from vramancer.server.service import InferenceServer

    server = InferenceServer(cors_origins=("https://chat.example",), allowed_hosts=("myhost.lan",))
    port = server.start("127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{port}"
        preflight = {"Origin": "https://chat.example", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization, content-type"}
        answer = httpx.options(f"{url}/v1/chat/completions", headers=preflight)
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == "https://chat.example"
        assert "POST" in answer.headers["access-control-allow-methods"]
        other = httpx.options(f"{url}/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"})
        assert other.status_code == 403 and other.json()["error"]["code"] == "origin_not_allowed"
        scrape = httpx.get(f"{url}/metrics", headers={"Origin": "https://chat.example", "Host": "myhost.lan:1"})
        assert scrape.status_code == 200 and scrape.headers["access-control-allow-origin"] == "https://chat.example"
    finally:
        server.stop()


def test_a_client_that_hangs_up_mid_upload_costs_one_log_line(served):
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        import socket

        with socket.create_connection(("127.0.0.1", served.open.port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 5000\r\n\r\n{\"model\": ")
            time.sleep(0.3)
        wait_for(lambda: records, timeout=10, what="a log line")
        time.sleep(0.3)
    finally:
        logger.removeHandler(handler)
    assert len(records) == 1 and records[0].exc_info is None
    assert "hung up" in records[0].getMessage()


# --- connection deadlines and the cap (the abuse test proper is test_server_abuse.py) --------------


def test_idle_slow_and_excess_connections_are_closed_or_refused_with_json():
    import socket

    from vramancer.server.connections import Limits
    from vramancer.server.service import InferenceServer

    server = InferenceServer(quiet=True, limits=Limits(max_connections=4, keep_alive_s=0.5, header_s=1.0, body_s=1.0))
    port = server.start("127.0.0.1", 0)
    try:
        started = time.monotonic()
        idle = socket.create_connection(("127.0.0.1", port))
        assert idle.recv(100) == b"" and time.monotonic() - started < 3  # closed, nothing said
        slow = _raw(port, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: 1")  # headers never end
        assert _raw_error(slow, 408)["code"] == "request_timeout"
        stalled = _raw(port, b"POST /tokenize HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100\r\n\r\n{")
        assert _raw_error(stalled, 408)["code"] == "request_timeout"
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        time.sleep(0.2)
        # Answered at once, before a word is sent (a client that sends first may see a reset instead).
        refused = _raw(port, b"")
        assert _raw_error(refused, 503)["code"] == "too_many_connections"
        for sock in held:
            sock.close()
        time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{port}/metrics").status_code == 200
    finally:
        server.stop()


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
    assert m[("vramancer_prompt_tokens_total", frozenset())] >= 1


def test_every_request_is_counted_by_route_method_and_status(served):
    def count(route, method, status) -> float:
        labels = frozenset({("route", route), ("method", method), ("status", str(status))})
        return served.metrics().get(("vramancer_http_requests_total", labels), 0.0)

    cases = [("/v1/chat/completions", "POST", 415, lambda: served.post("/v1/chat/completions", content=b"{}")),
             ("/v1/chat/completions", "POST", 404,
              lambda: served.post("/v1/chat/completions", json={"model": "gpt-9", "messages": CHAT})),
             ("/v1/chat/completions", "GET", 405, lambda: served.get("/v1/chat/completions")),
             ("unmatched", "GET", 404, lambda: served.get("/nowhere/at/all")),
             ("/v1/models/{model:path}", "GET", 200, lambda: served.get(f"/v1/models/{served.model}"))]
    for route, method, status, send in cases:
        before = count(route, method, status)
        assert send().status_code == status
        assert count(route, method, status) == before + 1, (route, method, status)


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


def test_no_flag_is_abbreviated_and_a_key_on_the_command_line_is_never_echoed():
    process = _serve(["--api-key", "sk-secret-4711"])
    out, err = process.communicate(timeout=60)
    assert process.returncode == 2 and "--api-key-file" in err
    assert "sk-secret-4711" not in err + out and len(err.strip().splitlines()) == 1
    process = _serve(["--api-key=sk-secret-4711"])
    out, err = process.communicate(timeout=60)
    assert process.returncode == 2 and "sk-secret-4711" not in err + out
    process = _serve(["--max-bat", "3"])  # --max-batch, abbreviated
    out, err = process.communicate(timeout=60)
    assert process.returncode == 2 and "unknown flag --max-bat" in err


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
