"""Doorbells between VMs through ivshmem interrupts, for one process.

A process granted the guest's doorbell device (``aiocoloc.notify.vfio_grants``)
holds one ``VfioBells`` per pool: it maps the pool's BAR2 and the doorbell
register through the device descriptor, and listens on its own MSI-X
vector's eventfd.  Its connections to peers in other guests ring
``(peer IVPosition, peer vector)`` and are woken by our vector: one
interrupt wakes every connection of the process that may have been rung,
as a hub does (``aiocoloc.notify.hub``); event suppression in the pipes
keeps rings to those whose reader sleeps.

``VfioDoorbell`` is one connection's share, with the interface of
``aiocoloc.notify.doorbell.Doorbell``.  Processes without a grant use
``bell`` messages on the control channel (``ControlDoorbell``).
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import threading
from typing import TYPE_CHECKING

from aiocoloc import compiled
from aiocoloc.notify.doorbell import SharedDoorbell
from aiocoloc.notify.vfio import DOORBELL_REGISTER, VfioBarSegment
from aiocoloc.notify.vfio_grants import Grant

__all__ = ["VfioBells", "VfioDoorbell", "bells_for", "register"]

_log = logging.getLogger("aiocoloc.notify.vfio_bells")

if TYPE_CHECKING:
    from aiocoloc.notify.waking import wake_listeners
else:
    wake_listeners = compiled.load("aiocoloc.notify.waking").wake_listeners


class VfioDoorbell(SharedDoorbell):
    """One connection's doorbell through the device: rings ``peer``'s vector,
    listens on ours (shared by the process's connections of that pool)."""

    KIND = "vfio"

    def __init__(self, bells: VfioBells, peer: tuple[int, int]) -> None:
        super().__init__()
        self._bells = bells
        self.peer = peer

    def _ring_peer(self) -> None:
        self._bells.ring(*self.peer)

    def _listening(self, loop: asyncio.AbstractEventLoop) -> None:
        self._bells.listening(loop, self)

    def _leave(self) -> None:
        self._bells.leave(self)


class VfioBells:
    """This process's grant of the doorbell device for one pool."""

    def __init__(self, grant: Grant) -> None:
        self.grant = grant
        offset, size = grant.bar0
        self._bar0 = mmap.mmap(grant.device_fd, size, offset=offset)
        self._regs: memoryview | None = memoryview(self._bar0).cast("I")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listeners: dict[VfioDoorbell, None] = {}
        self.rings = self.interrupts = 0

    @property
    def closed(self) -> bool:
        return self._regs is None

    @property
    def position(self) -> tuple[int, int]:
        """What a peer rings to wake us: (our IVPosition, our vector)."""
        return self.grant.position, self.grant.vector

    def segment(self) -> VfioBarSegment:
        """The pool (BAR2) as a segment of its own descriptor."""
        offset, size = self.grant.bar2
        return VfioBarSegment(os.dup(self.grant.device_fd), size, offset, self.grant.address)

    def doorbell(self, peer: tuple[int, int]) -> VfioDoorbell:
        """A connection's doorbell towards ``peer`` = (IVPosition, vector)."""
        if self._regs is None:
            raise ValueError("the doorbell device is closed")
        return VfioDoorbell(self, peer)

    def ring(self, position: int, vector: int) -> None:
        regs = self._regs
        if regs is not None:
            regs[DOORBELL_REGISTER] = (position << 16) | vector  # one 32-bit store
            self.rings += 1

    def listening(self, loop: asyncio.AbstractEventLoop, member: VfioDoorbell) -> None:
        if self._loop is None or self._loop.is_closed():  # (a new loop after asyncio.run)
            self._loop = loop
            loop.add_reader(self.grant.eventfd, self._on_interrupt)
        elif loop is not self._loop:
            raise RuntimeError("a doorbell grant serves the event loop that first listened")
        self._listeners[member] = None

    def leave(self, member: VfioDoorbell) -> None:
        self._listeners.pop(member, None)

    def _on_interrupt(self) -> None:
        try:
            os.eventfd_read(self.grant.eventfd)
        except BlockingIOError:
            return
        self.interrupts += 1
        assert self._loop is not None
        wake_listeners(self._listeners, self._loop, self)

    def close(self) -> None:
        """Stop listening and give the grant back.  Idempotent."""
        if self._regs is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.grant.eventfd)
        self._regs.release()
        self._regs = None
        self._bar0.close()
        self.grant.close()


_lock = threading.Lock()
_by_pool: dict[str, VfioBells] = {}


def register(pool_id: str, bells: VfioBells) -> VfioBells:
    """Keep ``bells`` as this process's for ``pool_id`` (the first open one
    wins; a second is closed and the first returned)."""
    with _lock:
        kept = _by_pool.get(pool_id)
        if kept is None or kept.closed:
            kept = _by_pool[pool_id] = bells
    if kept is not bells:
        bells.close()
    return kept


def bells_for(pool_id: str) -> VfioBells | None:
    """This process's doorbell grant for pool ``pool_id``, if it holds one."""
    with _lock:
        bells = _by_pool.get(pool_id)
    return bells if bells is not None and not bells.closed else None
