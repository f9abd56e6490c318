"""Bounded, adaptive busy-waiting before a pipe reader goes to sleep.

Waking a sleeping reader costs a doorbell write on one side and an event
loop wake-up on the other; on a virtual machine that wake-up is most of a
round trip.  When the next bytes are expected soon -- a reply right after we
sent a request, the next chunk of a stream -- watching the pipe for a few
tens of microseconds is cheaper: the writer sees the reader awake, skips the
doorbell, and the reader moves the bytes without a wake-up.

The policy keeps that cheap where it does not pay:

* spins are bounded (``SpinConfig.max_ns``) and run in one loop callback,
  after the callbacks already queued (so a task that wants to write first
  does), with the GIL released;
* two triggers are tracked apart -- "the pipe just ran empty" (streams) and
  "we just wrote" (request/response) -- and each stops after
  ``misses_to_stop`` spins in a row that found nothing, so a one-way writer
  or a slow server costs two spins, then nothing;
* no spin right after we rang the peer: the scheduler likes to wake it on
  our CPU, where our spin would only delay the bytes we wait for.  Except
  as a probe after a request (our write), when the last wake-up after one
  came within ``max_ns``: two peers that ring each other never spin (each
  sleeps when the other writes), and one spin that catches the reply is
  enough for both to stop ringing.  A probe that catches nothing, or
  catches it no sooner than the last wake-up did, waits for twice as many
  rings next time (up to ``max_backoff``);
* a stopped trigger starts again when a wake-up comes within ``max_ns`` of
  going to sleep or of our last write (a spin would have caught it), or
  within ``rearm_ns``: replies slower than a spin while both sides sleep
  (each pays a wake-up) are often faster than one once both spin again --
  a 64 KiB ping-pong took 140 us asleep and 40 us spinning, and used to
  stay asleep for good after two slow replies.  A trigger started that way
  that catches nothing waits for twice as many such wake-ups in a row next
  time (up to ``max_backoff``), so a peer that is simply slow costs little;
* at most one reader per event loop spins at a time, and nothing spins when
  the process may use fewer than two CPUs (a spinner there would only delay
  the peer it waits for);
* nothing spins while several readers of one event loop are busy (the last
  reader of the loop that rested -- ran empty, or wrote and waits for a
  reply -- was another one): a spin on one pipe holds up the bytes of all
  the others, and with ten connections echoing in rounds it made shared
  memory 1.3x slower than TCP (``bench/many.py``).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import ClassVar

__all__ = [
    "AFTER_EMPTY",
    "AFTER_WRITE",
    "SpinConfig",
    "SpinPolicy",
    "usable_cpus",
]

AFTER_EMPTY, AFTER_WRITE = 0, 1


def usable_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class SpinConfig:
    """How long a pipe reader may busy-wait, and when it gives up.

    ``max_ns`` 0 turns spinning off.  The defaults were chosen with
    ``bench/streams.py`` (ping-pong and low-rate ping, see README).
    """

    max_ns: int = 100_000
    misses_to_stop: int = 2
    rearm_ns: int = 300_000
    max_backoff: int = 64

    def __post_init__(self) -> None:
        if self.max_ns < 0:
            raise ValueError(f"max_ns must be >= 0, got {self.max_ns!r}")
        if self.misses_to_stop < 1:
            raise ValueError(f"misses_to_stop must be >= 1, got {self.misses_to_stop!r}")
        if self.rearm_ns < self.max_ns:
            raise ValueError(f"rearm_ns must be >= max_ns, got {self.rearm_ns!r}")
        if self.max_backoff < 1:
            raise ValueError(f"max_backoff must be >= 1, got {self.max_backoff!r}")


class SpinPolicy:
    """One reader's spin decisions (see the module docstring)."""

    #: Event loops with a spin scheduled or running: one spinner per loop.
    _busy_loops: ClassVar[set[int]] = set()
    #: Per event loop (by id): the reader that rested last (by id).
    _rested: ClassVar[dict[int, int]] = {}

    def __init__(self, config: SpinConfig, cpus: int | None = None) -> None:
        self.config = config
        self.enabled = config.max_ns > 0 and (cpus if cpus is not None else usable_cpus()) >= 2
        self._misses = [0, 0]
        # Per trigger: wake-ups within rearm_ns needed to start it again, how
        # many came, and whether it was started that way and caught nothing.
        self._backoff = [1, 1]
        self._slow_wakes = [0, 0]
        self._on_probation = [False, False]
        self._last_wake_ns = [1 << 62, 1 << 62]  # the last wake-up after each trigger
        self._probe_backoff = 1  # rings between probes (see may_spin_after_ring)
        self._rings = 0
        self.spins = 0
        self.hits = 0

    def wants(self, trigger: int) -> bool:
        """Whether a spin for ``trigger`` is worth trying now."""
        return self.enabled and self._misses[trigger] < self.config.misses_to_stop

    def alone(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Note that this reader rests now; False when the loop's last reader
        to rest was another one (several are busy: then nobody spins)."""
        key, me = id(loop), id(self)
        last = self._rested.get(key, me)
        self._rested[key] = me
        return last == me

    def claim(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Take the loop's single spinner slot; False if another reader has it."""
        key = id(loop)
        if key in self._busy_loops:
            return False
        self._busy_loops.add(key)
        return True

    def release(self, loop: asyncio.AbstractEventLoop) -> None:
        self._busy_loops.discard(id(loop))

    def record(self, trigger: int, found: bool) -> None:
        """The result of one spin for ``trigger``."""
        self.spins += 1
        if found:
            self.hits += 1
            self._misses[trigger] = 0
            self._backoff[trigger] = 1
            self._on_probation[trigger] = False
            return
        self._misses[trigger] += 1
        if self._misses[trigger] >= self.config.misses_to_stop and self._on_probation[trigger]:
            self._on_probation[trigger] = False
            self._backoff[trigger] = min(2 * self._backoff[trigger], self.config.max_backoff)

    def may_spin_after_ring(self, trigger: int) -> bool:
        """Whether to spin for ``trigger`` although we just rang the peer: a
        probe, after our write (a request), when the last wake-up after one
        came within ``max_ns``.  Never after freeing space for a blocked
        writer (``AFTER_EMPTY``): that writer is the one a spin would hold up."""
        if trigger != AFTER_WRITE or self._last_wake_ns[trigger] > self.config.max_ns:
            return False
        self._rings += 1
        if self._rings < self._probe_backoff:
            return False
        self._rings = 0
        return True

    def probed(self, trigger: int, caught_after_ns: int | None) -> None:
        """The result of a spin that ``may_spin_after_ring`` allowed: the
        bytes came ``caught_after_ns`` after ``trigger`` (None: not at all).
        A probe pays only if that beats the last wake-up: a peer woken on
        our CPU answers a spinner late, and a late catch is a loss too."""
        if caught_after_ns is not None and caught_after_ns < self._last_wake_ns[trigger]:
            self._probe_backoff = 1
        else:
            self._probe_backoff = min(2 * self._probe_backoff, self.config.max_backoff)

    def woken_after(self, trigger: int, slept_ns: int) -> None:
        """A doorbell woke us ``slept_ns`` after ``trigger`` (the pipe ran
        empty, or our last write)."""
        self._last_wake_ns[trigger] = slept_ns
        if self._misses[trigger] < self.config.misses_to_stop:
            return  # the trigger spins already
        if slept_ns <= self.config.max_ns:  # a spin would have caught it
            self._misses[trigger] = 0
            self._slow_wakes[trigger] = 0
        elif slept_ns <= self.config.rearm_ns:
            self._slow_wakes[trigger] += 1
            if self._slow_wakes[trigger] >= self._backoff[trigger]:
                self._misses[trigger] = 0
                self._slow_wakes[trigger] = 0
                self._on_probation[trigger] = True
        else:
            self._slow_wakes[trigger] = 0  # the evidence must come in a row
