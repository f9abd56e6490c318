"""The producer side of an elastic pipe: writes, demand, and resizing.

An ``ElasticProducer`` wraps a pool pipe's producer end.  It counts the bytes
it accepts and the time it spends blocked on a full pipe; every ``interval``
(on a write, or when its owner calls ``tick()`` -- the transport does so from
its event loop) it publishes those counters in the pool, reads every pipe's
counters, computes the pool-wide proportional targets and moves its own pipe
toward its target: growing with slices the pool can spare now, shrinking at
the pipe's next safe point and handing the dropped slices back once the
consumer has passed it.  Nothing here runs on a write that is not due.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from aiocoloc.allocation import demand_from, proportional_targets
from aiocoloc.errors import PoolError
from aiocoloc.pool import PipeHandle, Pool

__all__ = ["ElasticConfig", "ElasticProducer"]

_log = logging.getLogger("aiocoloc.elastic")


@dataclass(frozen=True)
class ElasticConfig:
    """Knobs of the resizing policy."""

    #: Seconds between two looks at demand (and resize steps).
    interval: float = 0.05
    #: Weight of the newest interval in the smoothed demand (0 < a <= 1).
    smoothing: float = 0.5
    #: Intervals without a single byte after which a pipe counts as idle
    #: (demand 0, so it falls back to its minimum).
    idle_intervals: int = 2


@dataclass
class _Seen:
    offered: int
    blocked_ns: int
    demand: float = 0.0
    quiet: int = 0  # consecutive intervals without a byte


class ElasticProducer:
    """Writes into a pool pipe and keeps its size proportional to demand."""

    def __init__(
        self,
        pool: Pool,
        handle: PipeHandle,
        config: ElasticConfig | None = None,
        *,
        end: Any = None,
    ) -> None:
        self.pool = pool
        self.handle = handle
        self.config = config or ElasticConfig()
        self.end: Any = end if end is not None else pool.pipe_producer(handle)
        self._pending_release: list[int] = []
        # Our own pipe's baseline is zero; other pipes' is their first sighting.
        self._seen: dict[tuple[int, int], _Seen] = {(handle.slot, handle.generation): _Seen(0, 0)}
        self._last_tick = time.monotonic()
        self.resizes = 0
        self._writes = 0

    # -- the data path -------------------------------------------------------
    # The pipe end counts its own demand (bytes accepted, time blocked); a
    # transport writes to ``end`` directly and only calls ``maybe_tick()``.

    def write(self, data: Any) -> int:
        """As ``PipeProducer.write``, ticking when due (looked at every 64 writes)."""
        n: int = self.end.write(data)
        self._writes += 1
        if not self._writes & 63:
            self.maybe_tick()
        return n

    def write_all(self, data: Any) -> bool:
        """As ``PipeProducer.write_all``."""
        return bool(self.end.write_all(data))

    @property
    def offered(self) -> int:
        """Bytes the pipe has accepted."""
        return int(self.end.offered)

    @property
    def blocked_ns(self) -> int:
        """Time writes found the pipe too full."""
        return int(self.end.blocked_ns)

    @property
    def capacity(self) -> int:
        """Bytes the pipe holds under its newest layout."""
        return int(self.end.capacity)

    # -- the policy -----------------------------------------------------------

    def maybe_tick(self) -> bool:
        """``tick()`` if an interval has passed since the last one (cheap
        otherwise); returns what ``tick()`` would (True when not due)."""
        if time.monotonic() - self._last_tick >= self.config.interval:
            return self.tick()
        return True

    def tick(self) -> bool:
        """Publish demand, compute targets, take one resize step.

        Returns True while there is more to do (the pipe is busy, not at its
        target, or holds slices to hand back): an owner that ticks from a
        timer may stop once it returns False and start again on a write.
        """
        now = time.monotonic()
        elapsed = now - self._last_tick
        if elapsed <= 0:
            return True
        self._last_tick = now
        try:
            return self._tick(elapsed)
        except PoolError as exc:  # our pipe was closed or reclaimed under us
            _log.debug("pipe %s: no resizing: %s", self.handle, exc)
            return False

    def _tick(self, elapsed: float) -> bool:
        blocked = self.blocked_ns
        offered_now = self.offered
        pipes = self.pool.pipes()
        demands: list[float] = []
        mins: list[int] = []
        maxs: list[int] = []
        mine: int | None = None
        alive = set()
        for info in pipes:
            key = (info.handle.slot, info.handle.generation)
            alive.add(key)
            offered, blocked_ns = info.offered_bytes, info.blocked_ns
            if info.handle == self.handle:
                offered, blocked_ns, mine = offered_now, blocked, len(demands)
            seen = self._seen.get(key)
            if seen is None:
                seen = self._seen[key] = _Seen(offered, blocked_ns)
            rate = max(offered - seen.offered, 0) / elapsed
            blocked_fraction = max(blocked_ns - seen.blocked_ns, 0) / (elapsed * 1e9)
            a = self.config.smoothing
            idle = offered == seen.offered and blocked_ns == seen.blocked_ns
            seen.quiet = seen.quiet + 1 if idle else 0
            if seen.quiet >= self.config.idle_intervals:
                seen.demand = 0.0
            else:
                seen.demand = a * demand_from(rate, blocked_fraction) + (1 - a) * seen.demand
            seen.offered, seen.blocked_ns = offered, blocked_ns
            demands.append(seen.demand)
            mins.append(info.min_slices)
            maxs.append(info.max_slices)
        for key in set(self._seen) - alive:
            del self._seen[key]
        if mine is None:
            return False  # our pipe is gone; the transport notices on its next write
        target = proportional_targets(demands, mins, maxs, self.pool.geometry.slice_count)[mine]
        self.pool.publish_demand(self.handle, offered_now, blocked, target)
        self._step_toward(target)
        busy = demands[mine] > 0 or bool(self._pending_release)
        return busy or len(self.end.slices) != target

    def _step_toward(self, target: int) -> None:
        end = self.end
        if self._pending_release and end.switch_complete():
            self.pool.release_slices(self.handle, self._pending_release)
            self._pending_release = []
        if self._pending_release or not end.can_resize():
            return
        current = len(end.slices)
        if target > current:
            added = self.pool.allocate_slices(self.handle, target - current)
            if added:
                end.resize(current, added)
                self.resizes += 1
        elif target < current:
            _, dropped = end.resize(target)
            self.resizes += 1
            self._pending_release = dropped
            if end.switch_complete():
                self.pool.release_slices(self.handle, dropped)
                self._pending_release = []

    def close(self) -> None:
        """Close the producer end: EOF for the consumer once it has drained."""
        if not self.end.released:
            self.end.close()

    def release(self) -> None:
        """Drop the producer end's hold on the pool mapping."""
        self.end.release()

    def __getattr__(self, name: str) -> Any:
        # Everything else is the pipe end's (flags, positions, sleep/wake).
        return getattr(self.end, name)
