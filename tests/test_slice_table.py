"""Searching a pool's slice table (``aiocoloc.shm.pipes``): the bytes search
finds exactly the entries a list of the table's numbers would, whatever
the neighbouring entries' bytes are."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

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
