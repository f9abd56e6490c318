"""Hubs: one doorbell shared by every connection between two event loops.

A connection's doorbell (``aiocoloc.notify.doorbell``) costs an eventfd write per
wake-up on one side and a read on the other: with many busy connections
between the same two loops, as many system calls as TCP's sends and
receives.  A hub gives all shared-memory connections between one event
loop of ours and one of the peer (same kernel) a single eventfd pair: one
we listen on, registered once with ``loop.add_reader``, one we ring.

* Whether to ring is still decided per pipe by its sleep flags (event
  suppression, ``_ring.pxd``); only the eventfds are shared.
* Waking: the hub reads its eventfd, then asks each member that listens
  whether the ring may be for it (``ready``: its reader sleeps and the
  writer took its flag or bytes came, or its writer waits and the reader
  took its flag or room came) and wakes only those.  The read comes first: a ring that lands after it
  makes the eventfd readable again, so no wake-up is lost.
* Ringing: a ring is needed only when the peer's hub has no ring
  outstanding.  A word per direction in a small shared segment says so:
  the ringer sets it (0 -> 1) and writes the eventfd only if it was 0; the
  listener reads its eventfd, clears the word, then looks at the pipes.  So
  ten writes before the peer wakes cost one system call, and the first one
  goes at once: the peer starts on it while we write on (deferring rings
  to the end of the loop iteration kept the two processes from working at
  the same time, and made many busy connections slower than TCP).
  Why no wake-up is lost: a ringer that finds the word set wrote its bytes
  and its pipe flag before (its fence in ``wake_needed``); the listener
  clears the word before it looks (a fence in ``sleep_over``/``wait_over``),
  so either it sees those bytes, or the word it cleared was set again
  later by a ringer that then writes the eventfd.
* Life: each member (a ``HubDoorbell``, taken during the handshake and
  then owned by the connection) holds a reference.  When the last one
  closes, the hub rests for ``linger`` seconds (``hub_linger`` in
  ``aiocoloc.connect.policy``): a connection that comes meanwhile joins it
  as it is, with no new eventfds, segment or descriptors to pass (the
  handshake's costliest step when connections come one after the other),
  and a server's resting hub keeps that connection's pipes, made meanwhile
  (``aiocoloc.connect.spare_pipes``, given back when the hub closes);
  otherwise it closes, its descriptors and mapping with it.  A resting hub
  whose event loop closed is closed by the next hub that rests, or by
  ``close_resting_hubs``; a server's hubs close at rest once its endpoint
  closed (``HubTable.close``).

The client creates both eventfds and the segment of a hub and names it with
a random token (``join_client_hub``); the server learns them from the first
handshake that offers the token and keeps the hub by token (``HubTable``),
so every connection that offers the token later shares it.  See
``aiocoloc.connect.handshake``.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import secrets
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from aiocoloc import compiled
from aiocoloc.errors import SegmentError
from aiocoloc.notify.doorbell import SharedDoorbell, new_eventfd
from aiocoloc.shm import MemfdSegment
from aiocoloc.shm.atomic import SharedWords, atomics_are_process_safe

if TYPE_CHECKING:
    from aiocoloc.notify.waking import HubBell
else:
    HubBell = compiled.load("aiocoloc.notify.waking").HubBell

__all__ = [
    "OFFER",
    "SEGMENT_SIZE",
    "Hub",
    "HubDoorbell",
    "HubTable",
    "close_resting_hubs",
    "hubs_usable",
    "is_eventfd",
    "join_client_hub",
]

_log = logging.getLogger("aiocoloc.notify.hub")
#: Whether this process offers and accepts hubs in handshakes (tests turn
#: it off to play a peer from before hubs).
OFFER = True
#: The hub's shared segment: one "ring outstanding" word per direction, on
#: cache lines of their own.
SEGMENT_SIZE = 4096
_CLIENT_RINGS = 0  # set by the client, cleared by the server
_SERVER_RINGS = 64  # set by the server, cleared by the client


#: Hubs with no member, waiting for a next connection (strong references:
#: a resting hub owns descriptors that only ``close`` gives back).
_resting: set[Hub] = set()


def close_resting_hubs() -> int:
    """Close every hub that rests (no member); returns how many.  Call it on
    the thread of their event loops, or once those loops stopped."""
    hubs = list(_resting)
    for resting in hubs:
        resting.close()
    return len(hubs)


def hubs_usable() -> bool:
    """Whether this process offers and takes hubs: on, and atomic words that
    work across processes (the compiled module)."""
    return OFFER and atomics_are_process_safe()


def is_eventfd(fd: int) -> bool:
    """Whether ``fd`` is an eventfd (a hub's descriptors come from the peer).
    Without ``/proc`` we cannot tell, and take it (as a connection's own
    doorbells are taken)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return not os.path.isdir("/proc/self/fd")


class HubDoorbell(SharedDoorbell):
    """One connection's share of a hub.  Holds a reference on the hub from
    its creation until ``close()`` (the last one to close lets it rest)."""

    KIND = "hub"

    def __init__(self, hub: Hub) -> None:
        super().__init__()
        self.hub = hub
        self._bell = hub.bell

    def ring(self) -> None:
        """Wake the peer: one system call per wake-up of the peer's hub."""
        if not self.closed:
            self.rings += 1
            self._bell.ring()  # (SharedDoorbell.ring in one Python call: this one)

    def _check_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop is not self.hub.loop:
            raise RuntimeError("a hub serves the event loop it was made on")

    def _listening(self, loop: asyncio.AbstractEventLoop) -> None:
        self.hub.listening(self)

    def _leave(self) -> None:
        self.hub.leave(self)


class Spare(Protocol):
    """Something a server keeps with a hub for its next connection
    (``aiocoloc.connect.spare_pipes``)."""

    def discard(self) -> None:
        """Give it back (the hub closed)."""


class Hub:
    """Eventfds and a shared word per direction, for the connections
    between two event loops.

    Owns ``listen_fd``, ``ring_fd`` and ``segment`` and closes them with its
    last member; ``client`` says which side of the pair we are.
    ``on_closed`` runs once then (to forget the hub by its token).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        token: str,
        listen_fd: int,
        ring_fd: int,
        segment: MemfdSegment,
        *,
        client: bool,
        on_closed: Callable[[Hub], None] | None = None,
        linger: float = 0.0,
    ) -> None:
        self.loop = loop
        #: Seconds the hub rests after its last member left (0: it closes).
        self.linger = linger
        self.token = token
        self.listen_fd = listen_fd
        self.ring_fd = ring_fd
        self.segment = segment
        self.closed = False
        #: (pool id, client's member slot) pairs whose proof both sides of
        #: this hub completed: a later handshake over it may skip the
        #: client's proof (``aiocoloc.connect.handshake``).
        self.proven: set[tuple[str, int]] = set()
        #: Called (soon, with the hub) each time the hub starts resting: a
        #: server makes the pipes of the next connection over it (``spare``).
        self.on_rest: Callable[[Hub], None] | None = None
        #: The server's pipes made ahead for the next connection over this
        #: hub, if any; given back when the hub closes.
        self.spare: Spare | None = None
        self._on_closed = on_closed
        self._members = 0  # HubDoorbells not closed yet
        self._rest_timer: asyncio.TimerHandle | None = None
        self._map: mmap.mmap | None = None
        self._words: SharedWords | None = None
        #: The ring and the wake-up (compiled); its ``listeners`` are the
        #: members that listen, in the order they joined.
        self.bell = HubBell(
            loop,
            self,
            listen_fd,
            ring_fd,
            None,
            _CLIENT_RINGS if client else _SERVER_RINGS,
            _SERVER_RINGS if client else _CLIENT_RINGS,
        )
        try:
            if segment.size < SEGMENT_SIZE:
                raise SegmentError(f"a hub segment needs {SEGMENT_SIZE} bytes, got {segment.size}")
            self._map = segment.map()
            self._words = SharedWords(self._map)
            self.bell.words = self._words
            loop.add_reader(listen_fd, self.bell.on_readable)
        except BaseException:
            self._release()
            raise

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self._members} members"
        return f"<Hub {self.token[:8]} {state}>"

    @property
    def rings(self) -> int:
        """Eventfd writes: wake-ups of the peer's loop."""
        return self.bell.rings

    @property
    def wakeups(self) -> int:
        """Eventfd reads that found a ring."""
        return self.bell.wakeups

    @property
    def members(self) -> int:
        """Connections (and handshakes) holding the hub."""
        return self._members

    @property
    def resting(self) -> bool:
        """Whether the hub waits, with no member, for a next connection."""
        return self._rest_timer is not None

    def join(self) -> HubDoorbell:
        """A new member: one more reference until its ``close()``."""
        if self.closed:
            raise RuntimeError("the hub is closed")
        if self._rest_timer is not None:
            self._wake_up()
        self._members += 1
        return HubDoorbell(self)

    def listening(self, member: HubDoorbell) -> None:
        self.bell.listeners[member] = None

    def leave(self, member: HubDoorbell) -> None:
        self.bell.listeners.pop(member, None)
        self._members -= 1
        if self._members == 0:
            self.rest()

    def rest(self) -> None:
        """No member is left: wait ``linger`` seconds for the next one, or
        close now (no linger, or our event loop is closed)."""
        if self.closed or self._members or self._rest_timer is not None:
            return
        if self.linger <= 0 or self.loop.is_closed():
            self.close()
            return
        for stale in [h for h in _resting if h.loop.is_closed()]:
            stale.close()  # its loop will never run its timer
        self._rest_timer = self.loop.call_later(self.linger, self._rested)
        _resting.add(self)
        if self.on_rest is not None:
            self.loop.call_soon(self.on_rest, self)

    def _wake_up(self) -> None:
        assert self._rest_timer is not None
        self._rest_timer.cancel()
        self._rest_timer = None
        _resting.discard(self)

    def _rested(self) -> None:
        self._rest_timer = None
        _resting.discard(self)
        if self._members == 0:
            self.close()

    def ring(self) -> None:
        """Wake the peer's loop, unless a ring it has not taken is outstanding."""
        self.bell.ring()

    # -------------------------------------------------------------- closing

    def close(self) -> None:
        """Stop listening, close the descriptors and the mapping.
        Idempotent; members left behind ring and wake no more."""
        if self.closed:
            return
        self.closed = True
        if self._rest_timer is not None:
            self._wake_up()
        spare, self.spare, self.on_rest = self.spare, None, None
        if spare is not None:
            spare.discard()
        self.bell.close()
        if not self.loop.is_closed():
            self.loop.remove_reader(self.listen_fd)
        self._release()
        if self._on_closed is not None:
            on_closed, self._on_closed = self._on_closed, None
            on_closed(self)

    def _release(self) -> None:
        self.bell.close()
        if self._words is not None:
            self._words.release()
            self._words = None
        if self._map is not None:
            self._map.close()
            self._map = None
        self.segment.close()
        for fd in {self.listen_fd, self.ring_fd}:
            try:
                os.close(fd)
            except OSError:
                pass


class HubTable:
    """Hubs by token: the server's, one table per control endpoint."""

    def __init__(self, loop: asyncio.AbstractEventLoop, linger: float = 0.0) -> None:
        self._loop = loop
        self._linger = linger  # each hub's, once its last member left
        self._hubs: dict[str, Hub] = {}

    def __len__(self) -> int:
        return len(self._hubs)

    def hubs(self) -> list[Hub]:
        """The hubs open now (resting ones included)."""
        return list(self._hubs.values())

    def join(self, token: str) -> HubDoorbell | None:
        """A membership of the hub named ``token``, if we have it."""
        hub = self._hubs.get(token)
        return hub.join() if hub is not None else None

    def join_new(self, token: str, listen_fd: int, ring_fd: int, segment_fd: int) -> HubDoorbell:
        """A membership of hub ``token`` made of the peer's eventfds and
        segment (owned from now on, also when this raises: ``SegmentError``
        for a segment we cannot use).  If a concurrent handshake made the hub
        meanwhile, the descriptors are closed and that hub is joined: it is
        the same one, the client names one hub by one token."""
        found = self.join(token)
        if found is not None:
            for fd in {listen_fd, ring_fd, segment_fd}:
                os.close(fd)
            return found
        try:
            segment = MemfdSegment.from_fd(segment_fd)  # (closes it if unusable)
        except BaseException:
            for fd in {listen_fd, ring_fd}:
                os.close(fd)
            raise
        hub = Hub(
            self._loop,
            token,
            listen_fd,
            ring_fd,
            segment,
            client=False,
            on_closed=self._forget,
            linger=self._linger,
        )
        self._hubs[token] = hub
        return hub.join()

    def close(self) -> None:
        """The endpoint is closing: resting hubs close now, the others with
        their last member."""
        self._linger = 0.0
        for hub in list(self._hubs.values()):
            hub.linger = 0.0
            if hub.members == 0:
                hub.close()

    def _forget(self, hub: Hub) -> None:
        if self._hubs.get(hub.token) is hub:
            del self._hubs[hub.token]


#: The client's hubs: per event loop, per control endpoint address.
_client_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Hub]] = (
    weakref.WeakKeyDictionary()
)


def join_client_hub(address: str, linger: float = 0.0) -> HubDoorbell:
    """A membership of the running loop's hub towards the control endpoint
    at ``address``; the hub is made (two new eventfds, a new token, resting
    ``linger`` seconds after its last member) if the loop has none open."""
    loop = asyncio.get_running_loop()
    hubs = _client_hubs.get(loop)
    if hubs is None:
        hubs = _client_hubs[loop] = {}
    hub = hubs.get(address)
    if hub is not None and not hub.closed:
        return hub.join()
    fds: list[int] = []
    try:
        fds.append(new_eventfd())
        fds.append(new_eventfd())
        segment = MemfdSegment.create(SEGMENT_SIZE, "aiocoloc-hub")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise

    def forget(closed: Hub) -> None:
        if hubs.get(address) is closed:
            del hubs[address]

    listen_fd, ring_fd = fds
    hub = Hub(
        loop,
        secrets.token_hex(16),
        listen_fd,
        ring_fd,
        segment,
        client=True,
        on_closed=forget,
        linger=linger,
    )
    hubs[address] = hub
    return hub.join()
