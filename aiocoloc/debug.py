"""Counters of live objects (uvloop's debug pattern): every object that
holds a resource counts itself in when made and out when it lets go, so a
test can assert that all of them are back to zero once it is done, and a
leak fails the test that caused it (``tests/conftest.py``).

The counts change only where objects are made and released, never on a
data path.  Descriptors are counted by the kernel (``open_descriptors``):
eventfds, memfds and sockets change hands too often (SCM_RIGHTS, hubs,
pools) for a count of our own to be trusted more than the kernel's.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["LiveCounts", "live", "open_descriptors", "track_end"]


@dataclass
class LiveCounts:
    """How many of each are alive in this process."""

    transports: int = 0  # SwitchableTransports not yet lost
    pool_refs: int = 0  # references this process holds on pools (connections, servers)
    control_channels: int = 0  # control sockets not yet closed

    @property
    def pipe_ends(self) -> int:
        """Producer and consumer ends of pool pipes made and not yet released
        (counted on demand: an end's release is its own business)."""
        return sum(1 for end in _ends if not end.released)

    def snapshot(self) -> dict[str, int]:
        return {**asdict(self), "pipe_ends": self.pipe_ends}

    def nonzero(self) -> dict[str, int]:
        """The counts that are not zero (what a leak check reports)."""
        return {name: n for name, n in self.snapshot().items() if n}


#: This process's counts.
live = LiveCounts()
_ends: weakref.WeakSet[Any] = weakref.WeakSet()


def track_end(end: Any) -> None:
    """Count a pipe end (``aiocoloc.shm.Pool`` makes them) until it is released."""
    _ends.add(end)


def open_descriptors() -> int:
    """How many file descriptors this process has open (Linux)."""
    return len(os.listdir("/proc/self/fd")) - 1  # minus the one listdir used
