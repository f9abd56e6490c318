"""Searching a pool's tables (``SharedWords.find32``/``count32``, compiled and
pure Python, as ``aiocoloc.shm.pipes`` uses them): they find exactly the
entries a list of the table's numbers would, whatever the neighbouring
entries' bytes are, never outside the buffer, and new pipes take the free
entries."""

from __future__ import annotations

import os
import struct
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiocoloc.errors import PoolExhausted
from aiocoloc.shm import MemfdSegment, Pool, _atomic, _atomic_py
from aiocoloc.shm.layout import PoolConfig
from aiocoloc.shm.pipes import PipeTable

TWINS = [_atomic, _atomic_py]

# Owners (pipe slot + 1) whose bytes make straddling matches likely: zeros,
# small numbers (three zero bytes) and numbers that are one zero byte away.
_OWNERS = st.sampled_from([0, 1, 2, 255, 256, 0x10000, 0x1000000, 0xFFFFFFFF, 7, 0x100])


@pytest.mark.parametrize("twin", TWINS, ids=lambda m: m.IMPLEMENTATION)
@given(
    table=st.lists(_OWNERS, min_size=1, max_size=300),
    value=_OWNERS,
    limit=st.integers(min_value=-1, max_value=50),
    stride_words=st.integers(min_value=1, max_value=4),
)
def test_finds_and_counts_what_a_list_would(
    twin: ModuleType, table: list[int], value: int, limit: int, stride_words: int
) -> None:
    buffer = bytearray(struct.pack(f"=4I{len(table)}I", 9, 9, 9, 9, *table))
    words = twin.SharedWords(buffer)
    try:
        count = (len(table) + stride_words - 1) // stride_words
        seen = table[::stride_words]
        expected = [i for i, owner in enumerate(seen) if owner == value]
        if limit >= 0:
            expected = expected[:limit]
        assert words.find32(16, count, 4 * stride_words, value, limit) == expected
        assert words.count32(16, count, 4 * stride_words, value) == seen.count(value)
    finally:
        words.release()


@pytest.mark.parametrize("twin", TWINS, ids=lambda m: m.IMPLEMENTATION)
def test_a_match_across_two_entries_is_not_an_entry(twin: ModuleType) -> None:
    # 0x00000100 then 0x00000001: bytes 00 01 00 00 | 01 00 00 00 hold
    # "00 00 01 00" (0x00010000) straddling them, and no entry of it.
    words = twin.SharedWords(bytearray(struct.pack("=4I", 0x100, 1, 0, 0)))
    assert words.find32(0, 2, 4, 0x10000) == []
    assert words.find32(0, 4, 4, 0) == [2, 3]
    assert words.count32(0, 0, 4, 0) == 0 and words.find32(0, 0, 4, 0) == []
    words.release()


@pytest.mark.parametrize("twin", TWINS, ids=lambda m: m.IMPLEMENTATION)
def test_a_search_never_leaves_the_buffer(twin: ModuleType) -> None:
    """The offsets come from untrusted tables: out of bounds, unaligned or a
    bad stride is an error, never a read outside the buffer."""
    words = twin.SharedWords(bytearray(64))
    with pytest.raises(IndexError, match="outside or unaligned"):
        words.find32(0, 17, 4, 0)
    with pytest.raises(IndexError, match="outside or unaligned"):
        words.count32(60, 2, 4, 0)
    with pytest.raises(IndexError, match="outside or unaligned"):
        words.find32(2, 2, 4, 0)
    with pytest.raises(IndexError, match="outside or unaligned"):
        words.find32(-4, 1, 4, 0)
    with pytest.raises(ValueError, match="stride 6"):
        words.count32(0, 2, 6, 0)
    words.release()
    with pytest.raises(ValueError, match="released"):
        words.find32(0, 1, 4, 0)


def test_new_pipes_take_the_lowest_free_entries_until_none_is_left() -> None:
    config = PoolConfig(slice_size=4096, max_members=4, max_pipes=8, max_slices_per_pipe=4)
    pool = Pool.create(MemfdSegment.create(1 << 20), config)
    try:
        me = pool.slot
        handles = [pool.create_pipe(me, me) for _ in range(8)]
        assert [h.slot for h in handles] == list(range(8))
        assert not pool.has_room_for(1)
        with pytest.raises(PoolExhausted, match="no free pipe entry"):
            pool.create_pipe(me, me)
        for h in (handles[5], handles[2]):
            pool.destroy_pipe(h)
        assert pool.has_room_for(2) and not pool.has_room_for(3)
        assert [pool.create_pipe(me, me).slot for _ in range(2)] == [2, 5]
    finally:
        pool.close()


@pytest.mark.parametrize("pipes", [3, 40])  # counted one pipe at a time, and in one pass
def test_pipe_infos_list_every_pipe_in_use_with_its_slices(pipes: int) -> None:
    """``infos`` finds the entries in use in C: every active pipe, in slot
    order, with the slices it owns; freed entries are not listed."""
    config = PoolConfig(slice_size=4096, max_members=4, max_pipes=64, max_slices_per_pipe=8)
    pool = Pool.create(MemfdSegment.create(4 << 20), config)
    try:
        me = pool.slot
        handles = [pool.create_pipe(me, me, max_slices=8, initial=1 + i % 5) for i in range(pipes)]
        pool.destroy_pipe(handles[1])
        alive = [h for h in handles if h != handles[1]]
        infos = pool.pipes()
        assert [i.handle for i in infos] == alive
        owners = pool.slice_owners()
        for info in infos:
            assert info.owned_slices == owners.count(info.handle.slot) == 1 + info.handle.slot % 5
    finally:
        pool.close()


def test_a_leaving_member_looks_only_at_the_pipes_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """Leaving (and reaping a dead member) holds the allocator lock: it ends
    the member's pipes found in C, not by a look at every entry (a serving
    pool has 2048, ~2 ms in Python, while other members wait for the lock)."""
    config = PoolConfig(slice_size=4096, max_members=4, max_pipes=512, max_slices_per_pipe=8)
    segment = MemfdSegment.create(8 << 20)
    owner = Pool.create(segment, config, close_segment=False)
    other = Pool.attach(MemfdSegment.from_fd(os.dup(segment.fd)))
    try:
        me, peer = owner.slot, other.slot
        shared = [
            owner.create_pipe(me, peer),
            owner.create_pipe(peer, me),
            owner.create_pipe(me, peer),
        ]
        own = [owner.create_pipe(me, me) for _ in range(2)]
        looked: list[int] = []
        offset = PipeTable._offset

        def counted(self: PipeTable, slot: int) -> int:
            looked.append(slot)
            return offset(self, slot)

        monkeypatch.setattr(PipeTable, "_offset", counted)
        other.close()
        monkeypatch.undo()
        assert sorted(set(looked)) == sorted(h.slot for h in shared + own)
        # Ours stay active; those shared with the member that left are closed
        # (we still hold an end: their slices stay ours until we free them).
        states = {i.handle: owner.has_pipe(i.handle) for i in owner.pipes()}
        assert states == {**{h: False for h in shared}, **{h: True for h in own}}
    finally:
        other.close()
        owner.close()
        segment.close()
