"""Heartbeats: every pool membership of this process, beaten by one thread.

A member beats its pool's counter every quarter lease and does deferred
work (freeing pipes an event loop could not free at once) as soon as there
is some (``aiocoloc.shm.members``).  One daemon thread does it for every
pool the process joined, started with the first and kept for the life of
the process: joining a pool from an event loop does not wait for a new
thread to start (100-160 us, most of attaching a pool), and a process with
many pools has one such thread, not one each.

A beat or a piece of work must be short (their lock attempts are): one
pool's never delays another's by more than that, nor a ``stop()``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from aiocoloc.errors import PoolBusy

__all__ = ["DEFERRED_RETRY", "Heartbeat"]

_log = logging.getLogger("aiocoloc.shm.heartbeat")

#: Seconds between tries at deferred work that found the lock busy.
DEFERRED_RETRY = 0.01


class Heartbeat:
    """One membership's heartbeat: ``beat()`` every ``period`` seconds, and
    ``work()`` whenever ``pending()`` (tried again every ``DEFERRED_RETRY``).

    ``PoolBusy`` from either means another member holds the lock: tried
    again next time.
    """

    def __init__(
        self,
        period: float,
        *,
        beat: Callable[[], None],
        pending: Callable[[], bool],
        work: Callable[[], None],
        pool_name: str,
    ) -> None:
        self.period = period
        self._beat = beat
        self._pending = pending
        self._work = work
        self.pool_name = pool_name
        self.next_beat = 0.0
        self.next_work = 0.0  # after a try that left work pending
        self.woken = False
        self.stopped = False

    def start(self) -> None:
        """Beat from now on."""
        _beats.add(self)

    def wake(self) -> None:
        """Look for pending work now."""
        _beats.wake(self)

    def stop(self) -> None:
        """Beat no more; once this returns no callback of ours runs."""
        _beats.remove(self)

    def due_at(self, now: float) -> float:
        """When this membership next needs the thread."""
        if self.woken:
            return now
        if self._pending():
            return min(self.next_beat, self.next_work)
        return self.next_beat

    def tick(self, now: float) -> None:
        """Beat if it is time, then do the pending work."""
        self.woken = False
        try:
            if now >= self.next_beat:
                self.next_beat = now + self.period
                self._beat()
            if self._pending():
                self.next_work = now + DEFERRED_RETRY
                self._work()
        except PoolBusy:
            pass  # another member holds the lock: next time
        except Exception:  # the pool may be closing under us
            if not self.stopped:
                _log.exception("pool %s heartbeat failed", self.pool_name)


class _Beats:
    """The process's heartbeat thread and the memberships it beats."""

    def __init__(self) -> None:
        self.forget_parent()

    def forget_parent(self) -> None:
        """Start empty; in a forked child, the thread stayed behind (and may
        have held the lock at the fork), and the memberships are the parent's."""
        self._cond = threading.Condition()
        self._members: set[Heartbeat] = set()
        self._running: Heartbeat | None = None
        self._thread: threading.Thread | None = None

    def add(self, heartbeat: Heartbeat) -> None:
        with self._cond:
            heartbeat.next_beat = time.monotonic() + heartbeat.period
            self._members.add(heartbeat)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="aiocoloc-pool-heartbeats", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def wake(self, heartbeat: Heartbeat) -> None:
        with self._cond:
            heartbeat.woken = True
            self._cond.notify()

    def remove(self, heartbeat: Heartbeat) -> None:
        with self._cond:
            heartbeat.stopped = True
            self._members.discard(heartbeat)
            if threading.current_thread() is self._thread:
                return  # (from its own callback)
            while self._running is heartbeat:
                self._cond.wait()

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                due = [h for h in self._members if h.due_at(now) <= now]
                if not due:
                    nearest = min((h.due_at(now) for h in self._members), default=None)
                    self._cond.wait(None if nearest is None else nearest - now)
                    continue
            for heartbeat in due:
                with self._cond:
                    if heartbeat not in self._members:
                        continue  # stopped meanwhile
                    self._running = heartbeat
                try:
                    heartbeat.tick(time.monotonic())
                finally:
                    with self._cond:
                        self._running = None
                        self._cond.notify_all()


_beats = _Beats()
os.register_at_fork(after_in_child=_beats.forget_parent)
