"""Writing to a ``SwitchableTransport``: ``write``, ``writelines`` and
``write_eof``, and the TCP write path, which is the loop's own transport.

``write`` is one method for both paths: the TCP branch first (most
connections), the pipe's placement inline after it, so that a write costs
one call on either path.  What follows a pipe write (ringing, the overflow,
waiting for room) is ``pipe_write``'s.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiocoloc.errors import RingClosed, RingCorrupted
from aiocoloc.notify.spin import AFTER_WRITE
from aiocoloc.transport.state import TransportState
from aiocoloc.transport.switch_state import SHM, TCP

__all__ = ["LOG_THRESHOLD_FOR_CONNLOST_WRITES", "WritePath"]

_log = logging.getLogger("aiocoloc.transport")

#: asyncio's threshold for warning about writes to a lost connection.
LOG_THRESHOLD_FOR_CONNLOST_WRITES = 5


class WritePath(TransportState):
    """``write``/``writelines``/``write_eof`` on either path."""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            data = self._other_data(data)
        if self._eof_written or self._eof_pending:
            raise RuntimeError("Cannot call write() after write_eof()")
        if not data:
            return
        if self._conn_lost:
            self._check_alive()
            if self._tx == TCP and self._tcp is not None:
                self._tcp.write(data)  # dropped and counted by the loop's transport
                return
            if self._conn_lost >= LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                _log.warning("socket.send() raised exception.")
            self._conn_lost += 1
            return
        size = len(data) if type(data) is bytes else memoryview(data).nbytes
        self._tx_pos += size
        if self._tx == TCP:
            assert self._tcp is not None
            self._tcp.write(data)  # its pause_writing reaches us through the TcpAdapter
            if self._overflow:
                self._maybe_pause_protocol()
            if self._tx_pos + self._rx_pos >= self._traffic_goal:
                self._check_traffic()
            return
        # The pipe: what pipe_write._after_pipe_write does, inline.
        assert self._shm is not None
        if not self._overflow:
            try:
                written = self._shm.producer.write(data)
            except (RingClosed, RingCorrupted) as exc:
                self._fatal_error(
                    ConnectionResetError(f"shared-memory pipe failed: {exc}"), "pipe write failed"
                )
                return
            if written:
                resizing = self._resizing
                if resizing is not None and resizing.idle:
                    resizing.enroll()
                if self._shm.producer.wake_needed():  # the reader sleeps: ring it
                    self._shm.doorbell.ring()
                    self._woke_peer = True
                if self._rx_asleep:  # a reply may be on its way: watch for it
                    self._slept_at = time.monotonic_ns()  # a reply soon re-arms spinning
                    self._slept_for = AFTER_WRITE
                    self._wait_for_bytes(AFTER_WRITE)
            if written == size:
                return
            self._overflow += memoryview(data).cast("B")[written:]
        else:
            self._overflow += data
        self._wait_for_space()
        self._maybe_pause_protocol()

    def writelines(self, list_of_data: Any) -> None:
        if isinstance(self._loop, asyncio.BaseEventLoop):
            # asyncio's transport joins them (one write, and its TypeError).
            self.write(b"".join(list_of_data))
            return
        self._check_alive()  # uvloop's: each buffer in turn, with its messages
        if self._eof_written or self._eof_pending:
            raise RuntimeError("Cannot call writelines() after write_eof()")
        for data in list_of_data:
            self.write(data)

    def _other_data(self, data: Any) -> bytes | memoryview:
        """What the loop's own transport makes of a write that is not bytes,
        bytearray or memoryview: asyncio's refuses it; uvloop's ignores an
        empty one and takes any other buffer (``memoryview``'s TypeError else)."""
        if isinstance(self._loop, asyncio.BaseEventLoop):
            raise TypeError(
                f"data argument must be a bytes-like object, not {type(data).__name__!r}"
            )
        if not data:
            return b""
        return memoryview(data).cast("B")

    def _check_alive(self) -> None:
        """uvloop's transports refuse writes and limits once closed (asyncio's
        drop writes with a warning): on uvloop, so do we."""
        if self._lost_called and not isinstance(self._loop, asyncio.BaseEventLoop):
            raise RuntimeError(f"unable to perform operation on {self!r}; the handler is closed")

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self._check_alive()
        if self._eof_written or self._eof_pending or self._closing:
            return
        if self._tx == SHM and self._overflow:
            self._eof_pending = True
            return
        self._eof_pending = True
        self._finish_write_eof()

    def _finish_write_eof(self) -> None:
        self._eof_pending = False
        self._eof_written = True
        if self._tx == TCP:
            assert self._tcp is not None
            self._tcp.write_eof()
        else:
            assert self._shm is not None
            self._ring_peer_after(self._shm.producer.close)
