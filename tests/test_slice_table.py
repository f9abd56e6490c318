"""Searching a pool's tables (``aiocoloc.shm.pipes``): the bytes searches
find exactly the entries a list of the table's numbers would, whatever the
neighbouring entries' bytes are, and new pipes take the free entries."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiocoloc.errors import PoolExhausted
from aiocoloc.shm import MemfdSegment, Pool
from aiocoloc.shm.layout import PoolConfig
from aiocoloc.shm.pipes import _entries_equal, _zero_entries

# Owners (pipe slot + 1) whose bytes make straddling matches likely: zeros,
# small numbers (three zero bytes) and numbers that are one zero byte away.
_OWNERS = st.sampled_from([0, 1, 2, 255, 256, 0x10000, 0x1000000, 0xFFFFFFFF, 7, 0x100])


@given(
    st.lists(_OWNERS, max_size=300),
    _OWNERS,
    st.one_of(st.none(), st.integers(min_value=0, max_value=50)),
)
def test_finds_what_a_list_would(table: list[int], value: int, limit: int | None) -> None:
    raw = struct.pack(f"={len(table)}I", *table)
    expected = [i for i, owner in enumerate(table) if owner == value]
    if limit is not None:
        expected = expected[:limit]
    assert _entries_equal(raw, value, limit) == expected


@given(st.lists(_OWNERS, max_size=300))
def test_counts_free_entries_as_a_list_would(table: list[int]) -> None:
    raw = struct.pack(f"={len(table)}I", *table)
    assert _zero_entries(raw) == table.count(0)


def test_a_match_across_two_entries_is_not_an_entry() -> None:
    # 0x00000100 then 0x00000001: bytes 00 01 00 00 | 01 00 00 00 hold
    # "00 00 01 00" (0x00010000) straddling them, and no entry of it.
    raw = struct.pack("=2I", 0x100, 1)
    assert _entries_equal(raw, 0x10000) == []
    assert _entries_equal(struct.pack("=3I", 1, 0, 0), 0) == [1, 2]


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
