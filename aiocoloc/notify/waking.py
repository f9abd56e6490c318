# cython: annotation_typing=False
"""The hot half of shared doorbells: ringing a hub, and waking the members
of a doorbell several connections listen on.

A hub (``aiocoloc.notify.hub``) rings once per wake-up of the peer's loop
and is woken once per ring of the peer: on a low-rate exchange that is every
message.  Compiled by Cython in pure-Python mode (``waking.pxd`` makes
``HubBell`` a ``cdef class``); the same source, interpreted, is the
reference that ``AIOCOLOC_NO_EXTENSIONS=1`` selects (``aiocoloc.compiled``).
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["COMPILED", "HubBell", "wake_listeners"]

#: True when this module runs compiled.
COMPILED = not __file__.endswith(".py")
_ONE = (1).to_bytes(8, "little")


def wake_listeners(listeners: Any, loop: Any, owner: object) -> None:
    """After a shared doorbell rang: call every listener (a ``SharedDoorbell``)
    whose ``ready()`` says the ring may be for it; one listener's failure is
    reported and costs the others nothing."""
    for member in list(listeners):
        if member.closed:
            continue  # closed by a callback earlier in this round
        try:
            ready = member.ready
            if ready is None or ready():
                member.wakeups += 1
                callback = member.callback
                if callback is not None:
                    callback()
        except Exception as exc:
            loop.call_exception_handler(
                {"message": "doorbell wake-up callback failed", "exception": exc, "doorbell": owner}
            )


class HubBell:
    """A hub's eventfds and "ring outstanding" words, as its ring and its
    wake-up use them (the protocol is in ``aiocoloc.notify.hub``).

    ``words`` maps the hub's segment; ``ring_word`` is the word we set when
    we ring, ``listen_word`` the one we clear when woken.  ``listeners`` are
    the members that listen (a dict: ordered, O(1) removal).  ``close`` makes
    both a no-op; the hub owns and closes the descriptors and the mapping."""

    def __init__(
        self,
        loop: Any,
        owner: object,
        listen_fd: int,
        ring_fd: int,
        words: Any,
        ring_word: int,
        listen_word: int,
    ) -> None:
        self.loop = loop
        self.owner = owner
        self.listen_fd = listen_fd
        self.ring_fd = ring_fd
        self.words = words
        self.ring_word = ring_word
        self.listen_word = listen_word
        self.listeners: dict[Any, None] = {}
        self.rings = 0  # eventfd writes
        self.wakeups = 0  # eventfd reads that found a ring

    def ring(self) -> None:
        """Wake the peer's loop, unless a ring it has not taken is outstanding."""
        words = self.words
        if words is None:
            return  # closed
        # (A load first: most rings of a batch find the word set, and a
        # compare-and-swap would take the cache line from the peer.)
        if words.load32(self.ring_word) == 0 and words.cas32(self.ring_word, 0, 1):
            try:
                os.write(self.ring_fd, _ONE)
                self.rings += 1
            except BlockingIOError:
                pass  # counter saturated: the peer has a wake-up pending anyway

    def on_readable(self) -> None:
        """The loop's reader callback: take the ring, then look at the pipes."""
        try:
            os.read(self.listen_fd, 8)
        except BlockingIOError:
            return
        words = self.words
        if words is None:
            return
        # Taken: the next write needs a ring again (the looks below fence first).
        words.store32(self.listen_word, 0)
        self.wakeups += 1
        wake_listeners(self.listeners, self.loop, self.owner)

    def close(self) -> None:
        """Ring and wake no more (idempotent)."""
        self.words = None
        self.owner = None
        self.listeners.clear()
