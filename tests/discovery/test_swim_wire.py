"""The SWIM wire: message codec round trips and rejections, packet sealing,
and that no input makes the decoders raise anything but their own errors."""

from __future__ import annotations

import os
import struct
import zlib
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from discovery.keys import Keyring
from discovery.member import Member, Status
from discovery.swim.broadcast import BroadcastQueue
from discovery.swim.messages import (
    PROTOCOL_VERSION,
    Ack,
    Alive,
    Dead,
    IndirectPing,
    Message,
    MessageError,
    MessageKind,
    Nack,
    Ping,
    PushPull,
    Suspect,
    body_overhead,
    decode_body,
    encode,
    pack_body,
)
from discovery.swim.packet import MAX_PACKET, PacketError, Sealer

_names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=32)
_seqs = st.integers(0, (1 << 32) - 1)
_incarnations = st.integers(0, (1 << 63) - 1)
_addresses = st.builds(
    lambda a, b, port: f"127.{a}.{b}.1:{port}",
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(1, 65535),
)
_members = st.builds(
    Member,
    node=_names,
    addresses=st.tuples(_addresses),
    pools=st.frozensets(st.uuids().map(str), max_size=3),
    endpoints=st.tuples(_addresses),
    incarnation=_incarnations,
    status=st.sampled_from(list(Status)),
)
_messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Ping, _seqs, _names, _names),
    st.builds(IndirectPing, _seqs, _names, _addresses, _names, st.booleans()),
    st.builds(Ack, _seqs),
    st.builds(Nack, _seqs),
    st.builds(Suspect, _names, _incarnations, _names),
    st.builds(Alive, _members.map(lambda m: m.with_status(Status.ALIVE))),
    st.builds(Dead, _names, _incarnations, _names),
    st.builds(PushPull, st.booleans(), st.lists(_members, max_size=5).map(tuple)),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_messages, min_size=1, max_size=8))
def test_messages_round_trip(messages: list[Message]) -> None:
    decoded, unknown = decode_body(pack_body([encode(m) for m in messages]))
    assert unknown == 0
    assert decoded == messages
    for got, sent in zip(decoded, messages, strict=True):
        if isinstance(sent, PushPull):
            assert isinstance(got, PushPull)
            assert [m.status for m in got.members] == [m.status for m in sent.members]


def test_kind_values_are_the_protocol() -> None:
    # Append only: changing a value breaks every peer.
    assert {k.name: k.value for k in MessageKind} == {
        "PING": 1,
        "INDIRECT_PING": 2,
        "ACK": 3,
        "NACK": 4,
        "SUSPECT": 5,
        "ALIVE": 6,
        "DEAD": 7,
        "PUSH_PULL": 8,
        "VIEW": 9,
    }
    assert PROTOCOL_VERSION == 1


def _body(*messages: Any) -> bytes:
    data: bytes = msgpack.packb(list(messages), use_bin_type=True)
    return data


_RECORD = Member("n", ("127.0.0.1:7946",)).pack()


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xc1",  # never used in msgpack
        msgpack.packb({"a": 1}),
        _body(),  # no messages
        _body(*([[3, 1]] * 257)),  # too many
        _body(5),  # a message is an array
        _body([]),
        _body(["3", 1]),  # kind is an int
        _body([True, 1]),
        _body([3]),  # too few fields
        _body([3, -1]),  # bad seq
        _body([3, 1 << 32]),
        _body([3, 1.0]),
        _body([3, True]),
        _body([1, 1, "", "src"]),  # empty node name
        _body([1, 1, "x" * 129, "src"]),  # too long
        _body([1, 1, b"bytes", "src"]),
        _body([2, 1, "t", "nowhere", "s", True]),  # bad address
        _body([2, 1, "t", "127.0.0.1:0", "s", True]),
        _body([2, 1, "t", "127.0.0.1:1", "s", 1]),  # nack is a boolean
        _body([5, "n", -1, "s"]),  # bad incarnation
        _body([5, "n", 1 << 63, "s"]),
        _body([7, "n", "1", "s"]),
        _body([6, "not bytes"]),
        _body([6, b"\x93\x01\x02\x03"]),  # not a record
        _body([6, Member("n", ()).pack()]),  # no gossip address
        _body([6, Member("n", ("nowhere",)).pack()]),
        _body([8, True, [[_RECORD, 9]]]),  # unknown status
        _body([8, True, [[_RECORD]]]),
        _body([8, True, "x"]),
        _body([8, "yes", []]),
        _body([6, _RECORD], [3, -5]),  # one bad message spoils the packet
    ],
)
def test_decode_rejects(body: bytes) -> None:
    with pytest.raises(MessageError):
        decode_body(body)


def test_unknown_kinds_are_skipped_and_counted() -> None:
    messages, unknown = decode_body(_body([99, "from the future"], [3, 7], [200]))
    assert messages == [Ack(7)] and unknown == 2


def test_encode_checks_what_decode_checks() -> None:
    with pytest.raises(MessageError):
        encode(Ack(-1))
    with pytest.raises(MessageError):
        encode(Suspect("", 1, "s"))
    with pytest.raises(ValueError):
        pack_body([])


@settings(max_examples=500)
@given(st.binary(max_size=400))
def test_decode_never_raises_anything_else(data: bytes) -> None:
    try:
        decode_body(data)
    except MessageError:
        pass


@settings(max_examples=300)
@given(st.lists(st.one_of(st.integers(-2, 300), st.text(max_size=5), st.binary(max_size=5))))
def test_decode_of_arbitrary_message_shapes(fields: list[Any]) -> None:
    try:
        decode_body(_body(fields))
    except MessageError:
        pass


# -- packets -----------------------------------------------------------------------

_KEY = Keyring([os.urandom(32)])


def test_packets_round_trip_sealed_and_plain() -> None:
    body = pack_body([encode(Ping(1, "a", "b"))])
    for sealer in (Sealer(_KEY), Sealer(None)):
        packet = sealer.seal(body)
        assert len(packet) == len(body) + sealer.overhead
        assert sealer.open(packet) == body
    assert Sealer(_KEY).seal(body) != Sealer(_KEY).seal(body)  # fresh nonce each time


def test_rotation_opens_with_any_key() -> None:
    old, new = os.urandom(16), os.urandom(24)
    body = b"\x91\x92\x03\x01"
    assert Sealer(Keyring([old, new])).open(Sealer(Keyring([new, old])).seal(body)) == body
    with pytest.raises(PacketError) as raised:
        Sealer(Keyring([old])).open(Sealer(Keyring([new])).seal(body))
    assert raised.value.reason == "auth"


@pytest.mark.parametrize(
    ("sender", "receiver"), [(Sealer(None), Sealer(_KEY)), (Sealer(_KEY), Sealer(None))]
)
def test_sealed_and_plain_do_not_mix(sender: Sealer, receiver: Sealer) -> None:
    with pytest.raises(PacketError) as raised:
        receiver.open(sender.seal(b"\x91\x92\x03\x01"))
    assert raised.value.reason == "auth"


def test_packet_rejections() -> None:
    sealer, plain = Sealer(_KEY), Sealer(None)
    packet = sealer.seal(b"\x91\x92\x03\x01")
    cases = {
        "oversize": [b"SW" + bytes(MAX_PACKET)],
        "truncated": [b"", b"SW", packet[:20]],
        "malformed": [b"XX\x01\x01" + bytes(40), b"SW\x01\x80" + bytes(40)],
        "version": [b"SW\x09\x01" + bytes(40), b"SW\x00\x01" + bytes(40)],
        "auth": [packet[:-1] + bytes([packet[-1] ^ 1]), packet[:4] + bytes(12) + packet[16:]],
    }
    for reason, packets in cases.items():
        for bad in packets:
            with pytest.raises(PacketError) as raised:
                sealer.open(bad)
            assert raised.value.reason == reason, (reason, bad[:8])
    good = plain.seal(b"\x91\x92\x03\x01")
    with pytest.raises(PacketError, match="checksum"):
        plain.open(good[:-5] + bytes([good[-5] ^ 0xFF]) + good[-4:])
    header = b"SW" + bytes([PROTOCOL_VERSION, 0])
    forged = (
        header + b"\x91\x92\x03\x01" + struct.pack("!I", zlib.crc32(header + b"\x91\x92\x03\x01"))
    )
    assert plain.open(forged) == b"\x91\x92\x03\x01"  # plain packets are checked, not authenticated


@settings(max_examples=400)
@given(st.binary(max_size=1600), st.booleans())
def test_open_never_raises_anything_else(data: bytes, keyed: bool) -> None:
    sealer = Sealer(_KEY if keyed else None)
    try:
        sealer.open(data)
    except PacketError:
        pass


@settings(max_examples=200)
@given(st.integers(0, 200), st.integers(1, 255))
def test_any_tampering_fails_authentication(position: int, flip: int) -> None:
    sealer = Sealer(_KEY)
    packet = bytearray(sealer.seal(pack_body([encode(Ping(5, "target", "source"))])))
    position %= len(packet)
    packet[position] ^= flip
    with pytest.raises(PacketError):
        sealer.open(bytes(packet))


def test_compound_packets_fit_a_datagram() -> None:
    queue = BroadcastQueue(lambda: 3)
    for i in range(200):
        member = Member(f"node-{i:03d}", (f"127.0.{i}.1:7946",), incarnation=i)
        queue.queue(member.node, encode(Alive(member)))
    sealer = Sealer(_KEY)
    ping = encode(Ping(1, "node-001", "me"))
    free = MAX_PACKET - sealer.overhead - body_overhead(255) - len(ping)
    packed = [ping, *queue.get(0, free, max_items=254)]
    assert len(packed) > 10
    packet = sealer.seal(pack_body(packed))
    assert MAX_PACKET - 60 < len(packet) <= MAX_PACKET
    messages, _ = decode_body(sealer.open(packet))
    assert len(messages) == len(packed)
