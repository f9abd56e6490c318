"""Control frames: a 4-byte big-endian length, then a msgpack map.

One codec serves every control message (``aiocoloc.control.messages``: the
upgrade handshake and the link of an upgraded connection).  Frames are
bounded and checked: a peer that sends garbage gets a
``ControlProtocolError``, never a hang or an unbounded buffer.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from aiocoloc.errors import ControlProtocolError

__all__ = ["MAX_FRAME", "FrameDecoder", "encode_frame"]

MAX_FRAME = 64 * 1024
_HEADER = struct.Struct(">I")


def encode_frame(message: dict[str, Any]) -> bytes:
    """One frame carrying ``message``."""
    body: bytes = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ValueError(f"control message of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


class FrameDecoder:
    """Splits a byte stream into control messages."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def pending(self) -> bytes:
        """Bytes of an incomplete frame received so far."""
        return bytes(self._buffer)

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        messages = []
        while len(self._buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buffer)
            if size > MAX_FRAME:
                raise ControlProtocolError(f"control frame of {size} bytes exceeds {MAX_FRAME}")
            if len(self._buffer) < _HEADER.size + size:
                break
            body = bytes(self._buffer[_HEADER.size : _HEADER.size + size])
            del self._buffer[: _HEADER.size + size]
            try:
                message = msgpack.unpackb(body, raw=False, strict_map_key=True)
            except Exception as exc:  # msgpack raises several unrelated types
                raise ControlProtocolError(f"undecodable control frame: {exc}") from None
            if not isinstance(message, dict) or not isinstance(message.get("op"), str):
                raise ControlProtocolError(f"control frame is not a message: {message!r:.80}")
            messages.append(message)
        return messages
