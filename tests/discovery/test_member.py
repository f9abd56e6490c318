"""The member record: its encoding round trip, slot tags (field 5), and
compatibility both ways: a record of an older encoder (no field 5) decodes,
and so does one of a newer encoder (fields after 5)."""

from __future__ import annotations

import uuid
from typing import Any

import msgpack
import pytest

from discovery.member import MAX_POOLS, MAX_SLOT, Member, MemberError, Status

POOLS = [str(uuid.UUID(int=i + 1)) for i in range(3)]
RECORD = Member(
    "web-1",
    ("127.0.0.2:7946", "10.0.0.2:7946"),
    frozenset(POOLS),
    ("@ctl", "tcp:10.0.0.2:9000"),
    incarnation=42,
    slots={POOLS[0]: b"\x01" * 22, POOLS[2]: b"\x02" * 16},
)


def _fields(record: Member) -> list[Any]:
    raw: list[Any] = msgpack.unpackb(record.pack(), raw=False)
    return raw


def test_round_trip_with_slots() -> None:
    decoded = Member.unpack(RECORD.pack(), Status.SUSPECT)
    assert decoded == RECORD.with_status(Status.SUSPECT)
    assert decoded.slots == {POOLS[0]: b"\x01" * 22, POOLS[2]: b"\x02" * 16}
    # Field 5 lines up with the sorted pools: nil where a pool has no tag.
    assert _fields(RECORD)[2] == sorted(POOLS)
    assert _fields(RECORD)[5] == [b"\x01" * 22, None, b"\x02" * 16]
    assert _fields(Member("n", ("127.0.0.1:1",), frozenset(POOLS)))[5] == []
    assert hash(Member.unpack(RECORD.pack())) == hash(RECORD)  # hashable, slots and all
    # Slot tags are the sidecars' business: the API's JSON leaves them out.
    assert "slots" not in RECORD.to_json()
    assert Member.from_json(RECORD.to_json()) == Member(
        RECORD.node, RECORD.addresses, RECORD.pools, RECORD.endpoints, RECORD.incarnation
    )


def test_a_record_without_field_5_decodes() -> None:
    older = msgpack.packb(["web-1", ["127.0.0.2:7946"], POOLS[:1], ["@ctl"], 7], use_bin_type=True)
    decoded = Member.unpack(older)
    assert (decoded.pools, decoded.endpoints, decoded.incarnation, decoded.slots) == (
        {POOLS[0]},
        ("@ctl",),
        7,
        {},
    )


def test_a_record_with_fields_after_5_decodes() -> None:
    newer = msgpack.packb([*_fields(RECORD), "a field to come", {"x": [1, 2]}], use_bin_type=True)
    assert Member.unpack(newer) == RECORD


def test_older_decoders_read_the_first_five_fields() -> None:
    # What a decoder of the first version reads: fields 0-4, the same as ever.
    assert Member.from_fields(_fields(RECORD)[:5]) == Member(
        RECORD.node, RECORD.addresses, RECORD.pools, RECORD.endpoints, RECORD.incarnation
    )


@pytest.mark.parametrize(
    "slots",
    [
        [b"x"],  # not lined up with the pools
        [b"x", None, b"x", b"x"],
        [b"x" * (MAX_SLOT + 1), None, None],
        [b"", None, None],
        ["text", None, None],
        "not a list",
    ],
)
def test_bad_slots_are_refused(slots: Any) -> None:
    fields = _fields(RECORD)
    fields[5] = slots
    with pytest.raises(MemberError):
        Member.unpack(msgpack.packb(fields, use_bin_type=True))


def test_slots_belong_to_pools_mapped() -> None:
    with pytest.raises(MemberError, match="bad slots"):
        Member("n", ("127.0.0.1:1",), frozenset({"p"}), slots={"q": b"x"})
    with pytest.raises(MemberError, match="bad slots"):
        Member("n", ("127.0.0.1:1",), frozenset({"p"}), slots={"p": "text"})  # type: ignore[dict-item]
    # A changed record keeps the tags of the pools it still maps.
    moved = RECORD.changed(43, pools=frozenset(POOLS[1:]))
    assert moved.slots == {POOLS[2]: b"\x02" * 16} and moved.incarnation == 43
    assert RECORD.changed(44).same_record(RECORD)
    assert not RECORD.changed(44, slots={}).same_record(RECORD)
    # The record's mapping is its own, read-only copy.
    given = {"p": b"x"}
    member = Member("n", ("127.0.0.1:1",), frozenset({"p"}), slots=given)
    given["p"] = b"y"
    assert member.slots == {"p": b"x"}
    with pytest.raises(TypeError):
        member.slots["p"] = b"z"  # type: ignore[index]


def test_largest_record() -> None:
    """Eight pools with a tag of ``MAX_SLOT`` bytes each add 208 bytes."""
    pools = frozenset(str(uuid.UUID(int=i + 1)) for i in range(MAX_POOLS))
    bare = Member("n" * 128, ("127.0.0.1:7946",), pools, incarnation=(1 << 63) - 1)
    full = bare.changed(bare.incarnation, slots={p: b"\xff" * MAX_SLOT for p in pools})
    # a bin8 header and the tag each; field 5's array header is there either way
    assert len(full.pack()) - len(bare.pack()) == MAX_POOLS * (2 + MAX_SLOT)
    assert len(bare.pack()) == 463 and len(full.pack()) == 671
