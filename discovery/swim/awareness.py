"""Lifeguard's local health awareness: how much this member trusts itself.

A member that is itself slow (its loop starved of CPU, its socket buffers
full) misses acks and nacks that were sent in time, and would accuse
healthy members.  Instead it keeps a score, raised by evidence of its own
slowness (probes whose indirect helpers' nacks it missed, accusations it
had to refute, its own deadlines it overslept) and lowered by each probe
that succeeds, and scales its probe interval and probe timeout by
``score + 1``: a sick member probes less and waits longer.

After memberlist's ``awareness.go`` (score from 0 to max - 1).
"""

from __future__ import annotations

import logging

__all__ = ["Awareness"]

_log = logging.getLogger("discovery.swim.awareness")


class Awareness:
    """The health score of the local member (0 is healthy)."""

    def __init__(self, max_multiplier: int) -> None:
        if max_multiplier < 1:
            raise ValueError("max_multiplier must be >= 1")
        self.max = max_multiplier
        self.score = 0

    def apply(self, delta: int) -> None:
        """Move the score by ``delta``, kept within [0, max - 1]."""
        before = self.score
        self.score = min(max(self.score + delta, 0), self.max - 1)
        if self.score != before:
            _log.debug("health score %d -> %d", before, self.score)

    def scale(self, timeout: float) -> float:
        """``timeout`` stretched by the current score."""
        return timeout * (self.score + 1)
