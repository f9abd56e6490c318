"""The control channel beside every data path: framed msgpack messages.

One codec serves every control message (switch announcements now; the
upgrade handshake and heartbeats later): a 4-byte big-endian length, then a
msgpack map.  Frames are bounded and checked: a peer that sends garbage gets
a ``ControlProtocolError``, never a hang or an unbounded buffer.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from typing import Any

import msgpack

from aiocoloc.errors import ControlProtocolError

__all__ = ["MAX_FRAME", "ControlLink", "FrameDecoder", "encode_frame"]

_log = logging.getLogger("aiocoloc.control")
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


class ControlLink(asyncio.Protocol):
    """A control connection: ``send()`` messages, get them via ``on_message``."""

    def __init__(
        self,
        on_message: Callable[[dict[str, Any]], None],
        on_lost: Callable[[BaseException | None], None],
    ) -> None:
        self._on_message = on_message
        self._on_lost = on_lost
        self._decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._early: list[bytes] = []  # sent before connection_made (uvloop calls it later)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        for frame in self._early:
            transport.write(frame)  # type: ignore[attr-defined]
        self._early.clear()

    def data_received(self, data: bytes) -> None:
        try:
            messages = self._decoder.feed(data)
        except ControlProtocolError as exc:
            _log.warning("closing control channel: %s", exc)
            assert self.transport is not None
            self.transport.abort()
            self._lost(exc)
            return
        for message in messages:
            if self.closed:
                return
            self._on_message(message)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc)

    def _lost(self, exc: BaseException | None) -> None:
        if not self.closed:
            self.closed = True
            on_lost = self._on_lost
            self._forget_callbacks()
            on_lost(exc)

    def _forget_callbacks(self) -> None:
        # They are bound to our owner, which holds us: a closed link must not
        # keep that cycle for the garbage collector to find.
        self._on_message = self._on_lost = _ignore

    def send(self, message: dict[str, Any]) -> None:
        if self.closed or (self.transport is not None and self.transport.is_closing()):
            raise ConnectionResetError("control channel is closed")
        if self.transport is None:
            self._early.append(encode_frame(message))
        else:
            self.transport.write(encode_frame(message))

    def close(self) -> None:
        self.closed = True
        self._forget_callbacks()
        if self.transport is not None:
            self.transport.close()


def _ignore(*_: Any) -> None:
    pass
