"""The writing end of the pure-Python channels, one implementation for every
placement (twin of ``_ring_producer.pxi``)."""

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
from aiocoloc.errors import RingClosed

__all__ = ["Producer"]


class Producer(End):
    """The writing end.  One producer per channel, ever at a time."""

    _tail = 0
    _last_head = 0

    def _start_positions(self) -> None:
        self._last_head, self._tail = self._attach_positions()

    def _load_head(self) -> int:
        head = self._cells.get64(OFF_HEAD)
        if head < self._last_head:
            self._corrupt(_checks.head_moved_backwards(head, self._last_head))
        if head > self._tail:
            self._corrupt(_checks.head_past_tail(head, self._tail))
        self._last_head = head
        return head

    def _copy_in(self, src: memoryview) -> None:
        assert self._view is not None
        pos, done = self._tail, 0
        while done < len(src):
            offset, length = self._locate(pos, len(src) - done)
            length = min(length, len(src) - done)
            self._view[offset : offset + length] = src[done : done + length]
            done += length
            pos += length

    def _write(self, data: Any, all_or_nothing: bool) -> int:
        src = memoryview(data).cast("B")
        n = len(src)
        capacity = self._limit(self._last_head) - self._last_head
        if all_or_nothing and n > capacity:
            raise ValueError(_checks.never_fits(n, capacity))
        self._check_usable()
        if self._closed:
            raise RingClosed(_checks.WRITE_AFTER_CLOSE)
        if self._cells.get32(OFF_CONSUMER_CLOSED):
            raise RingClosed(_checks.CONSUMER_CLOSED)
        # The cached head is a lower bound of the real one: reload only when
        # it does not leave room (as the Cython core does).
        free = self._limit(self._last_head) - self._tail
        if free < n:
            free = self._limit(self._load_head()) - self._tail
        if all_or_nothing and n > free:
            self._note_blocked(True)
            return 0
        k = min(n, free)
        self._note_blocked(k < n)
        if k == 0:
            return 0
        self._offered += k
        self._copy_in(src[:k])
        self._tail += k
        self._cells.set64(OFF_TAIL, self._tail)
        return k

    _offered = 0
    _blocked_ns = 0
    _blocked_since = 0

    def _note_blocked(self, blocked: bool) -> None:
        if blocked:
            if not self._blocked_since:
                self._blocked_since = time.monotonic_ns()
        elif self._blocked_since:
            self._blocked_ns += time.monotonic_ns() - self._blocked_since
            self._blocked_since = 0

    @property
    def offered(self) -> int:
        """Bytes this producer has accepted (its demand, for resizing)."""
        return self._offered

    @property
    def blocked_ns(self) -> int:
        """Nanoseconds writes found the channel too full, the current spell included."""
        if self._blocked_since:
            return self._blocked_ns + time.monotonic_ns() - self._blocked_since
        return self._blocked_ns

    def write(self, data: Any) -> int:
        """Copy as much of ``data`` as fits; return the number of bytes written."""
        return self._write(data, False)

    def write_all(self, data: Any) -> bool:
        """Copy all of ``data`` if it fits now, else nothing; return whether it did."""
        return self._write(data, True) != 0 or len(data) == 0

    def free(self) -> int:
        """Bytes that can be written now."""
        self._check_usable()
        return self._limit(self._load_head()) - self._tail

    def used(self) -> int:
        """Bytes written and not yet consumed."""
        self._check_usable()
        return self._tail - self._load_head()

    @property
    def position(self) -> int:
        """Total bytes this producer has written (the tail)."""
        return self._tail

    @property
    def peer_closed(self) -> bool:
        """True once the consumer has closed its end."""
        self._check_usable()
        return self._cells.get32(OFF_CONSUMER_CLOSED) != 0

    def close(self) -> None:
        """Mark end of data: the consumer reads what is left, then EOF."""
        self._check_usable()
        if not self._closed:
            self._closed = True
            self._cells.set32(OFF_PRODUCER_CLOSED, 1)

    def wake_needed(self) -> bool:
        """After writing: True if the consumer sleeps and must be rung (once)."""
        self._check_usable()
        if self._cells.get32(OFF_CONSUMER_SLEEPING):
            self._cells.set32(OFF_CONSUMER_SLEEPING, 0)
            return True
        return False

    def wait_over(self) -> bool:
        """After ``prepare_wait``: True once the consumer took the
        announcement, a byte fits, or the consumer closed."""
        self._check_usable()
        return (
            self._cells.get32(OFF_PRODUCER_WAITING) == 0
            or self.free() > 0
            or self._cells.get32(OFF_CONSUMER_CLOSED) != 0
        )

    def prepare_wait(self, nbytes: int = 1) -> bool:
        """Announce that we wait for ``nbytes`` of space; True: sleep now."""
        self._check_usable()
        self._cells.set32(OFF_PRODUCER_WAITING, 1)
        if self.free() >= nbytes or self._cells.get32(OFF_CONSUMER_CLOSED):
            self._cells.set32(OFF_PRODUCER_WAITING, 0)
            return False
        return True

    def cancel_wait(self) -> None:
        """Withdraw a ``prepare_wait`` announcement."""
        self._check_usable()
        self._cells.set32(OFF_PRODUCER_WAITING, 0)
