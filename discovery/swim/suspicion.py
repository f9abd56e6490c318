"""The suspicion timer of one suspected member (Lifeguard's LHA-suspicion).

A suspicion starts at its longest (``max``) and shrinks toward its
shortest (``min``) as independent members confirm it: with ``n`` of the
``k`` wanted confirmations the whole timeout is

    max - log(n + 1) / log(k + 1) * (max - min)

(never below ``min``), so a member one peer accuses has long to refute,
and one many peers accuse is failed quickly.  After memberlist's
``suspicion.go``; the accuser itself never counts as a confirmation.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

__all__ = ["Suspicion", "remaining_suspicion_time"]


def remaining_suspicion_time(n: int, k: int, elapsed: float, lo: float, hi: float) -> float:
    """Seconds left (may be negative) after ``elapsed`` with ``n`` of ``k``
    confirmations, the timeout running from ``hi`` down to ``lo``."""
    fraction = math.log(n + 1.0) / math.log(k + 1.0) if k > 0 else 1.0
    raw = hi - fraction * (hi - lo)
    timeout = max(math.floor(1000.0 * raw) / 1000.0, lo)  # millisecond steps, as memberlist
    return timeout - elapsed


class Suspicion:
    """Calls ``on_timeout(confirmations)`` once the suspicion runs out,
    unless cancelled first."""

    def __init__(
        self,
        accuser: str,
        k: int,
        lo: float,
        hi: float,
        on_timeout: Callable[[int], None],
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self.k = k
        self.lo = lo
        self.hi = hi
        self.confirmations = 0
        self._seen = {accuser}  # our own accusation, gossiped back, is no news
        self._on_timeout = on_timeout
        self.start = self._loop.time()
        self.deadline = self.start + (hi if k > 0 else lo)
        self._handle: asyncio.TimerHandle | None = self._loop.call_at(self.deadline, self._fire)

    @property
    def active(self) -> bool:
        return self._handle is not None

    def confirm(self, source: str) -> bool:
        """Count ``source``'s independent accusation; True if it was new
        (and should be gossiped on), False for duplicates or once enough."""
        if self._handle is None or self.confirmations >= self.k or source in self._seen:
            return False
        self._seen.add(source)
        self.confirmations += 1
        now = self._loop.time()
        remaining = remaining_suspicion_time(
            self.confirmations, self.k, now - self.start, self.lo, self.hi
        )
        self._handle.cancel()
        self.deadline = now + max(remaining, 0.0)
        self._handle = self._loop.call_at(self.deadline, self._fire)
        return True

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        self._on_timeout(self.confirmations)
