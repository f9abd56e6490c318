"""The control channel's codec and the transport's answers to a misbehaving peer."""

from __future__ import annotations

import asyncio
import os
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiocoloc.control import MAX_FRAME, FrameDecoder, encode_frame, messages
from aiocoloc.errors import ControlProtocolError, UnknownOperation, VersionMismatch

from .conftest import FUZZ_SCALE
from .test_transport import connect, run, teardown


def test_frames_round_trip_whole_and_in_pieces() -> None:
    messages = [
        {"op": "switch", "offset": 12, "to": "shm"},
        {"op": "bell"},
        {"op": "x", "b": b"\0"},
    ]
    stream = b"".join(encode_frame(m) for m in messages)
    assert FrameDecoder().feed(stream) == messages
    decoder, got = FrameDecoder(), []
    for i in range(len(stream)):
        got += decoder.feed(stream[i : i + 1])
    assert got == messages


def test_decoder_rejects_oversized_frames_before_buffering_them() -> None:
    with pytest.raises(ControlProtocolError, match="exceeds"):
        FrameDecoder().feed(struct.pack(">I", MAX_FRAME + 1))
    with pytest.raises(ValueError, match="exceeds"):
        encode_frame({"op": "big", "data": b"x" * MAX_FRAME})


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\xc1", "undecodable"),  # a byte msgpack never uses
        (msgpack.packb([1, 2, 3]), "not a message"),
        (msgpack.packb({"no-op": 1}), "not a message"),
        (msgpack.packb({"op": 7}), "not a message"),
    ],
)
def test_decoder_rejects_garbage(body: bytes, message: str) -> None:
    with pytest.raises(ControlProtocolError, match=message):
        FrameDecoder().feed(struct.pack(">I", len(body)) + body)


@settings(max_examples=300 * FUZZ_SCALE)
@given(st.binary(max_size=200))
def test_decoder_never_fails_otherwise(data: bytes) -> None:
    """Arbitrary bytes: messages, a clear ControlProtocolError, or waiting for more."""
    try:
        for message in FrameDecoder().feed(data):
            assert isinstance(message, dict) and isinstance(message["op"], str)
    except ControlProtocolError:
        pass


# --- a misbehaving peer on the control channel -------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        {"op": "switch", "offset": "12", "to": "shm"},
        {"op": "switch", "offset": 5, "to": "udp"},
        {"op": "switch", "offset": 0, "to": "tcp"},  # already on TCP
        {"op": "switch-ack", "offset": 99},  # nothing to acknowledge
    ],
)
def test_impossible_control_messages_reset_the_connection(message: dict[str, Any]) -> None:
    async def scenario() -> None:
        errors: list[Any] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        pair = await connect("switched")
        pair.server._link.sock.send(encode_frame(message))  # type: ignore[union-attr]
        exc = await pair.client_protocol.lost
        assert isinstance(exc, ConnectionResetError)
        await teardown(pair)

    run("asyncio", scenario)


def test_garbage_on_the_control_socket_resets_a_shared_memory_connection() -> None:
    async def scenario() -> None:
        pair = await connect("shm")
        pair.server._link.sock.send(b"\x00\x00\x00\x03\xc1\xc1\xc1")  # type: ignore[union-attr]
        exc = await pair.client_protocol.lost
        assert isinstance(exc, ConnectionResetError)
        await teardown(pair)

    run("asyncio", scenario)


def test_switch_misuse_is_refused() -> None:
    async def scenario() -> None:
        pair = await connect("tcp")
        with pytest.raises(RuntimeError, match="no shared-memory path"):
            pair.client.switch_tx("shm")
        await teardown(pair)
        pair = await connect("switched")
        with pytest.raises(ValueError, match="unknown path"):
            pair.client.switch_tx("udp")
        assert pair.client.switch_tx("tcp") == 0  # already there: a no-op
        pair.client.write_eof()
        with pytest.raises(RuntimeError, match="after write_eof"):
            pair.client.switch_tx("shm")
        pair.server.close()
        with pytest.raises(RuntimeError, match="closing"):
            pair.server.switch_tx("shm")
        await teardown(pair)

    run("asyncio", scenario)


# --- the message schema ------------------------------------------------------------------

SAMPLES = [
    messages.Hello(1, ("127.0.0.1", 5, "127.0.0.1", 6), pool="p", slot=3, hub="t"),
    messages.Hello(1, ("::1", 5, "::1", 6)),
    messages.PoolOffer(1, "p"),
    messages.Join(7),
    messages.Pipes((1, 2), (3, 4), b"n" * 16, hub=False),
    messages.Pipes((1, 2), (3, 4), b"n" * 16),
    messages.Proof(b"m" * 16),
    messages.Ready(),
    messages.Refuse("not trusted", "uid 5"),
    messages.Switch(12, "shm"),
    messages.SwitchAck(12),
    messages.Bell(),
    messages.Close(),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.OP)
def test_every_message_round_trips_through_a_frame(message: messages.Message) -> None:
    (raw,) = FrameDecoder().feed(encode_frame(message.fields()))
    assert messages.decode(raw) == message


@pytest.mark.parametrize(
    ("raw", "error", "text"),
    [
        ({"op": "launch"}, UnknownOperation, "unknown control operation"),
        ({"op": "hello", "version": 2, "conn": ["a", 1, "b", 2]}, VersionMismatch, "version 2"),
        ({"op": "pool", "pool": "p"}, VersionMismatch, "None"),
        ({"op": "hello", "version": 1}, ControlProtocolError, "missing 'conn'"),
        ({"op": "hello", "version": 1, "conn": ["a", 1, "b"]}, ControlProtocolError, "bad 'conn'"),
        ({"op": "hello", "version": 1, "conn": ["a", 1, "b", 70000]}, ControlProtocolError, "conn"),
        ({"op": "join", "slot": True}, ControlProtocolError, "bad 'slot'"),
        ({"op": "join", "slot": -1}, ControlProtocolError, "bad 'slot'"),
        (
            {"op": "pipes", "up": [1, 2], "down": [3], "nonce": b"n" * 16},
            ControlProtocolError,
            "'down'",
        ),
        (
            {"op": "pipes", "up": [1, 2], "down": [3, 4], "nonce": b"short"},
            ControlProtocolError,
            "'nonce'",
        ),
        ({"op": "switch", "offset": "12", "to": "shm"}, ControlProtocolError, "bad 'offset'"),
        ({"op": "switch", "offset": 1, "to": "udp"}, ControlProtocolError, "bad 'to'"),
        ({"op": "refuse", "reason": "x" * 65}, ControlProtocolError, "bad 'reason'"),
    ],
)
def test_decode_names_what_is_wrong(raw: dict[str, Any], error: type, text: str) -> None:
    with pytest.raises(error, match=text):
        messages.decode(raw)


def test_fields_a_newer_peer_adds_are_ignored() -> None:
    """Append only: an old decoder takes a newer peer's message minus what it adds."""
    assert messages.decode({"op": "switch-ack", "offset": 3, "checksum": 99}) == messages.SwitchAck(
        3
    )


def test_an_unknown_operation_on_the_link_is_skipped() -> None:
    async def scenario() -> None:
        pair = await connect("shm")
        pair.server._link.sock.send(encode_frame({"op": "from-the-future", "x": 1}))  # type: ignore[union-attr]
        payload = os.urandom(100_000)
        pair.server.write(payload)
        await pair.client_protocol.wait_for_bytes(len(payload))
        assert pair.client_protocol.data == payload
        assert not pair.client_protocol.lost.done()
        await teardown(pair)

    run("asyncio", scenario)


def test_a_switch_deferred_before_close_is_dropped_and_the_close_completes() -> None:
    """Found by ``make soak``: the acknowledgement of a switch arrived after
    close(), the deferred switch raised inside the control channel's
    callback, and the connection never finished closing."""

    async def scenario() -> None:
        errors: list[Any] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        pair = await connect("shm")
        while pair.client._switching.unacknowledged is not None:  # type: ignore[union-attr]
            await asyncio.sleep(0.001)
        pair.server.pause_reading()  # the close waits for TCP to drain: the ack comes first
        assert pair.client.switch_tx("tcp") is not None
        assert pair.client.switch_tx("shm") is None  # deferred until the ack
        payload = os.urandom(8 << 20)
        pair.client.write(payload)
        pair.client.close()
        await asyncio.sleep(0.2)
        pair.server.resume_reading()
        async with asyncio.timeout(5):
            assert await pair.client_protocol.lost is None
            await pair.server_protocol.eof
            assert pair.server_protocol.data == payload
            pair.server.close()  # (the recorder keeps its end open after EOF)
            assert await pair.server_protocol.lost is None
        assert errors == []
        await teardown(pair)

    run("asyncio", scenario)
