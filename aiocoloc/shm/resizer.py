"""One resize timer per pool and event loop, however many pipes it serves.

Each shared-memory connection's outgoing pipe is elastic
(``aiocoloc.shm.elastic``).  Ticking every pipe on its own timer made each tick
read the whole pipe table and compute every pipe's target: work quadratic
in pipes, a hundred connections spending more time resizing than moving
bytes.  A ``PoolResizer`` does it once per interval for all of this loop's
pipes of one pool: one read of the pipe table, one demand measurement, one
computation of the proportional targets, then one step for each enrolled
pipe.  Other processes sharing the pool run their own resizers over their
own pipes and see ours through the counters and targets we publish.

A transport enrolls its pipe on the write that finds it idle (one attribute
check on the write path); the pipe stays enrolled while it is busy, not at
its target, or has slices to hand back, and is let go (``on_idle``) after
that.  The timer stops when no pipe is enrolled: no CPU while idle.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections.abc import Callable

from aiocoloc.errors import PoolError
from aiocoloc.shm import PipeHandle, Pool
from aiocoloc.shm.elastic import DemandTracker, ElasticConfig, ElasticProducer, pipe_targets

__all__ = ["Enrollment", "PoolResizer", "resizer_for"]

_log = logging.getLogger("aiocoloc.shm.resizer")


class Enrollment:
    """One pipe followed by a ``PoolResizer``; ``cancel()`` lets it go."""

    __slots__ = ("on_idle", "producer", "resizer")

    def __init__(
        self, resizer: PoolResizer, producer: ElasticProducer, on_idle: Callable[[], None]
    ) -> None:
        self.resizer = resizer
        self.producer = producer
        self.on_idle = on_idle

    def cancel(self) -> None:
        """Stop following the pipe (its connection closes); ``on_idle`` is not called."""
        self.resizer._drop(self)


class PoolResizer:
    """Follows the demand of this event loop's elastic pipes of one pool.

    Get it with ``resizer_for``; it exists while at least one pipe is
    enrolled.
    """

    def __init__(self, pool: Pool, loop: asyncio.AbstractEventLoop, config: ElasticConfig) -> None:
        self.pool = pool
        self.loop = loop
        self.config = config
        #: Intervals ticked so far (each reads the pipe table once).
        self.ticks = 0
        self._enrolled: dict[PipeHandle, Enrollment] = {}
        self._tracker = DemandTracker(config)
        self._last = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None
        # Ticks belong to no connection: run them in an empty context.
        self._context = contextvars.Context()

    @property
    def enrolled(self) -> int:
        """Pipes followed now."""
        return len(self._enrolled)

    def enroll(self, producer: ElasticProducer, on_idle: Callable[[], None]) -> Enrollment:
        """Follow ``producer``'s pipe until it is idle at its share, then call
        ``on_idle`` (from the loop).  Call from the loop's thread."""
        enrollment = Enrollment(self, producer, on_idle)
        previous = self._enrolled.get(producer.handle)
        if previous is not None:  # a second owner of one pipe: the newest wins
            previous.on_idle()
        self._enrolled[producer.handle] = enrollment
        if self._timer is None:
            self._last = time.monotonic()
            self._schedule()
        return enrollment

    def _schedule(self) -> None:
        self._timer = self.loop.call_later(self.config.interval, self._tick, context=self._context)

    def _drop(self, enrollment: Enrollment) -> None:
        handle = enrollment.producer.handle
        if self._enrolled.get(handle) is enrollment:
            del self._enrolled[handle]
        if not self._enrolled:
            self._stop()

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        _forget(self)

    def _tick(self) -> None:
        self._timer = None
        now = time.monotonic()
        elapsed = max(now - self._last, 1e-6)
        self._last = now
        self.ticks += 1
        idle: list[Enrollment] = []
        try:
            self._step_all(elapsed, idle)
        except PoolError as exc:  # the pool closed under us
            _log.debug("pool %s: resizing stopped: %s", self.pool.id, exc)
            idle = list(self._enrolled.values())
        except Exception as exc:  # a bug: report it, and let every pipe go
            self.loop.call_exception_handler(
                {"message": f"resizing the pipes of pool {self.pool.id} failed", "exception": exc}
            )
            idle = list(self._enrolled.values())
        for enrollment in idle:
            if self._enrolled.get(enrollment.producer.handle) is enrollment:
                del self._enrolled[enrollment.producer.handle]
                enrollment.on_idle()
        if self._enrolled:
            self._schedule()
        else:
            self._stop()

    def _step_all(self, elapsed: float, idle: list[Enrollment]) -> None:
        """One look at the pool for all enrolled pipes; those with nothing
        left to do go to ``idle``."""
        pipes = self.pool.pipes()
        local = {
            handle: (e.producer.offered, e.producer.blocked_ns)
            for handle, e in self._enrolled.items()
        }
        demands = self._tracker.measure(pipes, elapsed, local)
        targets = pipe_targets(pipes, demands, self.pool.geometry.slice_count)
        index = {info.handle: i for i, info in enumerate(pipes)}
        for handle, enrollment in list(self._enrolled.items()):
            i = index.get(handle)
            if i is None:  # destroyed or reclaimed: its transport notices on a write
                idle.append(enrollment)
                continue
            try:
                busy = enrollment.producer.settle(targets[i], demands[i], local[handle])
            except PoolError as exc:
                _log.debug("pipe %s: no resizing: %s", handle, exc)
                busy = False
            except Exception as exc:  # a bug: report it, and leave that pipe's size alone
                self.loop.call_exception_handler(
                    {"message": f"resizing pipe {handle} failed", "exception": exc}
                )
                busy = False
            if not busy:
                idle.append(enrollment)


_lock = threading.Lock()
_resizers: dict[tuple[Pool, asyncio.AbstractEventLoop, ElasticConfig], PoolResizer] = {}


def resizer_for(pool: Pool, loop: asyncio.AbstractEventLoop, config: ElasticConfig) -> PoolResizer:
    """The resizer of ``pool``'s pipes with ``config`` on ``loop`` (made on demand)."""
    key = (pool, loop, config)
    with _lock:
        resizer = _resizers.get(key)
        if resizer is None:
            # Resizers of loops closed with pipes still enrolled never tick again.
            for stale in [k for k in _resizers if k[1].is_closed()]:
                del _resizers[stale]
            resizer = _resizers[key] = PoolResizer(pool, loop, config)
        return resizer


def _forget(resizer: PoolResizer) -> None:
    with _lock:
        key = (resizer.pool, resizer.loop, resizer.config)
        if _resizers.get(key) is resizer:
            del _resizers[key]
