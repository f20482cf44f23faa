"""The streamer's packed copies (runtime/streaming.py): a layer's tensors packed in one flat
buffer come back bit for bit, and a copy in pieces taken by two threads is the whole copy."""

from __future__ import annotations

import threading

import torch

from vramancer.runtime.streaming import (
    PACK_ALIGN,
    _pack_layout,
    _Packed,
    _Pieces,
    _unpack,
)


def test_a_packed_layer_comes_back_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, 5, generator=gen), torch.tensor(2.5, dtype=torch.float64),
               torch.randint(0, 2, (7,), generator=gen).bool(), torch.randn(4, 4, generator=gen).t(),
               torch.empty(0), torch.randn(9, generator=gen).to(torch.bfloat16)]
    views, loose, nbytes = _pack_layout(tensors)
    assert loose == [3, 4]  # the transposed one (not contiguous) and the empty one go tensor by tensor
    assert all(offset % PACK_ALIGN == 0 for _, offset, _, _, _ in views) and nbytes % PACK_ALIGN == 0
    flat = torch.zeros(nbytes, dtype=torch.uint8)
    for k, offset, size, _, _ in views:
        flat[offset:offset + size].copy_(tensors[k].reshape(-1).view(torch.uint8))
    packed = _Packed(flat, views, loose)
    back = _unpack(flat.clone(), packed, [tensors[k] for k in loose], len(tensors))
    for original, copy in zip(tensors, back):
        assert copy.dtype == original.dtype and copy.shape == original.shape
        assert torch.equal(copy, original)


def test_a_copy_in_pieces_shared_by_two_threads_is_whole():
    src = torch.randint(0, 256, (10 * 1000 + 7,), dtype=torch.uint8)
    dst = torch.zeros_like(src)
    pieces = _Pieces(dst, src, piece=1000)  # 11 pieces, the last one short
    helper = threading.Thread(target=pieces.work)
    helper.start()
    pieces.work()
    helper.join()
    assert pieces.done.is_set() and torch.equal(dst, src)
    empty = _Pieces(torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8))
    assert empty.done.is_set()


def test_each_module_of_a_packed_layer_is_one_run_of_its_buffer():
    from torch import nn

    from vramancer.runtime.streaming import _slots, _units

    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3, bias=False))
    slots = _slots(layer)
    views, loose, nbytes = _pack_layout([t for _, _, t in slots])
    assert not loose
    flat = torch.zeros(nbytes, dtype=torch.uint8)
    for k, offset, size, _, _ in views:
        flat[offset:offset + size].copy_(slots[k][2].detach().reshape(-1).view(torch.uint8))
    homes = _unpack(flat, _Packed(flat, views, loose), [], len(slots))
    units = _units(0, [(owner, name, home) for (owner, name, _), home in zip(slots, homes)], flat)
    assert [unit.module for unit in units] == [layer[0], layer[1], layer[2]]
    assert sum(unit.nbytes for unit in units) <= nbytes
    for unit in units:
        staging = unit.source.clone()  # what a turn copies: the run alone, read through the layout
        for name, (offset, dtype, shape) in zip(unit.names, unit.layout):
            size = torch.empty((), dtype=dtype).element_size() * torch.Size(shape).numel()
            assert torch.equal(staging[offset:offset + size].view(dtype).view(shape), getattr(unit.module, name))


def test_the_compute_side_puts_every_piece_in_place_without_waiting_for_a_stalled_thread():
    src = torch.randint(0, 256, (5 * 100,), dtype=torch.uint8)
    dst = torch.zeros_like(src)
    pieces = _Pieces(dst, src, piece=100)
    with pieces._lock:  # a copy thread takes the first piece, then is not scheduled again for a while
        pieces._next, pieces._writers = 1, 1
        pieces.quiet.clear()
    pieces.finish()  # returns at once, the stalled piece copied here as well
    assert torch.equal(dst, src) and pieces.done.is_set() and not pieces.quiet.is_set()
    pieces._copy(0)  # the thread runs again and writes the same bytes
    assert torch.equal(dst, src) and pieces.quiet.is_set()
