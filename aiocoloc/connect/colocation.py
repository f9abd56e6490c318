"""The pools this process uses for its connections, shared and counted.

A serving process offers memfd pools to its clients: one, created when the
first server starts, and another whenever those it has are full (a pool
holds 1024 connections); a client process attaches each server pool it is given
once, however many connections use it.  Every user (a server, a connection)
holds a reference.  When the last one goes the pool lingers for ``LINGER``
seconds -- the next connection to the same server then costs no new mapping
-- and is closed after that (our membership left, the mapping dropped), or
at once by ``close_idle()`` and at exit.  A client of a server in its own
process reuses that pool.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from dataclasses import dataclass

from aiocoloc import debug
from aiocoloc.errors import PoolError
from aiocoloc.shm import MemfdSegment, Pool, PoolConfig

__all__ = ["LINGER", "MAX_SERVING_POOLS", "SERVING_POOL", "LocalPools", "local_pools"]

_log = logging.getLogger("aiocoloc.connect.colocation")

#: The pool a serving process offers: room for 1024 connections (two pipes
#: each); 16 KiB slices, so that an idle connection holds 32 KiB of it (a
#: pipe keeps one slice) and a 64 MiB pool takes 2048 idle ones; a pipe
#: grows to 4 MiB (256 slices).
SERVING_POOL = PoolConfig(slice_size=16 * 1024, max_members=128, max_pipes=2048)
#: Seconds an unused pool stays open for the next connection.
LINGER = 10.0
#: Pools a serving process offers at most (each holds 1024 connections).
MAX_SERVING_POOLS = 16


@dataclass
class _Entry:
    pool: Pool
    refs: int
    idle_until: float | None = None  # time.monotonic() deadline while unused

    def take(self) -> Pool:
        debug.live.pool_refs += 1
        self.refs += 1
        self.idle_until = None
        return self.pool


class LocalPools:
    """Reference-counted pools of this process, by pool id."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        # One thread closes lingering pools while there are any (a thread
        # per release cost 40-100 us of the event loop's time, every time).
        self._reaper: threading.Thread | None = None
        self._pools: dict[str, _Entry] = {}
        self._serving: list[str] = []  # the pools we offer, oldest first
        self._reserved: dict[str, int] = {}  # serving pool -> handshakes about to make pipes
        self._pid = os.getpid()

    def _check_fork(self) -> None:
        if os.getpid() != self._pid:  # a forked child inherits no membership
            self._pools.clear()
            self._serving = []
            self._reaper = None
            self._pid = os.getpid()

    def serving(self, size: int, *, reserve: bool = False) -> Pool:
        """A pool this process offers its clients (a new reference): the
        oldest with room for a connection's two pipes, else a new one -- a
        server adds pools as they fill, up to ``MAX_SERVING_POOLS``.
        ``reserve``: hold that room until ``unreserve`` (a handshake that
        creates its pipes a round trip later), so that a burst of handshakes
        does not overfill one pool."""
        with self._lock:
            self._check_fork()
            self._serving = [key for key in self._serving if key in self._pools]
            chosen = None
            for key in self._serving:
                pipes = 2 * (self._reserved.get(key, 0) + 1)
                if self._pools[key].pool.has_room_for(pipes):
                    chosen = key
                    break
            if chosen is None and len(self._serving) >= MAX_SERVING_POOLS:
                chosen = self._serving[-1]  # all full: the handshake says so
            if chosen is None:
                pool = Pool.create(MemfdSegment.create(size, "aiocoloc-serving"), SERVING_POOL)
                if self._serving:
                    _log.info("%d serving pools are full: opening another", len(self._serving))
                chosen = str(pool.id)
                self._pools[chosen] = _Entry(pool, 0)
                self._serving.append(chosen)
            if reserve:
                self._reserved[chosen] = self._reserved.get(chosen, 0) + 1
            return self._pools[chosen].take()

    def unreserve(self, pool: Pool) -> None:
        """The handshake that reserved room in ``pool`` made its pipes (or gave up)."""
        with self._lock:
            key = str(pool.id)
            left = self._reserved.get(key, 0) - 1
            if left > 0:
                self._reserved[key] = left
            else:
                self._reserved.pop(key, None)

    def attach(self, fd: int, pool_id: str) -> Pool:
        """The pool on memfd ``fd`` (owned from now on), announced as ``pool_id``
        (a new reference).  Raises ``PoolError``/``SegmentError``."""
        with self._lock:
            self._check_fork()
            entry = self._pools.get(pool_id)
            if entry is not None:
                os.close(fd)
                return entry.take()
            segment = MemfdSegment.from_fd(fd)
            try:
                # The peer formatted it before sending it: no waiting (in the event loop).
                pool = Pool.attach(segment, timeout=0.0)
            except BaseException:
                segment.close()
                raise
            if str(pool.id) != pool_id:
                pool.close()
                raise PoolError(
                    f"pool on the descriptor is {pool.id}, the peer announced {pool_id}"
                )
            self._pools[pool_id] = _Entry(pool, 1)
            debug.live.pool_refs += 1
            return pool

    def adopt(self, pool: Pool) -> Pool:
        """A new reference to ``pool``, opened by the caller (owned from now
        on: a host pool shared across kernels, say); if this process had a
        pool with its id open already, that one, and ``pool`` is closed."""
        with self._lock:
            self._check_fork()
            entry = self._pools.get(str(pool.id))
            duplicate = entry is not None
            if entry is None:
                entry = self._pools[str(pool.id)] = _Entry(pool, 0)
            taken = entry.take()
        if duplicate:
            pool.close()
        return taken

    def release(self, pool: Pool) -> None:
        """Drop one reference; after the last one the pool lingers (``LINGER``)."""
        with self._lock:
            key = str(pool.id)
            entry = self._pools.get(key)
            if entry is None or entry.pool is not pool or entry.refs <= 0:
                return
            entry.refs -= 1
            debug.live.pool_refs -= 1
            if entry.refs > 0:
                return
            if LINGER > 0:
                entry.idle_until = time.monotonic() + LINGER
                if self._reaper is None:
                    self._reaper = threading.Thread(
                        target=self._reap, name="aiocoloc-pool-linger", daemon=True
                    )
                    self._reaper.start()
                else:
                    self._wake.notify()
                return
            self._forget(key)
        self._close(pool)

    def _reap(self) -> None:
        """Close pools whose linger ran out; return when none lingers."""
        while True:
            with self._lock:
                now = time.monotonic()
                due = [
                    (key, entry)
                    for key, entry in self._pools.items()
                    if entry.idle_until is not None and entry.idle_until <= now
                ]
                for key, _ in due:
                    self._forget(key)
                if not due:
                    deadlines = [e.idle_until for e in self._pools.values() if e.idle_until]
                    if not deadlines:
                        self._reaper = None
                        return
                    self._wake.wait(min(deadlines) - now)
                    continue
            for _, entry in due:
                self._close(entry.pool)

    def _forget(self, key: str) -> None:
        del self._pools[key]
        if key in self._serving:
            self._serving.remove(key)

    @staticmethod
    def _close(pool: Pool) -> None:
        _log.debug("closing pool %s (no more users)", pool.id)
        pool.close()

    def close_idle(self) -> None:
        """Close every pool nobody uses now, without waiting for ``LINGER``."""
        with self._lock:
            idle = [(key, entry) for key, entry in self._pools.items() if entry.refs == 0]
            for key, _ in idle:
                self._forget(key)
            self._wake.notify()  # the linger thread exits when nothing lingers any more
        for _, entry in idle:
            self._close(entry.pool)

    def take(self, pool_id: str) -> Pool | None:
        """A new reference to pool ``pool_id`` if this process has it open
        (lingering included), else None."""
        with self._lock:
            self._check_fork()
            entry = self._pools.get(pool_id)
            return entry.take() if entry is not None else None

    def get(self, pool_id: str) -> Pool | None:
        """The pool ``pool_id`` if this process uses it."""
        with self._lock:
            entry = self._pools.get(pool_id)
            return entry.pool if entry is not None else None

    def in_use(self) -> dict[str, int]:
        """References held, by pool id, of pools somebody uses (lingering ones
        are left out; see ``open_pools``)."""
        with self._lock:
            return {key: entry.refs for key, entry in self._pools.items() if entry.refs}

    def open_pools(self) -> list[str]:
        """Every pool this process has open, lingering ones included."""
        with self._lock:
            return list(self._pools)


_local = LocalPools()
atexit.register(_local.close_idle)


def local_pools() -> LocalPools:
    """This process's pools."""
    return _local
