"""Doorbells: how one end of a connection wakes the other.

A doorbell is a pair of file descriptors: one we listen on (registered with
the running event loop, no threads) and one we ring.  Within one kernel both
are eventfds -- each side creates the one it listens on and hands it to the
peer over the control socket (SCM_RIGHTS).  Ringing is a single 8-byte
write; several rings before the listener wakes coalesce into one wake-up.

Whether to ring at all is decided by the ring's sleep flags (event
suppression, see ``_ring.pxd``); when to ring by the transport's batching.
Connections between the same two event loops share one eventfd pair, a hub
(``aiocoloc.notify.hub``), when both sides know hubs; a ``Doorbell`` is then one
connection's own pair, with a peer that does not.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from aiocoloc.control.frames import encode_frame
from aiocoloc.control.messages import Bell

__all__ = [
    "ControlDoorbell",
    "Doorbell",
    "SharedDoorbell",
    "new_eventfd",
]

_log = logging.getLogger("aiocoloc.notify.doorbell")
_ONE = (1).to_bytes(8, "little")
_BELL = encode_frame(Bell().fields())


class SharedDoorbell:
    """One connection's share of a doorbell that several connections listen
    on (a hub's eventfds, an ivshmem interrupt vector), with the interface
    of ``Doorbell``.  Subclasses say how to ring the peer and how to join
    and leave the listeners of what they share; what they share wakes its
    listeners with ``aiocoloc.notify.waking.wake_listeners``."""

    KIND = "shared"

    def __init__(self) -> None:
        self.rings = 0  # rings asked for (one system call may serve several)
        self.wakeups = 0
        self.closed = False
        self.callback: Callable[[], None] | None = None
        self.ready: Callable[[], bool] | None = None

    def ring(self) -> None:
        """Wake the peer."""
        if not self.closed:
            self.rings += 1
            self._ring_peer()

    def listen(
        self,
        loop: asyncio.AbstractEventLoop,
        callback: Callable[[], None],
        ready: Callable[[], bool] | None = None,
    ) -> None:
        """Call ``callback`` when what we share is rung and ``ready()`` says
        the ring may be for us (None: on every ring)."""
        self._check_loop(loop)
        self.callback, self.ready = callback, ready
        self._listening(loop)

    def close(self) -> None:
        """Stop listening and give our share back.  Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.callback = self.ready = None
        self._leave()

    def _ring_peer(self) -> None:
        raise NotImplementedError

    def _check_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Raise if we cannot listen on ``loop`` (before anything changes)."""

    def _listening(self, loop: asyncio.AbstractEventLoop) -> None:
        raise NotImplementedError

    def _leave(self) -> None:
        raise NotImplementedError


def new_eventfd() -> int:
    """A non-blocking, close-on-exec eventfd."""
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


class Doorbell:
    """Listen on ``listen_fd``, ring ``ring_fd``.  Owns both descriptors."""

    KIND = "eventfd"

    def __init__(self, listen_fd: int, ring_fd: int) -> None:
        self.listen_fd = listen_fd
        self.ring_fd = ring_fd
        self.rings = 0
        self.wakeups = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def ring(self) -> None:
        """Wake the peer (never blocks: a saturated counter is already a ring)."""
        if self._closed:
            return
        try:
            os.write(self.ring_fd, _ONE)
            self.rings += 1
        except BlockingIOError:
            pass  # counter saturated: the peer has a wake-up pending anyway

    def listen(
        self,
        loop: asyncio.AbstractEventLoop,
        callback: Callable[[], None],
        ready: Callable[[], bool] | None = None,
    ) -> None:
        """Call ``callback`` on the loop whenever the peer rings.  (``ready``
        is for a doorbell shared by several connections, ``aiocoloc.notify.hub``:
        this one is the connection's own, every ring is for it.)"""
        self._loop = loop

        def on_readable() -> None:
            try:
                os.read(self.listen_fd, 8)
            except BlockingIOError:
                return
            self.wakeups += 1
            callback()

        loop.add_reader(self.listen_fd, on_readable)

    def close(self) -> None:
        """Stop listening and close both descriptors.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.listen_fd)
        for fd in {self.listen_fd, self.ring_fd}:
            os.close(fd)


class ControlDoorbell:
    """A doorbell carried as a message on the control channel.

    For peers in different kernels (VMs sharing an ivshmem pool), where no
    eventfd can be passed: ringing posts a ``bell`` message
    (``aiocoloc.control.messages``), encoded once; the transport hands
    incoming bells to ``on_ring``.  Same interface as ``Doorbell``.
    """

    KIND = "message"

    def __init__(self, post_frame: Callable[[bytes], None]) -> None:
        self._post_frame = post_frame
        self._callback: Callable[[], None] | None = None
        self.rings = 0
        self.wakeups = 0
        self._closed = False

    def ring(self) -> None:
        if self._closed:
            return
        try:
            self._post_frame(_BELL)
            self.rings += 1
        except ConnectionResetError:
            pass  # the link's loss is reported by the link

    def listen(
        self,
        loop: asyncio.AbstractEventLoop,
        callback: Callable[[], None],
        ready: Callable[[], bool] | None = None,
    ) -> None:
        self._callback = callback

    def on_ring(self) -> None:
        """A bell message arrived."""
        if self._callback is not None and not self._closed:
            self.wakeups += 1
            self._callback()

    def close(self) -> None:
        self._closed = True
        self._callback = None
