"""A pool's allocator lock: one word in shared memory, taken with compare-and-swap.

The word holds ``(member slot + 1) << 32 | member generation`` of its holder,
0 when free; a second word counts acquisitions.  Where the words are is the
layout's business (``aiocoloc.shm.layout``); judging whether a holder is gone
(its member slot freed or its heartbeat stalled) is the member table's, and
repairing the tables after a take-over the pipe table's.

Waiting is bounded and done in short tries, with pauses between them that
hold nothing (not even this process's thread lock).  An event loop's thread
waits at most ``LOOP_LOCK_WAIT`` by default: critical sections take
microseconds, so only a member stuck in one -- or a hostile same-user peer
that holds the word and keeps bumping the counter, defeating the take-over
-- makes it fail, and loop paths then fail fast (``PoolBusy``) or defer
their work to a thread.  A holder that keeps one acquisition for a whole
lease, or that the pool judges gone, is taken over.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from aiocoloc.errors import PoolBusy, PoolError
from aiocoloc.shm.staleness import Observed

__all__ = [
    "BACKGROUND_LOCK_WAIT",
    "LOOP_LOCK_WAIT",
    "AllocatorLock",
    "on_event_loop",
]

_log = logging.getLogger("aiocoloc.shm.lock")

#: Seconds an event loop's thread waits for the lock by default.
LOOP_LOCK_WAIT = 0.0003
#: How long a background thread tries at a time before it pauses.
BACKGROUND_LOCK_WAIT = 0.002
#: Longest spin of one try; waiters pause between tries.
LOCK_TRY = 0.001
#: Longest pause between tries: short for waits bounded in milliseconds, longer
#: for a background thread that may wait a lease (a holder that died) and
#: must not burn a core meanwhile.
SHORT_PAUSE, LONG_PAUSE = 0.001, 0.02


def on_event_loop() -> bool:
    """True on a thread that runs an event loop (which must never wait on
    another member)."""
    return asyncio._get_running_loop() is not None


class AllocatorLock:
    """The allocator lock of one pool, as seen by this process (whose threads
    take it one at a time)."""

    def __init__(
        self,
        words: Any,
        lock_offset: int,
        count_offset: int,
        lease: float,
        *,
        holder_gone: Callable[[int, tuple[int, int], float], bool],
        repair: Callable[[], None],
        name: str,
    ) -> None:
        """``holder_gone(held, acquisition, now)``: whether the pool judges the
        holder of lock value ``held`` gone (``acquisition``: the value and the
        counter, unchanged while one acquisition lasts).  ``repair()`` runs
        under the lock after a take-over."""
        self._words = words
        self._lock = lock_offset
        self._count = count_offset
        self._lease = lease
        self._holder_gone = holder_gone
        self._repair = repair
        self._name = name
        self._thread_lock = threading.Lock()
        # The acquisition we last saw and since when: one that lasts a lease
        # means a frozen or dead holder.
        self._seen = Observed()

    def hold(self, mine: int, timeout: float | None) -> None:
        """Take the lock as ``mine`` within ``timeout`` seconds (default: three
        leases, or ``LOOP_LOCK_WAIT`` on an event loop's thread); raises
        ``PoolBusy`` when it stays held."""
        if timeout is None:
            timeout = LOOP_LOCK_WAIT if on_event_loop() else self._lease * 3
        deadline = time.monotonic() + timeout
        pause, longest = 0.0, LONG_PAUSE if timeout > 0.1 else SHORT_PAUSE
        while True:
            left = max(deadline - time.monotonic(), 0.0)
            if self._thread_lock.acquire(timeout=left):
                try:
                    got = self._try(mine, min(left, LOCK_TRY))
                except BaseException:
                    self._thread_lock.release()
                    raise
                if got is None:  # taken over from a holder that is gone
                    try:
                        self._repair()
                    except BaseException:
                        self.release(mine)
                        raise
                if got is not False:
                    return
                self._thread_lock.release()
            left = deadline - time.monotonic()
            if left <= 0:
                held = self._words.load64(self._lock)
                raise PoolBusy(
                    f"pool {self._name}: allocator lock not acquired in {timeout} s "
                    f"(held by member {(held >> 32) - 1})"
                )
            pause = min(max(pause * 2, 0.00002), longest, left)
            time.sleep(pause)

    def release(self, mine: int) -> None:
        """Give the lock back (the shared word only if it is still ours)."""
        self._words.cas64(self._lock, mine, 0)
        self._thread_lock.release()

    def _try(self, mine: int, budget: float) -> bool | None:
        """Spin up to ``budget`` seconds for the word: True when taken, None
        when taken over from a gone holder, False when still held."""
        words = self._words
        deadline = time.monotonic() + budget
        while True:
            held = words.load64(self._lock)
            if held == 0 and words.cas64(self._lock, 0, mine):
                words.add64(self._count, 1)
                return True
            if held == mine:
                raise PoolError("pool lock is already held by this member (re-entry)")
            if held and self._gone(held) and words.cas64(self._lock, held, mine):
                words.add64(self._count, 1)
                _log.warning(
                    "pool %s: lock holder (member %d) is gone; took the lock over and "
                    "repaired the tables",
                    self._name,
                    (held >> 32) - 1,
                )
                return None
            if time.monotonic() >= deadline:
                return False
            os.sched_yield()

    def _gone(self, held: int) -> bool:
        acquisition = (held, self._words.load64(self._count))
        now = time.monotonic()
        if self._seen.unchanged_for(acquisition, now, self._lease):
            return True
        return self._holder_gone(held, acquisition, now)
