"""Writing to a ``SwitchableTransport``: ``writelines`` and ``write_eof``.
The TCP write path is the loop's own transport.

``write`` itself is one method for both paths, run per message: the data
path's (``data_path``, compiled).  What follows a pipe write that did not
fit (the overflow, waiting for room) is ``pipe_write``'s.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiocoloc.transport.state import TransportState
from aiocoloc.transport.switch_state import SHM, TCP

__all__ = ["WritePath"]


class WritePath(TransportState):
    """``write``/``writelines``/``write_eof`` on either path."""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        # Each transport's own ``write`` is its data path's (an attribute set
        # by __init__: no call in between); this serves calls through the class.
        self._core.write(data)

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

    def _check_alive(self) -> None:
        self._core.check_alive()

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
