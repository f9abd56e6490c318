"""Exceptions raised by aiocoloc."""

from __future__ import annotations

__all__ = [
    "AiocolocError",
    "RingAttachError",
    "RingClosed",
    "RingCorrupted",
    "RingError",
]


class AiocolocError(Exception):
    """Base class of every error aiocoloc raises."""


class RingError(AiocolocError):
    """A shared-memory ring cannot be used."""


class RingAttachError(RingError, ValueError):
    """A buffer cannot hold a ring: too small, read-only, unaligned, or its
    header is not a ring header of a layout this version understands."""


class RingCorrupted(RingError):
    """The other side left positions in shared memory that break the ring's
    invariants.  The ring end that saw it refuses every further operation."""


class RingClosed(RingError, BrokenPipeError):
    """Writing to a ring whose consumer has gone, or using an end after close."""


class SegmentError(AiocolocError):
    """A shared-memory segment cannot be created, opened or mapped."""


class PoolError(AiocolocError):
    """A pool cannot be created, attached or used."""


class PoolExhausted(PoolError):
    """The pool has no free slice, pipe entry or member slot for the request."""


class PoolBusy(PoolExhausted):
    """The pool's allocator lock is held by another member right now, and the
    caller (an event loop) does not wait for it: try again later."""


class PoolCorrupted(PoolError):
    """The pool's shared tables break their invariants (a buggy or hostile member)."""
