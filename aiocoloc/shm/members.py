"""A pool's members: joining and leaving, heartbeats, leases, reaping.

``MemberTable`` is the shared table as this process sees and judges it;
``Membership`` is this process's own place in it (its slot, the allocator
lock taken in its name, joining and leaving); its heartbeat is
``aiocoloc.shm.heartbeat``'s.  Members beat a counter; a member whose counter has not moved for a
lease, by the observer's own clock (``aiocoloc.shm.staleness``), is dead:
any member reaps it under the allocator lock -- its slot is freed and its
pipes ended (``PipeTable``).  The table also judges, for the allocator lock,
whether the member holding it is gone.  The layout of an entry is
``aiocoloc.shm.layout``'s.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

from aiocoloc.errors import PoolBusy, PoolCorrupted, PoolError, PoolExhausted
from aiocoloc.shm.atomic import SharedWords
from aiocoloc.shm.heartbeat import Heartbeat
from aiocoloc.shm.layout import (
    ACTIVE,
    FREE,
    H_LOCK,
    H_LOCK_COUNT,
    M_ENDPOINT,
    M_GENERATION,
    M_HEARTBEAT,
    M_PID,
    M_STATE,
    MEMBER_ENTRY_SIZE,
    PoolGeometry,
)
from aiocoloc.shm.lock import BACKGROUND_LOCK_WAIT, AllocatorLock, on_event_loop
from aiocoloc.shm.pipes import PipeTable
from aiocoloc.shm.staleness import Observed

__all__ = ["HOLDER_GONE_GRACE", "MemberTable", "Membership"]

_log = logging.getLogger("aiocoloc.shm.members")

#: Seconds a lock holder must look gone (slot freed or reused) before it is
#: taken over: a member leaving frees its slot just before it unlocks.
HOLDER_GONE_GRACE = 0.05
#: Longest a thread finishing our leave waits for the allocator lock (seconds).
LEAVE_WAIT = 1.0


class MemberTable:
    """The member table of one pool, as this process sees and judges it."""

    def __init__(
        self,
        region: Any,
        words: SharedWords,
        geometry: PoolGeometry,
        lease: float,
        pipes: PipeTable,
        name: str,
    ) -> None:
        self._region = region
        self._words = words
        self.geometry = geometry
        self._lease = lease
        self._pipes = pipes
        self._name = name
        # Each member's (generation, heartbeat) as we last saw it, and since when.
        self._observed: dict[int, Observed] = {}
        # The lock acquisition whose holder looked gone, and since when.
        self._holder_gone_seen = Observed()

    def _offset(self, slot: int) -> int:
        if not 0 <= slot < self.geometry.max_members:
            raise PoolCorrupted(f"member slot {slot} out of range")
        return self.geometry.member_offset + slot * MEMBER_ENTRY_SIZE

    def active(self, slot: int) -> bool:
        """Whether member ``slot`` is attached (False for any slot out of range)."""
        if not 0 <= slot < self.geometry.max_members:
            return False
        return self._words.load32(self._offset(slot) + M_STATE) == ACTIVE

    # -- joining and leaving (under the lock) -------------------------------------

    def claim_locked(self, endpoint_id: uuid.UUID) -> tuple[int, int]:
        """Take a free slot for this process; returns it and its new generation."""
        words = self._words
        for slot in range(self.geometry.max_members):
            off = self._offset(slot)
            if words.load32(off + M_STATE) == FREE:
                generation = (words.load32(off + M_GENERATION) + 1) & 0xFFFFFFFF or 1
                self._region[off + M_ENDPOINT : off + M_ENDPOINT + 16] = endpoint_id.bytes
                words.store32(off + M_PID, os.getpid())
                words.store64(off + M_HEARTBEAT, 1)
                # The entry becomes visible last, once it is whole.
                words.store32(off + M_GENERATION, generation)
                words.store32(off + M_STATE, ACTIVE)
                _log.debug("joined pool %s as member %d", self._name, slot)
                return slot, generation
        raise PoolExhausted(
            f"pool {self._name} has no free member slot ({self.geometry.max_members} in use)"
        )

    def remove_locked(self, slot: int) -> tuple[int, int]:
        """Free member ``slot`` (leaving or dead) and end its pipes; returns
        how many pipes and slices that touched."""
        self._words.store32(self._offset(slot) + M_STATE, FREE)
        self._observed.pop(slot, None)
        return self._pipes.end_pipes_of_locked(slot, self.active)

    # -- reading and beating ------------------------------------------------------

    def entries(self) -> list[dict[str, Any]]:
        """Active members: slot, generation, endpoint id, pid, heartbeat."""
        out = []
        for slot in range(self.geometry.max_members):
            off = self._offset(slot)
            if self._words.load32(off + M_STATE) == ACTIVE:
                out.append(
                    {
                        "slot": slot,
                        "generation": self._words.load32(off + M_GENERATION),
                        "endpoint": uuid.UUID(
                            bytes=bytes(self._region[off + M_ENDPOINT : off + M_ENDPOINT + 16])
                        ),
                        "pid": self._words.load32(off + M_PID),
                        "heartbeat": self._words.load64(off + M_HEARTBEAT),
                    }
                )
        return out

    def beat(self, slot: int) -> None:
        """Advance member ``slot``'s heartbeat."""
        self._words.add64(self._offset(slot) + M_HEARTBEAT, 1)

    # -- judging and reaping ------------------------------------------------------

    def _stale(self, slot: int, now: float) -> bool:
        """True if member ``slot`` has not beaten for a lease by our clock."""
        off = self._offset(slot)
        beat = (self._words.load32(off + M_GENERATION), self._words.load64(off + M_HEARTBEAT))
        seen = self._observed.get(slot)
        if seen is None:
            seen = self._observed[slot] = Observed()
        return seen.unchanged_for(beat, now, self._lease)

    def _dead(self, slot: int, now: float) -> bool:
        return self._words.load32(self._offset(slot) + M_STATE) == ACTIVE and self._stale(slot, now)

    def reap(self, me: int, locked: Callable[[], AbstractContextManager[None]]) -> list[int]:
        """Reclaim members (other than ``me``) whose heartbeat stalled for a
        lease; returns their slots.  ``locked()`` holds the allocator lock,
        which is taken only when there is a member to reap."""
        now = time.monotonic()
        dead = [s for s in range(self.geometry.max_members) if s != me and self._dead(s, now)]
        if not dead:
            return []
        reclaimed = []
        with locked():
            for slot in dead:
                if self._dead(slot, now):
                    pid = self._words.load32(self._offset(slot) + M_PID)
                    pipes, slices = self.remove_locked(slot)
                    reclaimed.append(slot)
                    _log.info(
                        "pool %s: member %d (pid %d) stopped heartbeating; reclaimed "
                        "%d pipes and %d slices",
                        self._name,
                        slot,
                        pid,
                        pipes,
                        slices,
                    )
        return reclaimed

    def holder_gone(self, held: int, acquisition: tuple[int, int], now: float) -> bool:
        """Whether the member holding the allocator lock (value ``held``) is
        gone; ``acquisition`` as ``AllocatorLock`` passes it."""
        slot, generation = (held >> 32) - 1, held & 0xFFFFFFFF
        if slot == self.geometry.max_members:
            return False  # a joiner, not a member yet: judged by the time alone
        if not 0 <= slot < self.geometry.max_members:
            return True  # garbage in the lock word
        off = self._offset(slot)
        if (
            self._words.load32(off + M_STATE) != ACTIVE
            or self._words.load32(off + M_GENERATION) != generation
        ):
            # A member leaving the pool gives up its slot under the lock and
            # releases the lock microseconds later: only a holder that stays
            # gone for a while is dead.
            return self._holder_gone_seen.unchanged_for(acquisition, now, HOLDER_GONE_GRACE)
        return self._stale(slot, now)


class Membership:
    """This process's place in a pool: its member slot, the allocator lock
    taken in its name, its heartbeat, joining and leaving."""

    def __init__(
        self,
        words: SharedWords,
        table: MemberTable,
        pipes: PipeTable,
        lease: float,
        pool_id: uuid.UUID,
    ) -> None:
        self._table = table
        self._pipes = pipes
        self._lock = AllocatorLock(
            words,
            H_LOCK,
            H_LOCK_COUNT,
            lease,
            holder_gone=table.holder_gone,
            repair=pipes.repair_locked,
            name=str(pool_id),
        )
        self._lease = lease
        self._id = pool_id
        self.endpoint_id = uuid.uuid4()
        # Before we have a slot we lock as a pseudo-member (judged by time
        # alone: we hold the lock for microseconds), with a random token so
        # that joiners racing each other never mistake the lock for their own.
        self.slot, self.generation = table.geometry.max_members, secrets.randbits(31) | 1
        self._leaving = False
        self._heartbeat: Heartbeat | None = None

    @property
    def leaving(self) -> bool:
        """True once ``stop()`` was called: the lock is refused from then on."""
        return self._leaving

    def join(self) -> None:
        """Take a member slot, then start beating (``aiocoloc.shm.heartbeat``)."""
        with self.locked():
            joined = self._table.claim_locked(self.endpoint_id)
        # Only now: the lock was released in the name it was taken in.
        self.slot, self.generation = joined
        self._heartbeat = Heartbeat(
            self._lease / 4,
            beat=self._beat_and_reap,
            pending=self._pipes.has_deferred,
            work=self._destroy_deferred,
            pool_name=str(self._id),
        )
        self._heartbeat.start()

    # -- the allocator lock, in our name --------------------------------------------

    @contextlib.contextmanager
    def locked(self, timeout: float | None = None) -> Iterator[None]:
        """Hold the allocator lock (see ``Pool.locked``)."""
        if self._leaving:
            raise PoolError(f"pool {self._id} is closed")
        self._hold(timeout)
        try:
            yield
        finally:
            self._release()

    def _lock_value(self) -> int:
        return ((self.slot + 1) << 32) | self.generation

    def _hold(self, timeout: float | None) -> None:
        self._lock.hold(self._lock_value(), timeout)

    def _release(self) -> None:
        self._lock.release(self._lock_value())

    # -- beating, reaping, deferred work ----------------------------------------------

    def beat(self) -> None:
        """Advance our heartbeat (the heartbeat thread does it)."""
        self._table.beat(self.slot)

    def reap(self, lock_timeout: float | None = None) -> list[int]:
        """Reclaim other members whose heartbeat stalled for a lease; returns their slots."""
        return self._table.reap(self.slot, functools.partial(self.locked, lock_timeout))

    def _beat_and_reap(self) -> None:
        self.beat()
        self.reap(lock_timeout=BACKGROUND_LOCK_WAIT)

    def _destroy_deferred(self) -> None:
        with self.locked(BACKGROUND_LOCK_WAIT):
            self._pipes.destroy_deferred_locked()

    def wake(self) -> None:
        """Have the heartbeat thread do deferred work now."""
        if self._heartbeat is not None:
            self._heartbeat.wake()

    # -- leaving ------------------------------------------------------------------

    def stop(self) -> None:
        """Start leaving: refuse the lock to new work, stop beating."""
        self._leaving = True
        if self._heartbeat is not None:
            self._heartbeat.stop()  # (waits for a beat in progress: they are short)

    def leave(self, then: Callable[[], None]) -> None:
        """After ``stop()``: free deferred pipes and our slot, unlock, then
        call ``then()`` (which unmaps the pool).

        On an event loop's thread, when another member holds the allocator
        lock, a thread of ours finishes leaving once it gets the lock.
        """
        try:
            self._hold(None)
        except PoolBusy as exc:
            if on_event_loop():
                threading.Thread(
                    target=self._leave_later,
                    args=(then,),
                    name=f"aiocoloc-pool-leave-{self._id.hex[:8]}",
                    daemon=True,
                ).start()
            else:
                _log.warning("pool %s: could not leave cleanly: %s", self._id, exc)
                then()
            return
        self._leave_locked(then)

    def _leave_later(self, then: Callable[[], None]) -> None:
        # Bounded: a leaver that cannot get the lock is like a member that
        # died (our heartbeat has stopped), and the others reap our slot and
        # pipes after a lease.  Waiting three leases here kept a thread
        # polling the lock for minutes in pools with long leases.
        try:
            self._hold(min(self._lease, LEAVE_WAIT))
        except PoolError as exc:
            _log.warning(
                "pool %s: could not leave cleanly (%s); the other members reclaim our slot "
                "after a lease",
                self._id,
                exc,
            )
            then()
        else:
            self._leave_locked(then)

    def _leave_locked(self, then: Callable[[], None]) -> None:
        try:
            self._pipes.destroy_deferred_locked()
            self._table.remove_locked(self.slot)
        except PoolError as exc:
            _log.warning("pool %s: could not leave cleanly: %s", self._id, exc)
        finally:
            self._release()
        then()
