"""The words a running ring end reports, shared by both twins.

The comparisons themselves stay on each twin's hot path: they are the trust
rules drawn in ``_ring.pxd`` (a consumer checks every tail it loads, a
producer every head).  What they say when one fails is built here, only then,
so that the compiled core and the pure-Python reference raise the same
exceptions with the same messages.  Attach-time checks (regions, headers,
geometry, layout slots) report through ``_ring_layout`` and
``_ring_pipe_layout``.
"""

from __future__ import annotations

__all__ = [
    "ALREADY_ATTACHED",
    "CONSUMER_CLOSED",
    "POISONED",
    "RELEASED",
    "RESIZE_IN_FLIGHT",
    "WRITE_AFTER_CLOSE",
    "cannot_consume",
    "head_moved_backwards",
    "head_past_tail",
    "layout_ack_mismatch",
    "layout_jumped",
    "layout_starts_before",
    "never_fits",
    "positions_at_attach",
    "tail_moved_backwards",
    "tail_too_far",
]

# --- misuse by this process -------------------------------------------------------

#: ``RuntimeError``: an end is bound to one region, once.
ALREADY_ATTACHED = "this end is already attached"
#: ``ValueError``: ``release()`` dropped the buffer.
RELEASED = "ring end has been released"
#: ``RingCorrupted``: every call after the end saw the peer break the rules.
POISONED = "ring end already saw a corrupted header"
#: ``RingClosed``: this producer closed the channel.
WRITE_AFTER_CLOSE = "write to a ring after its producer closed it"
#: ``RingClosed``: the consumer closed the channel.
CONSUMER_CLOSED = "the ring's consumer has closed"
#: ``RuntimeError``: at most one layout is pending (see ``_ring.pxd``).
RESIZE_IN_FLIGHT = "a resize is still in flight (see can_resize())"


def never_fits(n: int, capacity: int) -> str:
    """``ValueError``: an all-or-nothing write larger than the channel."""
    return f"{n} bytes can never fit a ring of capacity {capacity}"


def cannot_consume(n: int, available: int) -> str:
    """``ValueError``: ``consume(n)`` beyond the readable bytes."""
    return f"cannot consume {n} bytes: {available} are readable"


# --- the peer broke the protocol (RingCorrupted) ------------------------------------


def positions_at_attach(head: int, tail: int) -> str:
    """Found at attach: not ``head <= tail <= limit(head)``."""
    return f"ring positions invalid at attach: head {head}, tail {tail}"


def head_moved_backwards(head: int, last_head: int) -> str:
    """Producer reading head: ``head < last_head``."""
    return f"consumer head moved backwards: {head} < {last_head}"


def head_past_tail(head: int, tail: int) -> str:
    """Producer reading head: ``head > tail``."""
    return f"consumer head {head} is past the producer tail {tail}"


def tail_moved_backwards(tail: int, last_tail: int) -> str:
    """Consumer reading tail: ``tail < last_tail``."""
    return f"producer tail moved backwards: {tail} < {last_tail}"


def tail_too_far(tail: int, limit: int, head: int) -> str:
    """Consumer reading tail: ``tail > limit(head)``."""
    return (
        f"producer tail {tail} is more than capacity {limit - head} "
        f"ahead of the consumer head {head}"
    )


def layout_ack_mismatch(ack: int, seq: int) -> str:
    """Pipe producer: the consumer acknowledged neither ``seq`` nor ``seq - 1``."""
    return f"pipe layout ack {ack} does not match layout {seq}"


def layout_jumped(seq: int, found: int) -> str:
    """Pipe consumer: the published layout is neither ``seq`` nor ``seq + 1``."""
    return f"pipe layout jumped from {seq} to {found}"


def layout_starts_before(seq: int, start: int, current_seq: int, current_start: int) -> str:
    """Pipe consumer: a new layout that starts before the one in use."""
    return f"pipe layout {seq} starts at {start}, before layout {current_seq} (at {current_start})"
