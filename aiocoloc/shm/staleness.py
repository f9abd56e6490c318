"""Staleness by the observer's own clock: "unchanged since I first saw it".

Members of a pool may live in different VMs whose clocks disagree, so
nothing in shared memory is a time.  A member instead bumps a counter (its
heartbeat, the lock's acquisition count) and each observer times how long
the value has stayed the same with its own monotonic clock.  The member
table judges heartbeats this way, the allocator lock judges an acquisition
that lasts too long, and the lock's holder check judges a holder that stays
gone.
"""

from __future__ import annotations

from collections.abc import Hashable

__all__ = ["Observed"]


class Observed:
    """A value last seen in shared memory, and since when (our clock) it has
    not changed."""

    __slots__ = ("since", "value")

    def __init__(self, value: Hashable = None, since: float = 0.0) -> None:
        self.value = value
        self.since = since

    def unchanged_for(self, value: Hashable, now: float, period: float) -> bool:
        """Record ``value`` seen at ``now``; True if it is the value seen
        before and has stayed so for ``period`` seconds.  A new value restarts
        the clock (and is never stale at once)."""
        if value != self.value:
            self.value = value
            self.since = now
            return False
        return now - self.since >= period
