"""Keys and values of prompt prefixes kept after their sequences leave, so a request that starts
with the same tokens (a chat template's system prompt, a conversation's earlier turns) copies
them instead of computing them again.

What is kept is whole blocks (ragged.BLOCK tokens) of a sequence's cache, from its first token:
an entry holds the KV of its first n blocks, in every layer, on that layer's device. Each block
is known by a hash of its tokens chained with the hash of the blocks before it, so a block's
hash names the whole prefix up to it; the index maps every such hash to the entry that holds
it. A lookup walks the prompt's block hashes and takes the longest kept prefix (its tokens are
compared, so a hash collision is never a wrong hit). It always leaves at least the prompt's last
token to be computed, since the first answer token comes from its logits.

Sequences still running offer their whole blocks too (`find`'s `running`): a request that
shares a prefix with one answering now (eight clients with one system prompt, arriving while the
first one answers) copies it from that sequence's own cache, which costs no memory beyond the
copy the newcomer holds anyway.

The kept blocks count in the scheduler's KV budget (the memory model's `--context` tokens) with
the running sequences' blocks: when a sequence needs room, the least recently used entries go
first, then sequences are preempted. An entry that another one extends is dropped (the longer
one holds its blocks too).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from vramancer.scheduling.ragged import BLOCK


def block_hashes(tokens: list[int], blocks: int) -> list[int]:
    """The chained hash of each of the first `blocks` whole blocks of `tokens`."""
    hashes, previous = [], 0
    for i in range(blocks):
        previous = hash((previous, tuple(tokens[i * BLOCK:(i + 1) * BLOCK])))
        hashes.append(previous)
    return hashes


def shared_blocks(tokens: list[int], other: list[int], most: int) -> int:
    """How many whole blocks `tokens` and `other` share from their start (at most `most`)."""
    blocks = min(most, len(other) // BLOCK)
    for i in range(blocks):
        if tokens[i * BLOCK:(i + 1) * BLOCK] != other[i * BLOCK:(i + 1) * BLOCK]:
            return i
    return blocks


@dataclass(eq=False)
class Entry:
    tokens: list[int]  # whole blocks
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [1, heads, len(tokens), dim]
    hashes: list[int] = field(default_factory=list)

    @property
    def blocks(self) -> int:
        return len(self.tokens) // BLOCK


@dataclass(frozen=True)
class Hit:
    entry: Entry
    tokens: int  # how many of the prompt's first tokens it holds

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(k[:, :, :self.tokens], v[:, :, :self.tokens]) for k, v in self.entry.layers]


class PrefixCache:
    """Kept prefixes, least recently used first, with their hit/miss counts."""

    def __init__(self) -> None:
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # by the hash of its last block
        self.index: dict[int, tuple[Entry, int]] = {}  # block hash -> (entry, blocks up to it)
        self.hits = 0
        self.misses = 0
        self.tokens_reused = 0

    @property
    def blocks(self) -> int:
        return sum(e.blocks for e in self.entries.values())

    def find(self, tokens: list[int], running: Iterable[tuple[list[int], Callable[[], list]]] = ()) -> Hit | None:
        """The longest kept prefix of `tokens` (all but the last token at most), counted as a
        hit or a miss. `running`: what running sequences hold, as (the tokens their caches hold,
        a function giving their per-layer keys/values); a longer prefix there is taken from them."""
        most = (len(tokens) - 1) // BLOCK
        best = None
        for blocks, h in enumerate(block_hashes(tokens, most), start=1):
            found = self.index.get(h)
            if found is None:
                break
            entry, upto = found
            if upto != blocks or entry.tokens[:blocks * BLOCK] != tokens[:blocks * BLOCK]:
                break
            best = Hit(entry, blocks * BLOCK)
        kept = best
        for held, layers in running:
            shared = shared_blocks(tokens, held, most)
            if shared and shared * BLOCK > (best.tokens if best else 0):
                best = Hit(Entry(held[:shared * BLOCK], layers()), shared * BLOCK)  # not kept: read at once
        if best is None:
            self.misses += 1
            return None
        self.hits += 1
        self.tokens_reused += best.tokens
        if best is kept:
            self.entries.move_to_end(best.entry.hashes[-1])
        return best

    def keep(self, tokens: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]], room: int) -> None:
        """Keep the whole blocks of a leaving sequence's cache: `tokens` are the ones its cache
        holds, `layers` per layer keys/values [1, heads, >= len(tokens), dim]. `room`: the
        blocks kept prefixes may hold in all (what the running sequences leave of the budget);
        the least recently used entries go to make room, and a prefix longer than `room` is
        not kept."""
        blocks = len(tokens) // BLOCK
        if blocks == 0:
            return
        hashes = block_hashes(tokens, blocks)
        found = self.index.get(hashes[-1])
        if found is not None and found[1] == blocks and found[0].tokens == tokens[:blocks * BLOCK]:
            self.entries.move_to_end(found[0].hashes[-1])  # already kept, perhaps inside a longer one
            return
        if blocks > room:
            return
        for entry in [self.entries[h] for h in hashes if h in self.entries]:  # entries that are prefixes of it
            self._drop(entry)
        self.evict(self.blocks + blocks - room)
        n = blocks * BLOCK
        entry = Entry(tokens[:n], [(k[:, :, :n].clone(), v[:, :, :n].clone()) for k, v in layers], hashes)
        self.entries[hashes[-1]] = entry
        for i, h in enumerate(hashes, start=1):
            self.index[h] = (entry, i)

    def evict(self, blocks: int) -> int:
        """Drop the least recently used entries until `blocks` are freed (or none is left);
        returns the blocks freed."""
        freed = 0
        while freed < blocks and self.entries:  # (blocks <= 0: nothing to free)
            entry = next(iter(self.entries.values()))
            freed += entry.blocks
            self._drop(entry)
        return freed

    def clear(self) -> None:
        self.entries.clear()
        self.index.clear()

    def follow(self, devices: list[torch.device]) -> None:
        """Each layer's kept keys and values onto `devices[layer]` (the split changed)."""
        for entry in self.entries.values():
            entry.layers = [(k.to(d), v.to(d)) if k.device != d else (k, v) for (k, v), d in zip(entry.layers, devices)]

    def bytes_by_layer(self) -> list[int]:
        """Bytes kept per layer (read from the telemetry thread: sizes only, from copies of the lists)."""
        sizes: list[int] = []
        for entry in list(self.entries.values()):
            for i, (k, v) in enumerate(list(entry.layers)):
                if i == len(sizes):
                    sizes.append(0)
                sizes[i] += k.numel() * k.element_size() + v.numel() * v.element_size()
        return sizes

    def _drop(self, entry: Entry) -> None:
        self.entries.pop(entry.hashes[-1], None)
        for h in entry.hashes:
            if self.index.get(h, (None,))[0] is entry:
                del self.index[h]
        for other in self.entries.values():  # blocks it shared with another entry stay findable there
            for i, h in enumerate(other.hashes, start=1):
                self.index.setdefault(h, (other, i))


__all__ = ["Hit", "PrefixCache", "block_hashes", "shared_blocks"]
