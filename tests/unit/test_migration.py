"""Live migration on the tiny model: placement, room checks, rollback, mid-generation moves."""

import pytest

from vramancer.engine import Engine
from vramancer.runtime.migration import MigrationFailed, MigrationRefused
from vramancer.runtime.split_model import SplitModel

PROMPT = "Tell me about the sea."


@pytest.fixture
def engine(tiny_model_dir):
    engine = Engine.load(tiny_model_dir, "sim:3x64MiB", context=256)
    yield engine
    engine.close()


def blocks(engine):
    return [(b.layers.first, b.layers.last, b.device) for b in engine.placement.blocks()]


def greedy(engine, **kwargs):
    return engine.generate(PROMPT, max_new_tokens=16, **kwargs).token_ids


def ledgers(engine):
    return {d.name: dict(d.ledger.claims) for d in engine.devices}


def test_migrate_a_range_moves_weights_and_reports_the_copy(engine):
    before = greedy(engine)
    result = engine.migrate(0, 2, "sim2")
    assert blocks(engine) == [(0, 2, "sim2"), (3, 5, "sim1")]
    assert result.src == "sim1" and result.dst == "sim2"
    assert result.bytes == sum(engine.profile.layer_bytes[:3]) and result.seconds > 0
    link = {(l.src, l.dst): l for l in engine.link_stats()}[("sim1", "sim2")]
    assert link.bytes >= result.bytes
    # The weights really live in new storage now, and the answer is unchanged.
    assert greedy(engine) == before


def test_range_spanning_devices_and_several_blocks_per_device(engine):
    before = greedy(engine)
    engine.migrate(2, 3, "sim0")
    assert blocks(engine) == [(0, 1, "sim1"), (2, 3, "sim0"), (4, 5, "sim1")]
    engine.migrate(1, 4, "sim2")  # spans sim1 and sim0
    assert blocks(engine) == [(0, 0, "sim1"), (1, 4, "sim2"), (5, 5, "sim1")]
    assert greedy(engine) == before


def test_embed_and_head_move_and_retie(engine):
    before = greedy(engine)
    assert engine.placement.head == "sim0" and engine.split.tied  # planned beside the embeddings
    engine.migrate("head", "head", "sim2")
    assert not engine.split.tied  # embed on sim0, head on sim2: separate copies
    assert engine.device("sim2").ledger.claims["weights"] > 0
    assert greedy(engine) == before
    engine.migrate("head", "head", "sim0")
    assert engine.placement.head == "sim0" and engine.split.tied
    assert engine.device("sim2").ledger.claims["weights"] == 0
    engine.migrate("embed", "embed", "sim1")
    assert engine.placement.embed == "sim1" and not engine.split.tied
    assert greedy(engine) == before


def test_migration_without_room_is_refused_and_changes_nothing(tiny_model_dir):
    engine = Engine.load(tiny_model_dir, "sim:64MiB,13MiB,64MiB", context=256)
    before_blocks, before_tokens, before_ledgers = blocks(engine), greedy(engine), ledgers(engine)
    with pytest.raises(MigrationRefused) as err:
        engine.migrate("embed", "embed", "sim1")
    sentence = str(err.value)
    assert "does not fit on sim1" in sentence and "more" in sentence and "free" in sentence
    assert blocks(engine) == before_blocks and ledgers(engine) == before_ledgers
    assert greedy(engine) == before_tokens


def test_failure_part_way_rolls_everything_back(engine, monkeypatch):
    engine.migrate(3, 5, "sim0")
    before_blocks, before_tokens, before_ledgers = blocks(engine), greedy(engine), ledgers(engine)
    real_move = SplitModel.move_layers
    calls = []

    def failing_move(self, layers, dst, cache=None):
        calls.append(layers)
        if len(calls) == 2:  # one device's layers already copied when the other's fail
            raise RuntimeError("injected copy failure")
        return real_move(self, layers, dst, cache)

    monkeypatch.setattr(SplitModel, "move_layers", failing_move)
    with pytest.raises(MigrationFailed, match="injected copy failure"):
        engine.migrate(1, 5, "sim2")
    monkeypatch.setattr(SplitModel, "move_layers", real_move)
    assert blocks(engine) == before_blocks and ledgers(engine) == before_ledgers
    assert greedy(engine) == before_tokens


def test_a_block_moves_in_one_copy_into_new_memory(engine):
    """The layers of a move between simulated devices are copied together, in one recorded
    transfer, each weight into memory of its own that holds the original's values."""
    layers = engine.model.get_decoder().layers
    assert {engine.placement.device_of(i) for i in (3, 4, 5)} == {"sim1"}
    before = {(i, name): p.detach().clone() for i in (3, 4, 5) for name, p in layers[i].named_parameters()}
    old = {(i, name): p.data_ptr() for i in (3, 4, 5) for name, p in layers[i].named_parameters()}
    transfers = lambda: {(l.src, l.dst): l.transfers for l in engine.link_stats()}.get(("sim1", "sim0"), 0)
    count = transfers()
    result = engine.migrate(3, 5, "sim0")
    assert transfers() == count + 1, "one transfer for the block"
    moved = {(i, name): p for i in (3, 4, 5) for name, p in layers[i].named_parameters()}
    assert len({p.untyped_storage().data_ptr() for p in moved.values()}) == len(moved), "memory of its own"
    assert all(p.data_ptr() != old[key] and p.equal(before[key]) for key, p in moved.items())
    assert result.bytes == sum(engine.profile.layer_bytes[3:6])


def test_a_large_block_moves_in_batches_of_bounded_size(engine, monkeypatch):
    """Host memory holds a transfer's new copies before the old ones go: past
    MOVE_BATCH_BYTES of weights, a block goes in several transfers, the answer unchanged."""
    from vramancer.runtime import migration

    before = greedy(engine)
    monkeypatch.setattr(migration, "MOVE_BATCH_BYTES", engine.profile.layer_bytes[3] + 1)
    transfers = lambda: {(l.src, l.dst): l.transfers for l in engine.link_stats()}.get(("sim1", "sim0"), 0)
    count = transfers()
    result = engine.migrate(3, 5, "sim0")
    assert transfers() == count + 3 and result.bytes == sum(engine.profile.layer_bytes[3:6])
    assert greedy(engine) == before


def test_migrations_between_decode_steps_leave_greedy_output_unchanged(engine):
    expected = greedy(engine)
    schedule = {3: (0, 2, "sim0"), 6: ("head", "head", "sim1"), 9: (1, 5, "sim2"), 12: ("embed", "embed", "sim2")}
    moved_at = []

    def on_step(step):
        if step in schedule:
            first, last, device = schedule.pop(step)
            engine.migrate(first, last, device, step=step)
            moved_at.append(step)

    assert greedy(engine, on_step=on_step) == expected
    assert moved_at == [3, 6, 9, 12]
    kv_moved = [m for m in engine.migrations if m.step == 9][0]
    # Layers 1-5 carried their KV cache (9+ tokens of it) along with their weights.
    assert kv_moved.bytes > sum(engine.profile.layer_bytes[1:6])


def test_bad_ranges_and_devices_are_refused(engine):
    with pytest.raises(MigrationRefused, match="not in this model"):
        engine.migrate(4, 9, "sim0")
    with pytest.raises(MigrationRefused, match="not one of this model's devices"):
        engine.migrate(0, 1, "cuda:3")
