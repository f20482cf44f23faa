"""A KV cache whose rows are not padded to one width: each sequence keeps its own keys and
values in every layer, grown a block of columns at a time, and a batch forward runs all the
sequences' new tokens together through the linear layers while each sequence attends only to
its own keys and values.

How a step runs: the tokens of every sequence (one for a decoding one, a prompt or a chunk of
one for a newcomer) are laid end to end as one row, with each token's own position, so the
projections, norms and MLPs see one [1, tokens, hidden] tensor. A step of decoding sequences
only (one token each) lays them as rows instead, [sequences, 1, hidden], the shape our CPU
kernels' few-rows paths and fused layers take (kernels/cpu/few_rows.py, fused_layer.py). The
cache's `update` writes each sequence's new keys and values into its own buffer, on the layer's
device, and the attention registered here (`ATTENTION`) then runs, for each sequence, the
attention the model was loaded with (SDPA, our CPU kernels' or eager) on that sequence's
queries and its own keys and values: the same call, in the same shapes, as the sequence alone
would make.

A decode step of several sequences is the one that runs most, so it costs one call per layer
on our CPU kernels, whatever the number of sequences: `write_columns` puts every row's new keys
(and values) into its buffer, and `ragged_decode_attention` attends every row over its own
buffer's first positions; what is the same in every layer (slots, columns, lengths) is set once
per step. A fused layer (kernels/cpu/fused_layer.py) takes the same buffers from
`attended_rows` and runs the whole decode step in its two calls. A row's attention computes
exactly what `decode_attention` computes for that sequence alone.

Everything that handles a cache layer generically (migration's `move_cache`, the KV
telemetry: `model.architecture.cache_tensors`) sees each layer's two dicts of buffers, so
it moves and counts every sequence's memory as it is held.

Only for models whose every layer is plain full attention through transformers' attention
interface (`ragged_reason` says why not): sliding windows, recurrent states and remote layers
run one sequence at a time.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from vramancer.kernels.cpu import build as cpu_kernels
from vramancer.kernels.cpu import few_rows
from vramancer.kernels.cpu.modules import ATTENTION as CPU_ATTENTION, one_query_on_kernels

BLOCK = 16  # KV columns a sequence's cache grows by, and the unit the budget is counted in
ATTENTION = "vramancer_ragged"  # the name the per-sequence attention is registered under
# Attention implementations whose masks we know how to make for a chunk that has tokens before it.
# Ours on the CPU takes SDPA's masks (it hands masked calls to it).
KNOWN_ATTENTION = {"sdpa": "bool", CPU_ATTENTION: "bool", "eager": "additive"}

_running: contextvars.ContextVar[RaggedCache | None] = contextvars.ContextVar("vramancer_ragged", default=None)


def blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK)


@dataclass(frozen=True)
class Piece:
    """One sequence's part of a step: `count` new tokens at `offset` in row `row` of the step's
    input, after the `past` tokens its cache already holds."""

    slot: int
    offset: int
    count: int
    past: int
    row: int = 0


class RaggedLayer:
    """One decoder layer's cache: a [1, kv_heads, capacity, dim] buffer of keys and one of
    values per sequence (by slot), each on the layer's device."""

    is_sliding = False
    is_initialized = True

    def __init__(self) -> None:
        self.key_rows: dict[int, torch.Tensor] = {}
        self.value_rows: dict[int, torch.Tensor] = {}
        # A decode step's buffers, in the step's row order (`write_rows`), for its attention.
        self.step_keys: list[torch.Tensor] = []
        self.step_values: list[torch.Tensor] = []

    @staticmethod
    def _room(rows: dict[int, torch.Tensor], slot: int, past: int, end: int, capacity: int,
              like: torch.Tensor) -> torch.Tensor:
        """`slot`'s buffer in `rows`, grown to `capacity` columns (at least `end`) on `like`'s
        device when it is shorter (one copy a block), its first `past` columns kept."""
        buffer = rows.get(slot)
        if buffer is None or buffer.shape[-2] < end or buffer.device != like.device:
            grown = like.new_empty(1, like.shape[1], max(capacity, end), like.shape[-1])
            if buffer is not None and past:
                grown[:, :, :past] = buffer[:, :, :past].to(like.device)
            rows[slot] = buffer = grown
        return buffer

    def write(self, slot: int, past: int, capacity: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put `keys`/`values` [1, heads, n, dim] at columns past..past+n of `slot`, growing its
        buffers to `capacity` columns when they are shorter."""
        end = past + keys.shape[-2]
        for rows, new in ((self.key_rows, keys), (self.value_rows, values)):
            self._room(rows, slot, past, end, capacity, new)[:, :, past:end] = new

    def write_rows(self, slots: list[int], columns: list[int], capacity: dict[int, int], keys: torch.Tensor,
                   values: torch.Tensor) -> None:
        """A decode step's new keys/values [rows, heads, 1, dim]: row i at column `columns[i]` of
        `slots[i]`, each buffer grown first where it must; on our kernels one call for all rows."""
        self.step_keys = [self._room(self.key_rows, slot, column, column + 1, capacity[slot], keys)
                          for slot, column in zip(slots, columns)]
        self.step_values = [self._room(self.value_rows, slot, column, column + 1, capacity[slot], values)
                            for slot, column in zip(slots, columns)]
        ops = cpu_kernels.kernels() if keys.device.type == "cpu" and keys.dtype == torch.float32 else None
        if ops is not None and keys.stride(-1) == 1 and values.stride(-1) == 1 and values.dtype == torch.float32:
            ops.write_columns(self.step_keys, columns, keys)
            ops.write_columns(self.step_values, columns, values)
            return
        for i, column in enumerate(columns):
            self.step_keys[i][:, :, column:column + 1] = keys[i:i + 1]
            self.step_values[i][:, :, column:column + 1] = values[i:i + 1]

    def read(self, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.key_rows[slot][:, :, :length], self.value_rows[slot][:, :, :length]

    def put(self, slot: int, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        """Give `slot` these keys/values [1, heads, n, dim] (copied), with room for `capacity`."""
        self.key_rows.pop(slot, None)
        self.value_rows.pop(slot, None)
        self.write(slot, 0, capacity, keys, values)

    def drop(self, slot: int) -> None:
        self.key_rows.pop(slot, None)
        self.value_rows.pop(slot, None)

    def get_seq_length(self) -> int:
        return max((t.shape[-2] for t in self.key_rows.values()), default=0)


class RaggedCache(Cache):
    """Every sequence's keys and values, per layer, by slot. `lengths[slot]` tokens are held;
    `capacity[slot]` columns are allowed (whole blocks, counted by the scheduler's budget)."""

    def __init__(self, layers: int, attention: str):
        super().__init__(layers=[RaggedLayer() for _ in range(layers)])
        self.attention = attention  # the implementation the model was loaded with
        self.lengths: dict[int, int] = {}
        self.capacity: dict[int, int] = {}
        self.pieces: list[Piece] = []  # the step being run
        # A step of several decoding sequences laid as rows (one token each): their slots, the
        # column each writes, the positions each then attends (fixed for the step, not per layer).
        self.row_slots: list[int] = []
        self.row_columns: list[int] = []
        self.row_lengths: list[int] = []
        self._layer = 0  # the layer whose attention runs next (its update came just before)
        self.configs: list | None = None  # the model's configs whose attention is switched for a step

    @property
    def slots(self) -> list[int]:
        return list(self.lengths)

    def add(self, slot: int) -> None:
        self.lengths[slot] = 0
        self.capacity.setdefault(slot, 0)

    def remove(self, slot: int) -> None:
        self.lengths.pop(slot, None)
        self.capacity.pop(slot, None)
        for layer in self.layers:
            layer.drop(slot)

    def put(self, slot: int, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Give `slot` (held nothing yet) these keys/values per layer, [1, heads, n, dim] each."""
        length = layers[0][0].shape[-2]
        for layer, (keys, values) in zip(self.layers, layers):
            layer.put(slot, keys, values, self.capacity[slot])
        self.lengths[slot] = length

    def adopt(self, slot: int, buffers: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
        """Make these per-layer buffers [1, heads, >= length, dim] `slot`'s own, as they are (no
        copy): a lone sequence's cache with spare columns becomes its ragged buffers."""
        for layer, (keys, values) in zip(self.layers, buffers):
            layer.key_rows[slot], layer.value_rows[slot] = keys, values
        self.lengths[slot] = length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        self._layer = layer_idx
        if self.row_slots:
            layer.write_rows(self.row_slots, self.row_columns, self.capacity, key_states, value_states)
            return key_states, value_states
        for piece in self.pieces:
            row, end = slice(piece.row, piece.row + 1), piece.offset + piece.count
            layer.write(piece.slot, piece.past, self.capacity[piece.slot],
                        key_states[row, :, piece.offset:end], value_states[row, :, piece.offset:end])
        if len(self.pieces) == 1:  # a layer that attends by itself (a fused step) gets the whole row
            piece = self.pieces[0]
            return layer.read(piece.slot, piece.past + piece.count)
        return key_states, value_states

    def attended_rows(self, layer_idx: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]] | None:
        """In a step of several decoding sequences laid as rows, after this layer's `update`:
        each row's key and value buffers and how many of their positions it attends. None in
        any other step. A layer that attends by itself (kernels/cpu/fused_layer.py) asks it."""
        if not self.row_slots:
            return None
        layer = self.layers[layer_idx]
        return layer.step_keys, layer.step_values, self.row_lengths

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.lengths.values(), default=0)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return query_length + self.get_seq_length(), 0

    @property
    def is_compileable(self) -> bool:
        return False

    def held_tokens(self) -> int:
        return sum(self.lengths.values())


def _mask(piece: Piece, style: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """The causal mask of a piece's queries over its keys (past + count), aligned at the end;
    None where the attention alone would take none (one query, or no past under SDPA)."""
    if piece.count == 1 or (piece.past == 0 and style == "bool"):
        return None
    query = torch.arange(piece.count, device=device)[:, None] + piece.past
    allowed = torch.arange(piece.past + piece.count, device=device)[None, :] <= query
    if style == "bool":
        return allowed[None, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)[
        None, None]


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Each sequence's queries over its own keys and values, with the model's own attention."""
    cache = _running.get()
    if cache is None:
        raise RuntimeError("the ragged attention ran outside a ragged forward")
    layer = cache.layers[cache._layer]
    style = KNOWN_ATTENTION[cache.attention]
    # Beside others, a decoding sequence's one query goes through our decode-attention kernel
    # (float32 on the CPU, SDPA's or our attention): one call of a few microseconds, where
    # SDPA's own overhead is tens of them, for every sequence and layer. Alone, a sequence
    # keeps the model's own (a float32 one SDPA, so its answer is plain transformers').
    ops = (cpu_kernels.kernels() if len(cache.pieces) > 1 and cache.attention in (CPU_ATTENTION, "sdpa")
           and "attention" in few_rows.enabled and one_query_on_kernels(query[:1, :, :1], dropout, kwargs) else None)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if ops is not None and cache.row_slots:  # decoding sequences as rows: one call for them all
        return ops.ragged_decode_attention(query, layer.step_keys, layer.step_values, cache.row_lengths, scale), None
    own = ALL_ATTENTION_FUNCTIONS.get_interface(cache.attention, None)
    outputs = []
    for piece in cache.pieces:
        keys, values = layer.read(piece.slot, piece.past + piece.count)
        rows = query[piece.row:piece.row + 1, :, piece.offset:piece.offset + piece.count]
        if ops is not None and piece.count == 1:
            outputs.append(ops.decode_attention(rows, keys, values, scale))
            continue
        mask = _mask(piece, style, query.dtype, query.device)
        out, _ = own(module, rows, keys, values, mask, dropout=dropout, scaling=scaling, **kwargs)
        outputs.append(out)  # [1, count, heads, dim]
    if len(outputs) == 1:
        return outputs[0], None
    return torch.cat(outputs, dim=0 if query.shape[0] > 1 else 1), None


AttentionInterface.register(ATTENTION, _attention)


def _configs(model) -> list:
    seen: dict[int, object] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            seen.setdefault(id(config), config)
    return list(seen.values())


@contextlib.contextmanager
def ragged_forward(model, cache: RaggedCache, pieces: list[Piece]):
    """While it lasts, `model`'s attention runs per sequence over `cache` for these pieces; after
    it, each piece's tokens count as held."""
    if cache.configs is None:  # the model's configs, found once per cache (a walk of every module)
        cache.configs = _configs(model)
    configs = cache.configs
    before = [config._attn_implementation for config in configs]
    cache.pieces = pieces
    if len(pieces) > 1 and all(p.count == 1 and p.row == i for i, p in enumerate(pieces)):
        cache.row_slots = [p.slot for p in pieces]
        cache.row_columns = [p.past for p in pieces]
        cache.row_lengths = [p.past + 1 for p in pieces]
    token = _running.set(cache)
    try:
        for config in configs:
            config._attn_implementation_internal = ATTENTION
        yield
        for piece in pieces:
            cache.lengths[piece.slot] = piece.past + piece.count
    finally:
        for config, name in zip(configs, before):
            config._attn_implementation_internal = name
        _running.reset(token)
        cache.pieces = []
        cache.row_slots, cache.row_columns, cache.row_lengths = [], [], []
        for layer in cache.layers:  # the step's lists of buffers go, so a leaving sequence's memory goes with it
            layer.step_keys, layer.step_values = [], []


def ragged_reason(engine) -> str | None:
    """Why this model's sequences cannot share a ragged batch, or None when they can."""
    model = engine.model
    if engine.connected:
        return "some of its layers run on other machines, which keep their own caches"
    if any(type(layer) is not DynamicLayer for layer in DynamicCache(config=model.config).layers):
        return "not every layer keeps a plain full-attention cache (sliding windows or recurrent states)"
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return "it takes no position ids, so a batch's tokens would get the wrong positions"
    implementations = {config._attn_implementation for config in _configs(model)}
    if not implementations or not implementations <= set(KNOWN_ATTENTION):
        return f"its attention ({', '.join(sorted(map(str, implementations)))}) cannot be run sequence by sequence here"
    return None


__all__ = ["ATTENTION", "BLOCK", "Piece", "RaggedCache", "RaggedLayer", "blocks_for", "ragged_forward",
           "ragged_reason"]
