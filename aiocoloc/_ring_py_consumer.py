"""The reading end of the pure-Python channels, one implementation for every
placement (twin of ``_ring_consumer.pxi``)."""

from __future__ import annotations

import time
from typing import Any

from aiocoloc import _ring_checks as _checks
from aiocoloc._ring_layout import (
    OFF_CONSUMER_CLOSED,
    OFF_CONSUMER_SLEEPING,
    OFF_HEAD,
    OFF_PRODUCER_CLOSED,
    OFF_PRODUCER_WAITING,
    OFF_TAIL,
)
from aiocoloc._ring_py_end import End

__all__ = ["Consumer"]


class Consumer(End):
    """The reading end.  One consumer per channel, ever at a time."""

    _head = 0
    _last_tail = 0

    def _start_positions(self) -> None:
        self._head, self._last_tail = self._attach_positions()

    def _before_tail_check(self) -> None:
        pass

    def _after_advance(self) -> None:
        pass

    def _load_tail(self) -> int:
        tail = self._cells.get64(OFF_TAIL)
        self._before_tail_check()
        if tail < self._last_tail:
            self._corrupt(_checks.tail_moved_backwards(tail, self._last_tail))
        limit = self._limit(self._head)
        if tail > limit:
            self._corrupt(_checks.tail_too_far(tail, limit, self._head))
        self._last_tail = tail
        return tail

    def _available(self, wanted: int = -1) -> int:
        """Readable bytes; the cached tail is reloaded only when it does not
        cover ``wanted`` (negative: everything) or shows an empty channel."""
        self._check_usable()
        avail = self._last_tail - self._head
        if wanted < 0 or avail < wanted or avail == 0:
            avail = self._load_tail() - self._head
        return avail

    def _at_eof(self) -> bool:
        if not self._cells.get32(OFF_PRODUCER_CLOSED):
            return False
        return self._load_tail() == self._head

    def _copy_out(self, dst: memoryview, n: int) -> None:
        assert self._view is not None
        pos, done = self._head, 0
        while done < n:
            offset, length = self._locate(pos, n - done)
            length = min(length, n - done)
            dst[done : done + length] = self._view[offset : offset + length]
            done += length
            pos += length

    def _advance(self, n: int) -> None:
        self._head += n
        self._cells.set64(OFF_HEAD, self._head)
        self._after_advance()

    def readinto(self, buffer: Any) -> int | None:
        """Read up to ``len(buffer)`` bytes; count, ``None`` if empty, 0 at EOF."""
        dst = memoryview(buffer).cast("B")
        if dst.readonly:
            raise BufferError("Object is not writable.")
        avail = self._available(len(dst))
        if avail == 0:
            return 0 if self._at_eof() else None
        k = min(len(dst), avail)
        self._copy_out(dst, k)
        self._advance(k)
        return k

    def read(self, n: int = -1) -> bytes | None:
        """Read up to ``n`` bytes (all if negative); ``None`` if empty, ``b""`` at EOF."""
        avail = self._available(n)
        if avail == 0:
            return b"" if self._at_eof() else None
        k = avail if n < 0 or n > avail else n
        out = bytearray(k)
        self._copy_out(memoryview(out), k)
        self._advance(k)
        return bytes(out)

    def peek(self, n: int = -1) -> memoryview | None:
        """A zero-copy view of readable bytes contiguous in memory; see ``_ring``."""
        avail = self._available(n)
        assert self._view is not None
        if avail == 0:
            return self._view[:0] if self._at_eof() else None
        offset, length = self._locate(self._head, avail)
        k = min(avail, length)
        if 0 <= n < k:
            k = n
        return self._view[offset : offset + k]

    def consume(self, n: int) -> None:
        """Mark ``n`` readable bytes as consumed (after ``peek``)."""
        avail = self._available(max(n, 0))
        if n < 0 or n > avail:
            raise ValueError(_checks.cannot_consume(n, avail))
        self._advance(n)

    def free(self) -> int:
        """Bytes the producer could write now."""
        used = self._available()
        return self._limit(self._head) - self._head - used

    def used(self) -> int:
        """Bytes readable now."""
        return self._available()

    @property
    def position(self) -> int:
        """Total bytes this consumer has consumed (the head)."""
        return self._head

    @property
    def peer_closed(self) -> bool:
        """True once the producer has closed its end."""
        self._check_usable()
        return self._cells.get32(OFF_PRODUCER_CLOSED) != 0

    def at_eof(self) -> bool:
        """True when the producer has closed and every byte is consumed."""
        self._check_usable()
        return self._at_eof()

    def close(self) -> None:
        """Tell the producer we read no more: its writes raise ``RingClosed``."""
        self._check_usable()
        if not self._closed:
            self._closed = True
            self._cells.set32(OFF_CONSUMER_CLOSED, 1)

    def wake_needed(self) -> bool:
        """After consuming: True if the producer waits for space and must be rung."""
        self._check_usable()
        if self._cells.get32(OFF_PRODUCER_WAITING):
            self._cells.set32(OFF_PRODUCER_WAITING, 0)
            return True
        return False

    def sleep_over(self) -> bool:
        """After ``prepare_sleep``: True once the producer took the
        announcement, or bytes or EOF came; consumes nothing."""
        self._check_usable()
        if self._cells.get32(OFF_CONSUMER_SLEEPING) == 0 or self._available(1):
            return True
        return self._cells.get32(OFF_PRODUCER_CLOSED) != 0

    def prepare_sleep(self) -> bool:
        """Announce that we sleep until data arrives; True: sleep now."""
        self._check_usable()
        self._cells.set32(OFF_CONSUMER_SLEEPING, 1)
        if self._load_tail() != self._head or self._cells.get32(OFF_PRODUCER_CLOSED):
            self._cells.set32(OFF_CONSUMER_SLEEPING, 0)
            return False
        return True

    def cancel_sleep(self) -> None:
        """Withdraw a ``prepare_sleep`` announcement."""
        self._check_usable()
        self._cells.set32(OFF_CONSUMER_SLEEPING, 0)

    def spin_until_readable(self, max_ns: int) -> bool:
        """Busy-wait up to ``max_ns`` for data or EOF; True if either came."""
        self._check_usable()
        deadline = time.monotonic_ns() + max_ns
        while True:
            if self._cells.get64(OFF_TAIL) != self._head or self._cells.get32(OFF_PRODUCER_CLOSED):
                return True
            if time.monotonic_ns() >= deadline:
                return False
