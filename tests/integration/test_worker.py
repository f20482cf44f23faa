"""The EngineWorker thread: order, mid-generation commands, errors, shutdown; and telemetry."""

import queue
import threading
import time

import pytest
from recorder import Recorder

from vramancer.config.options import LoadOptions
from vramancer.engine import events as ev
from vramancer.engine.worker import EngineWorker

TIMEOUT = 60




@pytest.fixture
def worker_and_events(tiny_model_dir):
    events = Recorder()
    worker = EngineWorker(events, telemetry_hz=20).start()
    worker.submit(ev.Load(LoadOptions(tiny_model_dir, "sim:3x64MiB", context=512)))
    events.wait_for(ev.PlanChanged)
    yield worker, events
    worker.shutdown()


def generate(prompt="Tell me about the sea.", tokens=24, request_id=1):
    return ev.Generate(prompt, {"max_new_tokens": tokens}, request_id=request_id)


def test_requests_and_a_replan_share_the_one_scheduler(worker_and_events):
    """Dashboard prompts are requests to the scheduler: a Replan sent between two of them runs
    between two decode steps, and each answer still comes, whole, in its own events."""
    worker, events = worker_and_events
    worker.submit(generate(request_id=1))
    worker.submit(ev.Replan("sequential"))
    worker.submit(generate(request_id=2))
    plan = events.wait_for(ev.PlanChanged)
    done = [events.wait_for(ev.GenerationDone), events.wait_for(ev.GenerationDone)]
    assert sorted(d.request_id for d in done) == [1, 2]
    assert plan.plan.strategy == "sequential"
    for answer in done:  # tokens streamed before each GenerationDone spell its answer
        tokens = [e.text for e in events.of(ev.Token) if e.request_id == answer.request_id]
        assert "".join(tokens) == answer.text and answer.new_tokens > 0
    assert not events.of(ev.RequestQueued) and not events.of(ev.BatchStatus)  # not listed as server requests


def test_migrate_during_streaming_applies_between_steps_and_keeps_the_answer(worker_and_events):
    worker, events = worker_and_events
    worker.submit(generate(tokens=40, request_id=1))
    baseline = events.wait_for(ev.GenerationDone)
    worker.submit(generate(tokens=40, request_id=2))
    events.wait_for(ev.Token, lambda e: e.request_id == 2)
    worker.submit(ev.Migrate(0, 3, "sim2"))
    done = events.wait_for(ev.MigrationDone)
    result = events.wait_for(ev.GenerationDone)
    assert done.step is not None and 0 < done.step < 40  # it ran inside the generation
    assert result.token_ids == baseline.token_ids
    assert worker.engine.placement.layer_devices[:4] == ["sim2"] * 4


def test_cancel_stops_within_one_step(worker_and_events):
    worker, events = worker_and_events
    worker.submit(generate(tokens=400))
    events.wait_for(ev.Token)
    worker.submit(ev.Cancel(1))
    seen_at_cancel = len(events.of(ev.Token))
    done = events.wait_for(ev.GenerationDone)
    assert done.cancelled and done.new_tokens < 400
    assert len(events.of(ev.Token)) <= seen_at_cancel + 2  # at most the step in flight


def test_an_error_becomes_an_event_and_the_worker_keeps_serving(worker_and_events):
    worker, events = worker_and_events
    worker.submit(ev.Generate("hi", {"max_new_tokens": -1}))
    error = events.wait_for(ev.Error)
    assert error.command == "Generate" and "max-new-tokens" in error.message
    worker.submit(ev.Migrate(0, 99, "sim0"))
    refused = events.wait_for(ev.MigrationNotDone)
    assert "not in this model" in refused.reason
    worker.submit(ev.Load(LoadOptions("/no/such/model.gguf", "sim:2x1GiB")))
    assert "does not exist" in events.wait_for(ev.Error).message
    worker.submit(generate(tokens=4))
    assert events.wait_for(ev.GenerationDone).new_tokens > 0
    assert worker.alive


def test_telemetry_samples_devices_and_links(worker_and_events):
    worker, events = worker_and_events
    worker.submit(generate(tokens=8))
    events.wait_for(ev.GenerationDone)
    links = events.wait_for(ev.LinkSample, lambda e: len(e.links) > 0).links
    # Into the layers on sim1 and back to the head, which sits beside its tied embeddings.
    assert {(l.src, l.dst) for l in links} >= {("sim0", "sim1"), ("sim1", "sim0")}
    assert all(l.bytes > 0 and l.transfers > 0 for l in links)
    sample = events.wait_for(ev.DeviceSample).devices
    by_name = {d.name: d for d in sample}
    sim1 = by_name["sim1"]
    assert sim1.simulated and sim1.total == 64 * 2**20
    assert sim1.weights == worker.engine.device("sim1").ledger.claims["weights"] > 0
    assert sim1.utilization is None and sim1.temperature is None and sim1.power is None
    assert sim1.weights + sim1.kv + sim1.reserved + sim1.other + sim1.free == sim1.total
    assert len(worker.telemetry.devices["sim1"]) >= 1


def test_shutdown_leaves_no_thread_behind(tiny_model_dir):
    before = set(threading.enumerate())
    events = Recorder()
    worker = EngineWorker(events, telemetry_hz=20).start()
    worker.submit(ev.Load(LoadOptions(tiny_model_dir, "sim:2x64MiB", context=256)))
    events.wait_for(ev.PlanChanged)
    worker.submit(generate(tokens=2000))
    events.wait_for(ev.Token)
    started = time.monotonic()
    worker.shutdown()
    assert time.monotonic() - started < 2.0
    assert set(threading.enumerate()) <= before


def test_idle_shutdown_is_prompt(tiny_model_dir):
    worker = EngineWorker(lambda e: None).start()
    started = time.monotonic()
    worker.shutdown()
    assert time.monotonic() - started < 1.0 and not worker.alive


def test_a_cancel_names_its_request_and_reaches_queued_ones(worker_and_events):
    worker, events = worker_and_events
    worker.submit(generate(tokens=300, request_id=100))
    events.wait_for(ev.Token, lambda e: e.request_id == 100)
    # Five requests queue behind the one streaming; each is cancelled while it waits.
    for request_id in range(1, 6):
        worker.submit(generate(tokens=8, request_id=request_id))
        worker.submit(ev.Cancel(request_id))
    worker.submit(generate(tokens=4, request_id=6))
    done = {}
    while len(done) < 7:
        event = events.wait_for(ev.GenerationDone)
        done[event.request_id] = event
    assert not done[100].cancelled and done[100].new_tokens == 300  # not the one a Cancel named
    assert all(done[i].cancelled and done[i].new_tokens == 0 for i in range(1, 6))
    assert not done[6].cancelled and done[6].new_tokens > 0
    assert not [e for e in events.of(ev.Token) if 1 <= e.request_id <= 5]
    # A Cancel for a request already done is spent on nothing: it cannot hit a later one.
    worker.submit(ev.Cancel(6))
    worker.submit(generate(tokens=4, request_id=6))
    again = events.wait_for(ev.GenerationDone)
    assert again.request_id == 6 and not again.cancelled and again.new_tokens > 0


def test_a_generate_after_shutdown_is_answered_with_an_error(tiny_model_dir):
    events = Recorder()
    worker = EngineWorker(events, telemetry_hz=20).start()
    worker.submit(ev.Load(LoadOptions(tiny_model_dir, "sim:2x64MiB", context=256)))
    events.wait_for(ev.PlanChanged)
    worker.submit(generate(tokens=2000, request_id=1))
    events.wait_for(ev.Token)
    worker.submit(generate(tokens=4, request_id=2))  # queued when the shutdown comes
    worker.shutdown()
    worker.submit(generate(tokens=4, request_id=3))  # after it
    errors = [e for e in _drain(events) if isinstance(e, ev.Error)]
    assert [e.command for e in errors] == ["Generate", "Generate"]
    assert all("shutting down" in e.message for e in errors)
    assert not [e for e in events.seen if isinstance(e, ev.GenerationDone) and e.request_id in (2, 3)]


def _drain(recorder: Recorder) -> list:
    while True:
        try:
            recorder.seen.append(recorder.events.get_nowait())
        except queue.Empty:
            return recorder.seen


def test_every_command_has_a_handler():
    commands = {kind for kind in vars(ev).values()
                if isinstance(kind, type) and issubclass(kind, ev.Command) and kind is not ev.Command}
    worker = EngineWorker(lambda e: None, telemetry=False)
    assert set(worker.handlers) == commands - {ev.Shutdown}


def test_prompts_are_encoded_off_the_engine_thread(worker_and_events, monkeypatch):
    """Tokenizing and templating run on the encoding pool: a huge prompt, refused or not,
    never holds the engine's thread (and so the answers decoding there)."""
    from vramancer.engine import worker as worker_module
    from vramancer.scheduling import batching

    threads: list[str] = []

    def recording(original):
        def encode(tokenizer, request):
            threads.append(threading.current_thread().name)
            return original(tokenizer, request)
        return encode

    monkeypatch.setattr(worker_module, "encode_request", recording(worker_module.encode_request))
    monkeypatch.setattr(batching, "encode_request", recording(batching.encode_request))
    worker, events = worker_and_events
    worker.submit(ev.Submit("served", "Tell me about the sea.", {"max_new_tokens": 4}))
    worker.submit(generate(tokens=4, request_id=3))
    worker.submit(ev.Submit("huge", "word " * 20000, {"max_new_tokens": 4}, raw=True))
    outcomes = {}
    while len(outcomes) < 3:  # in whatever order they come
        event = events.wait_for((ev.RequestRefused, ev.GenerationDone))
        outcomes[event.request_id] = event
    assert isinstance(outcomes["huge"], ev.RequestRefused) and outcomes["huge"].reason == "too_long"
    assert outcomes["served"].new_tokens == outcomes[3].new_tokens == 4
    assert len(threads) == 3 and all(name.startswith("vramancer-encode") for name in threads), threads
