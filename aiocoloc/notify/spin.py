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

``SpinPolicy`` is compiled (``spin_policy``, loaded by ``aiocoloc.compiled``):
the data path asks it on every wake-up and every rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiocoloc import compiled

__all__ = [
    "AFTER_EMPTY",
    "AFTER_WRITE",
    "SpinConfig",
    "SpinPolicy",
    "usable_cpus",
]

if TYPE_CHECKING:
    from aiocoloc.notify.spin_policy import AFTER_EMPTY, AFTER_WRITE, SpinPolicy, usable_cpus
else:
    _policy = compiled.load("aiocoloc.notify.spin_policy")
    AFTER_EMPTY, AFTER_WRITE = _policy.AFTER_EMPTY, _policy.AFTER_WRITE
    SpinPolicy, usable_cpus = _policy.SpinPolicy, _policy.usable_cpus


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
