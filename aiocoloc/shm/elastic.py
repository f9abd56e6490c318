"""The producer side of an elastic pipe: writes, demand, and resizing.

An ``ElasticProducer`` wraps a pool pipe's producer end.  It counts the bytes
it accepts and the time it spends blocked on a full pipe; every ``interval``
(on a write, or when its owner calls ``tick()``) it publishes those counters
in the pool, reads every pipe's counters (``DemandTracker``), computes the
pool-wide proportional targets and moves its own pipe toward its target:
growing with slices the pool can spare now, shrinking at the pipe's next
safe point and handing the dropped slices back once the consumer has passed
it.  Nothing here runs on a write that is not due, and a step that finds
the pool's allocator busy is simply retried at the next interval.

Transports do not tick their pipes one by one: ``aiocoloc.shm.resizer`` reads
the pipe table once per pool and interval and ``settle``s each local pipe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiocoloc.errors import PoolBusy, PoolError
from aiocoloc.shm import PipeHandle, PipeInfo, Pool
from aiocoloc.shm.allocation import demand_from, proportional_targets, shareable_slices

__all__ = ["DemandTracker", "ElasticConfig", "ElasticProducer", "pipe_targets"]

_log = logging.getLogger("aiocoloc.shm.elastic")


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


class DemandTracker:
    """The smoothed demand of every pipe of a pool, from the growth of its
    counters between two looks at the pipe table.

    A pipe first seen starts from the counters its producer last published,
    so a producer that publishes at every look (``ElasticProducer.settle``)
    loses no byte to a tracker that starts late.
    """

    def __init__(self, config: ElasticConfig) -> None:
        self.config = config
        self._seen: dict[PipeHandle, _Seen] = {}

    def measure(
        self,
        pipes: Sequence[PipeInfo],
        elapsed: float,
        local: Mapping[PipeHandle, tuple[int, int]],
    ) -> list[float]:
        """Each pipe's demand over the last ``elapsed`` seconds.  ``local``:
        fresher ``(offered, blocked_ns)`` counters of this process's pipes
        than the published ones."""
        a = self.config.smoothing
        idle_after = self.config.idle_intervals
        seen_by_handle = self._seen
        demands: list[float] = []
        current: dict[PipeHandle, _Seen] = {}
        for info in pipes:
            handle = info.handle
            seen = seen_by_handle.get(handle)
            if seen is None:
                seen = _Seen(info.offered_bytes, info.blocked_ns)
            current[handle] = seen
            offered, blocked_ns = local.get(handle) or (info.offered_bytes, info.blocked_ns)
            if offered == seen.offered and blocked_ns == seen.blocked_ns:
                seen.quiet += 1
                if seen.quiet >= idle_after:
                    seen.demand = 0.0
                else:
                    seen.demand *= 1 - a
            else:
                seen.quiet = 0
                rate = max(offered - seen.offered, 0) / elapsed
                blocked_fraction = max(blocked_ns - seen.blocked_ns, 0) / (elapsed * 1e9)
                seen.demand = a * demand_from(rate, blocked_fraction) + (1 - a) * seen.demand
                seen.offered, seen.blocked_ns = offered, blocked_ns
            demands.append(seen.demand)
        self._seen = current  # pipes gone from the table are forgotten
        return demands


def pipe_targets(pipes: Sequence[PipeInfo], demands: Sequence[float], total: int) -> list[int]:
    """Every pipe's target, in slices, for ``demands`` (``aiocoloc.shm.allocation``),
    sharing a pool of ``total`` slices less the newcomers' part."""
    return proportional_targets(
        demands,
        [info.min_slices for info in pipes],
        [info.max_slices for info in pipes],
        shareable_slices(total),
    )


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
        self._tracker = DemandTracker(self.config)
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
        (Transports do not tick each pipe: ``aiocoloc.shm.resizer`` looks at the
        pipe table once per pool and calls ``settle`` for each pipe.)
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
        counters = (self.offered, self.blocked_ns)
        pipes = self.pool.pipes()
        demands = self._tracker.measure(pipes, elapsed, {self.handle: counters})
        mine = next((i for i, info in enumerate(pipes) if info.handle == self.handle), None)
        if mine is None:
            return False  # our pipe is gone; the transport notices on its next write
        target = pipe_targets(pipes, demands, self.pool.geometry.slice_count)[mine]
        return self.settle(target, demands[mine], counters)

    def settle(self, target: int, demand: float, counters: tuple[int, int]) -> bool:
        """Publish our ``counters`` (offered, blocked_ns) and ``target``, and take
        one step toward it; returns what ``tick()`` does.  Raises ``PoolError``
        when the pipe is gone."""
        self.pool.publish_demand(self.handle, counters[0], counters[1], target)
        self._step_toward(target)
        return demand > 0 or bool(self._pending_release) or len(self.end.slices) != target

    def _step_toward(self, target: int) -> None:
        try:
            self._step(target)
        except PoolBusy:
            pass  # the allocator is busy (never waited for): next interval

    def _step(self, target: int) -> None:
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
