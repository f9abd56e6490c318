# cython: annotation_typing=False
"""One pipe reader's spin decisions, made on every wake-up and every rest.

The policy is described in ``aiocoloc.notify.spin``, which exports this
class.  It is compiled by Cython in pure-Python mode (``spin_policy.pxd``
makes ``SpinPolicy`` a ``cdef class``): the data path asks it at least once
per message, and a Python call each time was a visible part of a low-rate
round trip.  The same source, interpreted, is the reference that
``AIOCOLOC_NO_EXTENSIONS=1`` selects (``aiocoloc.compiled``).
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["AFTER_EMPTY", "AFTER_WRITE", "COMPILED", "SpinPolicy", "usable_cpus"]

#: True when this module runs compiled.
COMPILED = not __file__.endswith(".py")
#: The two triggers of a spin: the pipe ran empty, or we just wrote.
AFTER_EMPTY, AFTER_WRITE = 0, 1

#: Event loops (by id) with a spin scheduled or running: one spinner per loop.
_busy_loops: set[int] = set()
#: Per event loop (by id): the reader (by id) that rested last.
_rested: dict[int, int] = {}


def usable_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class SpinPolicy:
    """One reader's spin decisions (see ``aiocoloc.notify.spin``); ``config``
    is a ``SpinConfig``."""

    def __init__(self, config: Any, cpus: int | None = None) -> None:
        self.config = config
        self.max_ns = config.max_ns
        self.misses_to_stop = config.misses_to_stop
        self.rearm_ns = config.rearm_ns
        self.max_backoff = config.max_backoff
        self.enabled = config.max_ns > 0 and (cpus if cpus is not None else usable_cpus()) >= 2
        self.misses = [0, 0]
        # Per trigger: wake-ups within rearm_ns needed to start it again, how
        # many came, and whether it was started that way and caught nothing.
        self.backoff = [1, 1]
        self.slow_wakes = [0, 0]
        self.on_probation = [False, False]
        self.last_wake_ns = [1 << 62, 1 << 62]  # the last wake-up after each trigger
        self.probe_backoff = 1  # rings between probes (see may_spin_after_ring)
        self.rings = 0
        self.spins = 0
        self.hits = 0

    def wants(self, trigger: int) -> bool:
        """Whether a spin for ``trigger`` is worth trying now."""
        return self.enabled and self.misses[trigger] < self.misses_to_stop

    def alone(self, loop: object) -> bool:
        """Note that this reader rests now; False when the loop's last reader
        to rest was another one (several are busy: then nobody spins)."""
        key, me = id(loop), id(self)
        last = _rested.get(key, me)
        _rested[key] = me
        return last == me

    def claim(self, loop: object) -> bool:
        """Take the loop's single spinner slot; False if another reader has it."""
        key = id(loop)
        if key in _busy_loops:
            return False
        _busy_loops.add(key)
        return True

    def release(self, loop: object) -> None:
        """Give the loop's spinner slot back."""
        _busy_loops.discard(id(loop))

    def record(self, trigger: int, found: bool) -> None:
        """The result of one spin for ``trigger``."""
        self.spins += 1
        if found:
            self.hits += 1
            self.misses[trigger] = 0
            self.backoff[trigger] = 1
            self.on_probation[trigger] = False
            return
        self.misses[trigger] += 1
        if self.misses[trigger] >= self.misses_to_stop and self.on_probation[trigger]:
            self.on_probation[trigger] = False
            self.backoff[trigger] = min(2 * self.backoff[trigger], self.max_backoff)

    def may_spin_after_ring(self, trigger: int) -> bool:
        """Whether to spin for ``trigger`` although we just rang the peer: a
        probe, after our write (a request), when the last wake-up after one
        came within ``max_ns``.  Never after freeing space for a blocked
        writer (``AFTER_EMPTY``): that writer is the one a spin would hold up."""
        if trigger != AFTER_WRITE or self.last_wake_ns[trigger] > self.max_ns:
            return False
        self.rings += 1
        if self.rings < self.probe_backoff:
            return False
        self.rings = 0
        return True

    def probed(self, trigger: int, caught_after_ns: int | None) -> None:
        """The result of a spin that ``may_spin_after_ring`` allowed: the
        bytes came ``caught_after_ns`` after ``trigger`` (None: not at all).
        A probe pays only if that beats the last wake-up: a peer woken on
        our CPU answers a spinner late, and a late catch is a loss too."""
        if caught_after_ns is not None and caught_after_ns < self.last_wake_ns[trigger]:
            self.probe_backoff = 1
        else:
            self.probe_backoff = min(2 * self.probe_backoff, self.max_backoff)

    def woken_after(self, trigger: int, slept_ns: int) -> None:
        """A doorbell woke us ``slept_ns`` after ``trigger`` (the pipe ran
        empty, or our last write)."""
        self.last_wake_ns[trigger] = slept_ns
        if self.misses[trigger] < self.misses_to_stop:
            return  # the trigger spins already
        if slept_ns <= self.max_ns:  # a spin would have caught it
            self.misses[trigger] = 0
            self.slow_wakes[trigger] = 0
        elif slept_ns <= self.rearm_ns:
            self.slow_wakes[trigger] += 1
            if self.slow_wakes[trigger] >= self.backoff[trigger]:
                self.misses[trigger] = 0
                self.slow_wakes[trigger] = 0
                self.on_probation[trigger] = True
        else:
            self.slow_wakes[trigger] = 0  # the evidence must come in a row
