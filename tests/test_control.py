"""The control channel's codec and the transport's answers to a misbehaving peer."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiocoloc.control import MAX_FRAME, FrameDecoder, encode_frame
from aiocoloc.errors import ControlProtocolError

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


@settings(max_examples=300)
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
        pair.server._link.send(message)  # type: ignore[union-attr]
        exc = await pair.client_protocol.lost
        assert isinstance(exc, ConnectionResetError)
        await teardown(pair)

    run("asyncio", scenario)


def test_garbage_on_the_control_socket_resets_a_shared_memory_connection() -> None:
    async def scenario() -> None:
        pair = await connect("shm")
        pair.server._link.transport.write(b"\x00\x00\x00\x03\xc1\xc1\xc1")  # type: ignore[union-attr]
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
