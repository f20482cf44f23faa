"""The continuous batch: requests decode together, join and leave between steps, and answer as
they would alone; the worker runs it between its other commands."""

from __future__ import annotations

import pytest
import torch
from recorder import Recorder

from vramancer.config.options import LoadOptions
from vramancer.engine import events as ev
from vramancer.engine.engine import Engine
from vramancer.engine.worker import EngineWorker

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: one torch thread per test

PROMPTS = [
    "Tell me about the sea.",
    "Hi",
    "What is the capital of France, and why did it grow so large over the centuries?",
    "Count with me: one two three",
    "Write a haiku about autumn leaves.",
    "Why is the sky blue?",
    "Name three colours.",
    "Explain what a compiler does in one long sentence, please, for a beginner.",
]

# Text to continue (raw): none of them is a question the model answers in a word and ends.
OPENINGS = [
    "The sea is",
    "Once upon a time, in a small village by the mountains, there lived",
    "The capital of France is Paris. It",
    "One, two, three, four,",
    "Autumn leaves fall",
    "The sky looks blue during the day because sunlight",
    "Red, green and",
    "A compiler is a program that reads source code written by a person and",
]


class Events(list):
    """What a batch emitted, with the questions tests ask of it."""

    def done(self, request_id) -> ev.GenerationDone:
        found = [e for e in self if isinstance(e, ev.GenerationDone) and e.request_id == request_id]
        assert len(found) == 1, f"{len(found)} GenerationDone for {request_id}"
        return found[0]

    def streamed(self, request_id) -> str:
        return "".join(e.text for e in self if isinstance(e, ev.Token) and e.request_id == request_id)

    def of(self, kind):
        return [e for e in self if isinstance(e, kind)]


def submit(request_id, prompt, tokens=20, stop=(), raw=False, **sampling):
    return ev.Submit(request_id, prompt, {"max_new_tokens": tokens, **sampling}, raw=raw, stop=tuple(stop))


def run_to_end(batch, limit=2000):
    for _ in range(limit):
        if not batch.busy:
            return
        batch.step()
    raise AssertionError("the batch did not empty")


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    engine = Engine.load(tiny_model_dir, "sim:3x64MiB", context=256)
    yield engine
    engine.close()


# --- one engine, driven step by step ----------------------------------------------------


def test_one_request_alone_is_exactly_generate(engine):
    solo = engine.generate(PROMPTS[0], max_new_tokens=24)
    events = Events()
    batch = engine.batch(events.append)
    assert batch.submit(submit("a", PROMPTS[0], tokens=24))
    run_to_end(batch)
    done = events.done("a")
    assert list(done.token_ids) == solo.token_ids
    assert done.text == solo.text == events.streamed("a")
    assert done.finish_reason == "length" and not done.cancelled and done.prompt_tokens == solo.prompt_tokens
    order = [type(e).__name__ for e in events if not isinstance(e, (ev.Token, ev.BatchStatus))]
    assert order == ["RequestQueued", "RequestStarted", "GenerationDone"]
    assert done.ttft_s > 0 and done.total_s >= done.ttft_s and done.decode_tokens_per_s > 0
    assert engine.cache is None and events.of(ev.BatchStatus)[-1].running == 0


def test_requests_joining_at_different_steps_each_get_their_own_answer(engine):
    solo = {p: engine.generate(p, max_new_tokens=16).token_ids for p in PROMPTS[:4]}
    events = Events()
    batch = engine.batch(events.append)
    batch.submit(submit("0", PROMPTS[0], tokens=16))
    batch.step()
    batch.step()
    batch.submit(submit("1", PROMPTS[1], tokens=16))
    batch.step()
    batch.submit(submit("2", PROMPTS[2], tokens=16))
    batch.submit(submit("3", PROMPTS[3], tokens=16))
    batch.step()
    assert len(batch.running) == 4
    run_to_end(batch)
    for i, prompt in enumerate(PROMPTS[:4]):
        assert list(events.done(str(i)).token_ids) == solo[prompt]  # tiny model: no near ties
        assert events.streamed(str(i)) == events.done(str(i)).text


def test_requests_arriving_together_are_prefilled_together_and_answer_as_alone(engine):
    prompts = PROMPTS[:4]  # four lengths: the shorter ones are left-padded in the shared prefill
    solo = {p: engine.generate(p, max_new_tokens=12).token_ids for p in prompts}
    events = Events()
    batch = engine.batch(events.append)
    for i, prompt in enumerate(prompts):
        batch.submit(submit(str(i), prompt, tokens=12))
    batch.step()
    assert len(batch.running) == 4
    assert len({s.token_times[0] for s in batch.running}) == 1  # one prefill gave every first token
    run_to_end(batch)
    for i, prompt in enumerate(prompts):
        assert list(events.done(str(i)).token_ids) == solo[prompt]  # tiny model: no near ties
        assert events.streamed(str(i)) == events.done(str(i)).text


def test_cancel_frees_its_rows_and_the_others_go_on_unchanged(engine):
    solo = {p: engine.generate(p, max_new_tokens=30).token_ids for p in PROMPTS[:3]}
    events = Events()
    batch = engine.batch(events.append)
    for i, prompt in enumerate(PROMPTS[:3]):
        batch.submit(submit(str(i), prompt, tokens=30))
    for _ in range(5):
        batch.step()
    before, kv_before = batch.status(), sum(engine.kv_bytes_by_device().values())
    assert batch.cancel("2")  # the longest prompt: its padding columns go too
    after, kv_after = batch.status(), sum(engine.kv_bytes_by_device().values())
    assert (before.running, after.running) == (3, 2)
    assert after.kv_tokens < before.kv_tokens and kv_after < kv_before
    cancelled = events.done("2")
    assert cancelled.cancelled and cancelled.finish_reason == "cancelled"
    assert list(cancelled.token_ids) == solo[PROMPTS[2]][:len(cancelled.token_ids)]
    assert events.streamed("2") == cancelled.text
    run_to_end(batch)
    for i in (0, 1):
        assert list(events.done(str(i)).token_ids) == solo[PROMPTS[i]]
    assert not batch.cancel("2")  # already gone


def test_a_request_that_cannot_fit_the_context_is_refused_with_the_numbers(engine):
    events = Events()
    batch = engine.batch(events.append)
    assert not batch.submit(submit("long", "Hi", tokens=300))
    refused = events.of(ev.RequestRefused)[0]
    prompt_tokens = len(engine.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}],
                                                             add_generation_prompt=True, return_dict=True)["input_ids"])
    assert refused.reason == "too_long" and refused.request_id == "long"
    for number in (prompt_tokens, 300, prompt_tokens + 300, 256):
        assert str(number) in refused.message
    assert not batch.busy


def test_requests_are_admitted_by_the_kv_they_hold_and_the_newest_is_preempted_when_it_runs_out(engine):
    """Admission counts the KV blocks a sequence holds, not its final length: three requests of
    100 tokens start together in a 256-token budget; as they grow, the newest is preempted (its
    KV dropped), waits first in line and is computed again later; every answer equals the
    request's alone, streamed once."""
    prompts = dict(zip("abcd", OPENINGS))
    solo = {name: engine.generate(p, raw=True, max_new_tokens=100).token_ids for name, p in prompts.items()}
    events = Events()
    batch = engine.batch(events.append, max_batch=3, max_waiting=1)
    # Three slots and one waiting place: the fifth is one too many.
    for name, prompt in prompts.items():
        assert batch.submit(submit(name, prompt, tokens=100, raw=True))
    assert not batch.submit(submit("e", "Hi", tokens=100, raw=True))
    refused = events.of(ev.RequestRefused)[-1]
    assert (refused.request_id, refused.reason) == ("e", "queue_full")
    batch.step()
    assert (len(batch.running), len(batch.waiting)) == (3, 1)  # three prompts fit; the slots are full
    peak = peak_bytes = 0
    while batch.busy:
        batch.step()
        status = batch.status()
        peak = max(peak, status.kv_tokens)
        assert status.kv_blocks <= status.kv_budget_blocks
        peak_bytes = max(peak_bytes, sum(engine.kv_bytes_by_device().values()))  # kept prefixes included
    assert batch.preemptions >= 1
    assert 0 < peak <= engine.context
    assert 0 < peak_bytes <= engine.context * engine.profile.kv_bytes_per_token * len(engine.placement.layer_devices)
    for name in prompts:
        done = events.done(name)
        assert list(done.token_ids) == solo[name] and done.new_tokens == 100  # tiny model: no near ties
        assert events.streamed(name) == done.text  # nothing streamed twice
    assert sum(isinstance(e, ev.RequestStarted) for e in events) == 4


def test_stop_strings_end_the_answer_and_are_never_streamed(engine):
    plain = engine.generate(PROMPTS[0], max_new_tokens=30).text
    stop = plain[12:17]
    assert stop.strip() and plain.index(stop) > 0
    never = plain[20:24] + "\u2603never"  # starts like the answer's text, never completes
    events = Events()
    batch = engine.batch(events.append)
    batch.submit(submit("stop", PROMPTS[0], tokens=30, stop=(stop,)))
    batch.submit(submit("never", PROMPTS[0], tokens=30, stop=(never,)))
    run_to_end(batch)
    stopped = events.done("stop")
    assert stopped.finish_reason == "stop" and stopped.text == plain[:plain.index(stop)]
    assert events.streamed("stop") == stopped.text and stop not in events.streamed("stop")
    assert len(stopped.token_ids) < 30
    ran_on = events.done("never")
    assert ran_on.finish_reason == "length" and ran_on.text == plain == events.streamed("never")


def test_seeded_sampling_is_reproducible_whatever_runs_beside_it(engine):
    events = Events()
    batch = engine.batch(events.append)
    batch.submit(submit("s1", PROMPTS[0], tokens=20, temperature=0.9, seed=7))
    batch.submit(submit("greedy", PROMPTS[1], tokens=20))
    batch.submit(submit("s2", PROMPTS[0], tokens=20, temperature=0.9, seed=7))
    batch.submit(submit("other", PROMPTS[0], tokens=20, temperature=0.9, seed=8))
    run_to_end(batch)
    batch.submit(submit("s3", PROMPTS[0], tokens=20, temperature=0.9, seed=7))
    run_to_end(batch)
    same = [events.done(name).token_ids for name in ("s1", "s2", "s3")]
    assert same[0] == same[1] == same[2]
    assert events.done("other").token_ids != same[0]
    assert list(same[0]) != engine.generate(PROMPTS[0], max_new_tokens=20).token_ids


def test_bad_requests_are_refused_with_a_sentence(engine):
    events = Events()
    batch = engine.batch(events.append)
    assert not batch.submit(submit("neg", "Hi", tokens=-1))
    assert not batch.submit(ev.Submit("odd", "Hi", {"colour": "blue"}))
    assert not batch.submit(ev.Submit("empty", "", {}, raw=True))
    refusals = events.of(ev.RequestRefused)
    assert [r.reason for r in refusals] == ["bad_request"] * 3
    assert "max-new-tokens" in refusals[0].message and "colour" in refusals[1].message
    assert "empty" in refusals[2].message
    assert batch.submit(submit("ok", "Hi", tokens=2))
    assert not batch.submit(submit("ok", "Hi again", tokens=2))  # its id is taken
    assert batch.submit(submit("none", "Hi", tokens=0))
    run_to_end(batch)
    assert events.done("ok").new_tokens == 2
    nothing = events.done("none")
    assert (nothing.new_tokens, nothing.text, nothing.finish_reason) == (0, "", "length")


# --- through the worker -------------------------------------------------------------------


@pytest.fixture
def worker(tiny_model_dir):
    events = Recorder()
    worker = EngineWorker(events, telemetry_hz=20, max_batch=8, max_waiting=64).start()
    worker.submit(ev.Load(LoadOptions(tiny_model_dir, "sim:3x64MiB", context=512)))
    events.wait_for(ev.PlanChanged)
    yield worker, events
    worker.shutdown()


def test_worker_runs_submits_and_a_dashboard_prompt_together(worker):
    worker, events = worker
    for i in range(3):
        worker.submit(submit(f"r{i}", PROMPTS[i], tokens=40))
    worker.submit(ev.Generate(PROMPTS[0], {"max_new_tokens": 40}, request_id=9))
    answers = {}
    for _ in range(4):
        done = events.wait_for(ev.GenerationDone)
        answers[done.request_id] = done
    assert answers["r0"].token_ids == answers[9].token_ids  # the console's prompt, in the same scheduler
    # All four started before the first one finished: they decoded together.
    order = [(type(e).__name__, e.request_id) for e in events.seen if isinstance(e, (ev.Token, ev.GenerationDone))]
    first_done = next(i for i, (kind, _) in enumerate(order) if kind == "GenerationDone")
    assert {rid for kind, rid in order[:first_done] if kind == "Token"} == {"r0", "r1", "r2", 9}
    assert events.wait_for(ev.BatchStatus, lambda s: s.running == 0).kv_budget == 512
    assert all(s.kv_budget == 512 for s in events.of(ev.BatchStatus))


def test_worker_migrates_between_batch_steps_and_no_answer_changes(worker):
    worker, events = worker
    names = [f"m{i}" for i in range(4)]
    for name, prompt in zip(names, PROMPTS):
        worker.submit(submit(name, prompt, tokens=60))
    baseline = {}
    for _ in names:
        done = events.wait_for(ev.GenerationDone)
        baseline[done.request_id] = done.token_ids
    for name, prompt in zip(names, PROMPTS):
        worker.submit(submit(name, prompt, tokens=60))
    events.wait_for(ev.RequestStarted, lambda e: e.request_id == names[-1])  # all four are decoding
    start = worker.engine.placement.layer_devices[0]
    target = next(d.name for d in worker.engine.devices if d.name != start)
    worker.submit(ev.Migrate(0, 1, target))
    worker.submit(ev.Replan("sequential"))  # between two steps too, moving the batch's KV
    moved = events.wait_for(ev.MigrationDone)
    replanned = events.wait_for(ev.PlanChanged, lambda e: e.plan.strategy == "sequential")
    assert replanned.plan.layer_devices == tuple(worker.engine.placement.layer_devices)
    again = {}
    for _ in names:
        done = events.wait_for(ev.GenerationDone)
        again[done.request_id] = done.token_ids
    assert again == baseline
    weights = sum(worker.engine.profile.layer_bytes[i] for i in (0, 1))
    assert moved.step is not None and moved.bytes > weights  # the batch's KV moved with the layers


def test_worker_auto_rebalances_between_batch_steps_and_no_answer_changes(tiny_model_dir):
    events = Recorder()
    worker = EngineWorker(events, telemetry=False).start()
    try:
        worker.submit(ev.Load(LoadOptions(tiny_model_dir, "sim:3x64MiB", context=512, auto_rebalance=True)))
        events.wait_for(ev.PlanChanged)
        worker.submit(ev.Migrate(3, 5, "sim2"))  # embed | L0–2 on sim1 | L3–5 + head on sim2
        events.wait_for(ev.MigrationDone)
        baseline = {}
        for name, prompt in zip("abc", PROMPTS):
            worker.submit(submit(name, prompt, tokens=60))
        for _ in "abc":
            done = events.wait_for(ev.GenerationDone)
            baseline[done.request_id] = done.token_ids
        for name, prompt in zip("abc", PROMPTS):
            worker.submit(submit(name, prompt, tokens=60))
        events.wait_for(ev.RequestStarted, lambda e: e.request_id == "c")  # all three are decoding
        worker.submit(ev.Reserve("sim1", 63 * 2**20))  # another process takes nearly all of sim1
        moved = events.wait_for(ev.MigrationDone)
        assert moved.src == "sim1" and "short of memory" in moved.reason and moved.step is not None
        again = {}
        for _ in "abc":
            done = events.wait_for(ev.GenerationDone)
            again[done.request_id] = done.token_ids
        assert again == baseline
    finally:
        worker.shutdown()


def test_worker_cancel_by_request_id_and_shutdown_ends_every_request(tiny_model_dir):
    events = Recorder()
    worker = EngineWorker(events, telemetry_hz=20, max_batch=2).start()
    worker.submit(ev.Load(LoadOptions(tiny_model_dir, "sim:2x64MiB", context=2048)))
    events.wait_for(ev.PlanChanged)
    worker.submit(submit("x", PROMPTS[0], tokens=900))
    worker.submit(submit("y", PROMPTS[1], tokens=900))
    worker.submit(submit("z", PROMPTS[2], tokens=900))  # waits: two at most run together
    events.wait_for(ev.Token, lambda e: e.request_id == "y")
    worker.submit(ev.Cancel("x"))
    done = events.wait_for(ev.GenerationDone)
    assert done.request_id == "x" and done.finish_reason == "cancelled" and 0 < done.new_tokens < 900
    events.wait_for(ev.RequestStarted, lambda e: e.request_id == "z")  # x's room went to z
    worker.shutdown(timeout=30)
    assert not worker.alive
    running = set()
    while running != {"y", "z"}:
        done = events.wait_for(ev.GenerationDone)
        assert done.finish_reason == "cancelled"
        running.add(done.request_id)
    worker.submit(submit("late", "Hi", tokens=2))
    late = events.wait_for(ev.RequestRefused)
    assert (late.request_id, late.reason) == ("late", "shutting_down")


# --- the bundled model ----------------------------------------------------------------------


@pytest.mark.model
def test_bundled_one_request_alone_is_exactly_generate(smollm_engine):
    prompt = "What is the capital of France?"
    solo = smollm_engine.generate(prompt, max_new_tokens=12)
    events = Events()
    batch = smollm_engine.batch(events.append)
    batch.submit(submit("paris", prompt, tokens=12))
    run_to_end(batch)
    assert list(events.done("paris").token_ids) == solo.token_ids
    assert "Paris" in events.done("paris").text


def top2_gap(engine, ids: list[int]) -> float:
    """The gap between the two best logits after `ids`, computed alone (unbatched)."""
    with torch.inference_mode():
        logits = engine.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()
    best = torch.topk(logits, 2).values
    return float(best[0] - best[1])


@pytest.mark.model
def test_bundled_eight_concurrent_requests_answer_as_alone_and_survive_a_migration(smollm_engine):
    engine = smollm_engine
    tokens = 16
    solo = [engine.generate(p, raw=True, max_new_tokens=tokens).token_ids for p in OPENINGS]
    events = Events()
    batch = engine.batch(events.append)
    original = list(engine.placement.layer_devices)
    # They join at different steps: two now, the rest over the next steps.
    for i, prompt in enumerate(OPENINGS):
        batch.submit(submit(str(i), prompt, tokens=tokens, raw=True))
        if i % 2 == 1:
            batch.step()
    assert len(batch.running) == 8
    moved = engine.migrate(0, 4, original[-1], step=batch.steps)  # mid-stream, between two steps
    try:
        assert moved.bytes > sum(engine.profile.layer_bytes[i] for i in range(5))
        run_to_end(batch)
    finally:
        for index, device in enumerate(original):
            if engine.placement.layer_devices[index] != device:
                engine.migrate(index, index, device)
    same = 0
    for i, prompt in enumerate(OPENINGS):
        got = list(events.done(str(i)).token_ids)
        print(f"request {i}: {len(got)} tokens, {events.done(str(i)).finish_reason}")
        if got == solo[i]:
            same += 1
            continue
        at = next(k for k, (a, b) in enumerate(zip(got, solo[i])) if a != b)
        prompt_ids = engine.tokenizer(prompt)["input_ids"]
        gap = top2_gap(engine, prompt_ids + solo[i][:at])
        print(f"request {i} diverges at token {at}: top-2 logit gap {gap:.2e}")
        assert gap < 1e-3
    assert same >= 7


def test_a_device_lost_mid_batch_rebuilds_every_sequence_and_the_answers_go_on(engine, monkeypatch):
    """DeviceLost from a layer in the middle of a step (as a node's stand-in raises it): the
    batch re-places what was lost, prefills each sequence's prompt and tokens so far, and goes on."""
    from vramancer.platforms.devices import DeviceLost

    solo = {p: engine.generate(p, max_new_tokens=20).token_ids for p in PROMPTS[:3]}
    layer = engine.split.layer_modules[3]
    calls = {"n": 0}
    forward = layer.forward

    def fails_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:  # a few decode steps in
            raise DeviceLost("node:127.0.0.1:1", "it stopped answering")
        return forward(*args, **kwargs)

    monkeypatch.setattr(layer, "forward", fails_once)
    events = Events()
    batch = engine.batch(events.append)
    for i, prompt in enumerate(PROMPTS[:3]):
        batch.submit(submit(str(i), prompt, tokens=20))
    run_to_end(batch)
    assert calls["n"] > 8
    for i, prompt in enumerate(PROMPTS[:3]):
        done = events.done(str(i))
        assert list(done.token_ids) == solo[prompt] and done.finish_reason == "length"
        assert events.streamed(str(i)) == done.text  # nothing streamed twice


def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_decode(engine, monkeypatch):
    """A long prompt arriving while another request decodes is prefilled a chunk a step: the
    running one gets a token at every step of it, a short newcomer sent after it starts before
    it, and it answers as it would alone."""
    from vramancer.scheduling import batching

    monkeypatch.setattr(batching, "PREFILL_CHUNK", 8)
    long_prompt = OPENINGS[7] + " " + OPENINGS[1] + " " + OPENINGS[5]
    solo = {p: engine.generate(p, raw=True, max_new_tokens=8).token_ids for p in (long_prompt, OPENINGS[0], "Hi")}
    prompt_tokens = len(engine.tokenizer(long_prompt)["input_ids"])
    assert prompt_tokens > 3 * 8
    engine.prefix_cache.clear()  # its prompt is computed in chunks here, not copied from the solo run's
    events = Events()
    batch = engine.batch(events.append)
    batch.submit(submit("running", OPENINGS[0], tokens=40, raw=True))
    batch.step()
    batch.submit(submit("long", long_prompt, tokens=8, raw=True))
    batch.submit(submit("short", "Hi", tokens=8, raw=True))
    tokens_before = len(batch.running[0].tokens)
    steps = 0
    while not any(isinstance(e, ev.RequestStarted) and e.request_id == "long" for e in events):
        batch.step()
        steps += 1
        assert batch.prefilling is not None or any(s.request_id == "long" for s in batch.running)
    assert steps == -(-prompt_tokens // 8)  # one chunk a step
    running = next(s for s in batch.running if s.request_id == "running")
    assert len(running.tokens) - tokens_before == steps  # it kept decoding, a token each step
    started = [e.request_id for e in events if isinstance(e, ev.RequestStarted)]
    assert started.index("short") < started.index("long")  # the short one did not wait behind it
    run_to_end(batch)
    assert list(events.done("long").token_ids) == solo[long_prompt]  # tiny model: no near ties
    assert list(events.done("short").token_ids) == solo["Hi"]
    assert list(events.done("running").token_ids)[:8] == solo[OPENINGS[0]]
