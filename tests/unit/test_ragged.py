"""The ragged batch on a tiny random Llama: every sequence's own KV, admission by the blocks
held, preemption by recompute and the kept prefixes, each against the request alone."""

from __future__ import annotations

import pytest
import torch

from vramancer.engine import events as ev
from vramancer.engine.engine import Engine
from vramancer.scheduling import ragged
from vramancer.scheduling.prefix_cache import PrefixCache, shared_blocks

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: one torch thread per test

OPENINGS = [
    "The sea is",
    "Once upon a time, in a small village by the mountains, there lived",
    "The capital of France is Paris. It",
    "One, two, three, four,",
]
SYSTEM = "You are a careful assistant who answers in plain words and short sentences, always. " * 3


class Events(list):
    def done(self, request_id) -> ev.GenerationDone:
        found = [e for e in self if isinstance(e, ev.GenerationDone) and e.request_id == request_id]
        assert len(found) == 1, f"{len(found)} GenerationDone for {request_id}"
        return found[0]

    def streamed(self, request_id) -> str:
        return "".join(e.text for e in self if isinstance(e, ev.Token) and e.request_id == request_id)

    def started(self, request_id) -> bool:
        return any(isinstance(e, ev.RequestStarted) and e.request_id == request_id for e in self)


def submit(request_id, prompt, tokens, raw=True):
    return ev.Submit(request_id, prompt, {"max_new_tokens": tokens}, raw=raw)


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


def alone(engine, prompt, tokens, raw=True):
    engine.prefix_cache.clear()
    return engine.generate(prompt, raw=raw, max_new_tokens=tokens).token_ids


def test_the_ragged_cache_attends_each_sequence_to_its_own_keys_only(engine):
    """One forward over three sequences' tokens laid end to end (one of them a chunk after a
    past) gives each the logits it gets alone."""
    model, device = engine.model, engine.split.input_device
    prompts = [engine.tokenizer(p)["input_ids"] for p in OPENINGS[1:]]  # 5 tokens or more each
    with torch.inference_mode():
        solo = [model(input_ids=torch.tensor([p], device=device)).logits[0, -1] for p in prompts]
        cache = ragged.RaggedCache(len(engine.split.layer_modules), model.config._attn_implementation)
        for slot in range(3):
            cache.add(slot)
            cache.capacity[slot] = 32
        first = [p[:4] for p in prompts]  # every prompt's first 4 tokens, then the rest
        pieces = [ragged.Piece(i, 4 * i, 4, 0) for i in range(3)]
        with ragged.ragged_forward(model, cache, pieces):
            model(input_ids=torch.tensor([sum(first, [])], device=device), cache=cache, use_cache=True,
                  position_ids=torch.tensor([[0, 1, 2, 3] * 3], device=device))
        rests = [p[4:] for p in prompts]
        pieces, offset = [], 0
        for i, rest in enumerate(rests):
            pieces.append(ragged.Piece(i, offset, len(rest), 4))
            offset += len(rest)
        positions = [list(range(4, 4 + len(r))) for r in rests]
        with ragged.ragged_forward(model, cache, pieces):
            logits = model(input_ids=torch.tensor([sum(rests, [])], device=device), cache=cache, use_cache=True,
                           position_ids=torch.tensor([sum(positions, [])], device=device)).logits[0]
    assert cache.lengths == {i: len(p) for i, p in enumerate(prompts)}
    assert model.config._attn_implementation != ragged.ATTENTION  # put back after the forward
    for piece, expected in zip(pieces, solo):
        torch.testing.assert_close(logits[piece.offset + piece.count - 1], expected, rtol=1e-4, atol=1e-4)


def test_a_ragged_batch_answers_as_each_request_alone(engine):
    solo = {p: alone(engine, p, 12) for p in OPENINGS}
    engine.prefix_cache.clear()
    events = Events()
    batch = engine.batch(events.append)
    batch.submit(submit("0", OPENINGS[0], 12))
    batch.step()  # alone: the lone path
    batch.submit(submit("1", OPENINGS[1], 12))
    batch.submit(submit("2", OPENINGS[2], 12))
    batch.step()  # two join: the first one's columns move into the ragged cache
    assert isinstance(engine.cache, ragged.RaggedCache) and len(batch.running) == 3
    batch.submit(submit("3", OPENINGS[3], 12))
    run_to_end(batch)
    for i, prompt in enumerate(OPENINGS):
        assert list(events.done(str(i)).token_ids) == solo[prompt]  # tiny model: no near ties
        assert events.streamed(str(i)) == events.done(str(i)).text
    assert engine.cache is None


def test_a_preempted_sequence_is_computed_again_and_answers_as_alone(engine, monkeypatch):
    """A 64-token budget (4 blocks) for two answers of 40 tokens: the newer one is preempted,
    waits, is computed again from its prompt and tokens so far, and its stream goes on."""
    solo = {p: alone(engine, p, 40) for p in OPENINGS[:2]}
    engine.prefix_cache.clear()
    monkeypatch.setattr(engine.split, "context", 64)
    try:
        events = Events()
        batch = engine.batch(events.append)
        batch.submit(submit("old", OPENINGS[0], 40))
        batch.submit(submit("new", OPENINGS[1], 40))
        batch.step()
        assert len(batch.running) == 2
        preempted_with = None
        while batch.busy:
            batch.step()
            assert batch.status().kv_blocks <= batch.budget_blocks
            if batch.preemptions and preempted_with is None:
                preempted_with = len(batch.waiting[0].tokens)
                assert batch.waiting[0].request_id == "new" and batch.waiting[0].slot is None
        assert preempted_with and 0 < preempted_with < 40
        for name, prompt in (("old", OPENINGS[0]), ("new", OPENINGS[1])):
            done = events.done(name)
            assert list(done.token_ids) == solo[prompt] and done.new_tokens == 40
            assert events.streamed(name) == done.text  # nothing streamed twice
        assert sum(isinstance(e, ev.RequestStarted) for e in events) == 2
    finally:
        engine.prefix_cache.clear()


def chat(question: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def sharing_prefixes(engine):
    """The answer alone to a question after SYSTEM, then an empty prefix cache, its counters as
    they stand, and a fresh batch: (expected tokens, prefix cache, hits, tokens reused, events, batch)."""
    expected = alone(engine, chat("Name a fruit."), 8, raw=False)
    engine.prefix_cache.clear()
    prefix = engine.prefix_cache
    events = Events()
    return expected, prefix, prefix.hits, prefix.tokens_reused, events, engine.batch(events.append)


def test_a_kept_prefix_is_copied_gives_the_same_tokens_and_is_counted(engine):
    expected, prefix, hits, reused, events, batch = sharing_prefixes(engine)
    batch.submit(ev.Submit("first", tuple(chat("Name a colour.")), {"max_new_tokens": 8}))
    run_to_end(batch)
    assert prefix.blocks > 0 and prefix.hits == hits
    batch.submit(ev.Submit("second", tuple(chat("Name a fruit.")), {"max_new_tokens": 8}))
    run_to_end(batch)
    assert prefix.hits == hits + 1
    shared = len(engine.tokenizer(SYSTEM)["input_ids"]) // ragged.BLOCK * ragged.BLOCK
    assert prefix.tokens_reused - reused >= shared > 0
    assert list(events.done("second").token_ids) == expected
    status = batch.status()
    assert status.prefix_hits == prefix.hits and status.prefix_tokens_reused == prefix.tokens_reused
    # In a batch beside another request, a hit is copied into the ragged cache the same way.
    events = Events()
    batch = engine.batch(events.append)
    batch.submit(submit("beside", OPENINGS[1], 30))
    batch.step()
    batch.submit(ev.Submit("third", tuple(chat("Name a fruit.")), {"max_new_tokens": 8}))
    run_to_end(batch)
    assert prefix.hits == hits + 2
    assert list(events.done("third").token_ids) == expected
    engine.prefix_cache.clear()


def test_a_running_sequence_offers_its_prefix_to_a_request_that_shares_it(engine):
    expected, prefix, hits, reused, events, batch = sharing_prefixes(engine)
    batch.submit(ev.Submit("first", tuple(chat("Name a colour.")), {"max_new_tokens": 30}))
    batch.step()  # the first one answers; nothing kept yet
    assert prefix.blocks == 0 and prefix.hits == hits
    batch.submit(ev.Submit("second", tuple(chat("Name a fruit.")), {"max_new_tokens": 8}))
    batch.step()
    assert prefix.hits == hits + 1 and len(batch.running) == 2  # copied from the first one's cache
    shared = len(engine.tokenizer(SYSTEM)["input_ids"]) // ragged.BLOCK * ragged.BLOCK
    assert prefix.tokens_reused - reused >= shared > 0
    run_to_end(batch)
    assert list(events.done("second").token_ids) == expected
    engine.prefix_cache.clear()


def test_a_short_request_starts_beside_a_long_one_without_waiting_for_it(engine):
    """Padded to one width, a 200-token answer and a short one did not fit 256 tokens together
    ((1 + 1) x 210 > 256): the short one waited for the long one. By blocks held it starts at
    the next step."""
    engine.prefix_cache.clear()
    events = Events()
    batch = engine.batch(events.append)
    batch.submit(submit("long", OPENINGS[1], 200))
    batch.step()
    batch.submit(submit("short", "Hi", 5))
    batch.step()
    assert events.started("short") and len(batch.running) == 2
    for _ in range(10):  # the short one's five tokens, while the long one goes on
        if any(isinstance(e, ev.GenerationDone) and e.request_id == "short" for e in events):
            break
        batch.step()
    assert not any(isinstance(e, ev.GenerationDone) and e.request_id == "long" for e in events)
    batch.cancel("long")
    assert not batch.busy


def test_migration_moves_every_sequences_cache_and_telemetry_counts_it(engine):
    solo = {p: alone(engine, p, 16) for p in OPENINGS[:2]}
    engine.prefix_cache.clear()
    events = Events()
    batch = engine.batch(events.append)
    batch.submit(submit("a", OPENINGS[0], 16))
    batch.submit(submit("b", OPENINGS[1], 16))
    for _ in range(3):
        batch.step()
    cache = engine.cache
    assert isinstance(cache, ragged.RaggedCache)
    held = sum(engine.kv_bytes_by_device().values())
    layer_bytes = sum(t.numel() * t.element_size() for layer in cache.layers
                      for rows in (layer.key_rows, layer.value_rows) for t in rows.values())
    assert held == layer_bytes > 0
    source = engine.placement.layer_devices[0]
    target = next(d.name for d in engine.devices if d.name != source)
    result = engine.migrate(0, 1, target)
    assert result.bytes > 0 and engine.placement.layer_devices[0] == target
    run_to_end(batch)
    for name, prompt in (("a", OPENINGS[0]), ("b", OPENINGS[1])):
        assert list(events.done(name).token_ids) == solo[prompt]
    engine.migrate(0, 1, source)


def test_the_prefix_cache_keeps_whole_blocks_finds_the_longest_and_evicts_the_oldest():
    block = ragged.BLOCK
    kv = lambda n: [(torch.full((1, 2, n, 4), float(n)), torch.full((1, 2, n, 4), -float(n)))]
    cache = PrefixCache()
    first = list(range(3 * block + 5))
    cache.keep(first, kv(len(first)), room=10)
    assert cache.blocks == 3
    hit = cache.find(first[:2 * block] + [999] * block)
    assert hit is not None and hit.tokens == 2 * block and (cache.hits, cache.misses) == (1, 0)
    assert hit.layers()[0][0].shape[2] == 2 * block
    assert cache.find([7] * (2 * block)) is None and cache.misses == 1
    assert cache.find(first[:block]) is None  # the last token is always computed: no whole block before it
    other = [5000 + t for t in range(2 * block)]
    cache.keep(other, kv(len(other)), room=4)  # 3 + 2 > 4: the oldest goes
    assert cache.blocks == 2 and cache.find(first) is None and cache.find(other + [1]).tokens == 2 * block
    longer = other + [6000 + t for t in range(block)]
    cache.keep(longer, kv(len(longer)), room=4)  # it extends the kept one, which is dropped
    assert cache.blocks == 3 and len(cache.entries) == 1
    # A running sequence's blocks, longer than what is kept, are taken from it; nothing is kept.
    running = longer + [7000 + t for t in range(2 * block)]
    hit = cache.find(running + [1], [(running[:4 * block + 3], lambda: kv(4 * block + 3))])
    assert hit.tokens == 4 * block and hit.layers()[0][0].shape[2] == 4 * block and cache.blocks == 3
    assert cache.find(longer + [1], [(running, lambda: kv(len(running)))]).tokens == 3 * block  # the prompt's own blocks
    assert shared_blocks(running, running[:block] + [0] * block, 5) == 1 and shared_blocks(running, running, 2) == 2


def test_metrics_show_the_prefix_cache_and_preemptions():
    from vramancer.server.metrics import ServerMetrics

    metrics = ServerMetrics()
    metrics.on_event(ev.BatchStatus(1, 0, 5.0, 40, 256, kv_blocks=3, kv_budget_blocks=16, preemptions=2,
                                    prefix_hits=4, prefix_misses=1, prefix_tokens_reused=128))
    text = metrics.text().decode()
    for line in ("vramancer_prefix_cache_hits_total 4.0", "vramancer_prefix_cache_misses_total 1.0",
                 "vramancer_prefix_cache_reused_tokens_total 128.0", "vramancer_preemptions_total 2.0",
                 'vramancer_kv_blocks{kind="held"} 3.0', 'vramancer_kv_blocks{kind="budget"} 16.0'):
        assert line in text
